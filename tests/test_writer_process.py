"""The writer in its own process (moeprof.hook.writer_process), without vLLM: the same log as the
writer thread, a full ring, a refused path, Ctrl-C, and real kills of either side."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from logfactory import meta
from test_hook_sinks import LAYERS, META, TOP_K, Feed, _jsonl, _parquet_routes, _writer

import moeprof
from moeprof.columns import META_KEY
from moeprof.errors import HookRefusal
from moeprof.hook.ring import HostRing
from moeprof.hook.rows import StepBatch
from moeprof.hook.sinks import part_names
from moeprof.hook.writer import StepItem
from moeprof.hook.writer_process import ProcessWriter

FULL_META = meta(layers_logged=list(LAYERS), top_k=TOP_K, num_experts=8)
"""A meta ``validate`` accepts (test_hook_sinks' META is the minimum the writer needs)."""


def _process_writer(
    path: Path, ring_rows: int = 256, overwrite: bool = False, log_meta: dict | None = None
) -> ProcessWriter:
    ring = HostRing(ring_rows, len(LAYERS), TOP_K, pin=False, shared=True)
    return ProcessWriter(
        path, log_meta or META, list(LAYERS), TOP_K, overwrite, ring, part_sec=10.0
    )


def _without_times(line: dict) -> dict:
    return {k: v for k, v in line.items() if k != "closed"}


@pytest.mark.parametrize("ring_rows", [256, 16])
def test_the_writer_process_writes_the_log_the_writer_thread_writes(
    tmp_path: Path, ring_rows: int
) -> None:
    """Same steps, same random rows: the same lines, closing record included. A ring of 16 rows
    (the 12-row prefill, or four decode steps) makes steps wait for the writer to free rows."""
    thread_log, process_log = tmp_path / "thread.jsonl", tmp_path / "process.jsonl"
    w = _writer(thread_log, ring_rows=ring_rows)
    Feed(w, seed=3).workload(num_reqs=4, decode_steps=30)
    w.close()
    p = _process_writer(process_log, ring_rows=ring_rows)
    Feed(p, seed=3).workload(num_reqs=4, decode_steps=30)
    p.close()
    assert p._proc.returncode == 0
    t_meta, t_routes, t_end = _jsonl(thread_log)
    p_meta, p_routes, p_end = _jsonl(process_log)
    assert p_meta == t_meta and p_routes == t_routes
    assert len(p_routes) == 4 * (3 + 30) * len(LAYERS)
    assert t_end is not None and p_end is not None
    assert _without_times(p_end) == _without_times(t_end)


def test_the_writer_process_writes_parquet_like_the_writer_thread(tmp_path: Path) -> None:
    w = _writer(tmp_path / "thread.parquet")
    Feed(w, seed=5).workload()
    w.close()
    p = _process_writer(tmp_path / "process.parquet", log_meta=FULL_META)
    Feed(p, seed=5).workload()
    p.close()
    assert _parquet_routes(tmp_path / "process.parquet") == _parquet_routes(
        tmp_path / "thread.parquet"
    )
    assert moeprof.validate(tmp_path / "process.parquet").valid
    assert moeprof.end(moeprof.load(tmp_path / "process.parquet"))["routes"] == 4 * 8 * 2


def test_the_writer_process_refuses_an_existing_log_as_the_thread_does(tmp_path: Path) -> None:
    log = tmp_path / "routes.jsonl"
    log.write_text("mine\n")
    with pytest.raises(HookRefusal) as thread_refusal:
        _writer(log)
    with pytest.raises(HookRefusal) as process_refusal:
        _process_writer(log)
    assert str(process_refusal.value) == str(thread_refusal.value)
    assert log.read_text() == "mine\n"


def test_ctrl_c_does_not_reach_the_writer_process(tmp_path: Path) -> None:
    """Ctrl-C signals the terminal's whole process group: the writer is not in it, and ignores
    SIGINT and SIGTERM anyway, so the worker's own shutdown still closes the log."""
    p = _process_writer(tmp_path / "routes.jsonl")
    feed = Feed(p)
    feed.workload(decode_steps=2)
    assert os.getpgid(p._proc.pid) != os.getpgid(0)
    for sig in (signal.SIGINT, signal.SIGTERM):
        os.kill(p._proc.pid, sig)
    time.sleep(0.3)
    assert p._proc.poll() is None
    p.close()
    _, routes, end = _jsonl(tmp_path / "routes.jsonl")
    assert end is not None and end["routes"] == len(routes) == 4 * 5 * len(LAYERS)


def test_a_killed_writer_process_stops_logging_not_the_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = _process_writer(tmp_path / "routes.jsonl")
    feed = Feed(p)
    feed.workload(decode_steps=2)
    p._proc.kill()
    p._proc.wait(10)
    for _ in range(3):  # the worker goes on stepping: nothing raises
        feed.submit(["x"], [1], [0])
    assert p.failed
    p.close(timeout=2)
    assert "the writer process is gone" in caplog.text


_KILLED_WORKER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_hook_sinks import Feed
from test_writer_process import FULL_META, _process_writer
p = _process_writer(Path(sys.argv[1]), log_meta=FULL_META)
Feed(p).workload(num_reqs=4, decode_steps=40)
print(p._proc.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _kill_a_worker_mid_run(tmp_path: Path, log: Path) -> subprocess.CompletedProcess:
    """Run :data:`_KILLED_WORKER` on ``log`` and wait until its writer process has exited."""
    script = tmp_path / "worker.py"
    script.write_text(_KILLED_WORKER)
    proc = subprocess.run(
        [sys.executable, str(script), str(log), str(Path(__file__).parent)],
        capture_output=True,  # returns once the writer, which shares the worker's stderr, exits
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    writer_pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{writer_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{writer_pid}").exists(), "the writer process did not exit"
    return proc


def test_a_worker_killed_mid_run_leaves_every_step_it_handed_over(tmp_path: Path) -> None:
    """A real SIGKILL of the worker: the writer process sees its pipe close, writes every step
    it was handed and closes the log without a closing record (so it reads as not closed
    cleanly), then exits."""
    log = tmp_path / "routes.jsonl"
    proc = _kill_a_worker_mid_run(tmp_path, log)
    _, routes, end = _jsonl(log)
    assert end is None
    assert len(routes) == 4 * (3 + 40) * len(LAYERS)
    report = moeprof.validate(log)
    assert report.valid and not report.complete
    assert "exited without closing the log" in proc.stderr


def test_a_parquet_log_of_a_killed_worker_has_every_step_in_complete_parts(
    tmp_path: Path,
) -> None:
    log = tmp_path / "routes.parquet"
    _kill_a_worker_mid_run(tmp_path, log)
    rows = sum(pq.read_metadata(log / name).num_rows for name in part_names(log))
    assert rows == 4 * (3 + 40) * len(LAYERS)
    assert moeprof.end(moeprof.load(log)) is None
    first = pq.read_metadata(log / part_names(log)[0]).metadata
    assert json.loads(first[META_KEY]) == FULL_META


class _CopyEvent:
    """Stands in for a step's CUDA event: the device-to-host copy is running until someone
    waits for it (``synchronize``), as when the engine goes idle right after the step."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def test_a_step_whose_copy_is_still_running_reaches_the_log_when_the_engine_goes_idle(
    tmp_path: Path,
) -> None:
    """On a GPU a step is handed to the writer process only once its copy is done; with no next
    step to notice that, the worker's pending-steps thread hands it over within moments."""
    log = tmp_path / "routes.jsonl"
    p = _process_writer(log)
    feed = Feed(p)
    feed.workload(num_reqs=2, decode_steps=0)  # a prefill step, sent at once
    event = _CopyEvent()
    start = p.ring.reserve(2, p.wake, timeout=5)
    p.submit(
        StepItem(
            StepBatch(["0-1a2b3c4d", "1-1a2b3c4d"], [0, 1, 2], [3, 3], 2),
            start,
            event,
            {},
            frozenset(),
            1,
        )
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, routes, _ = _jsonl(log)
        if len(routes) == 2 * (3 + 1) * len(LAYERS):
            break
        time.sleep(0.05)
    assert event.done
    assert [r["token_idx"] for r in routes if r["step"] == 1] == [3, 3, 3, 3]
    p.close()
