"""The writer in its own process (moeprof.hook.writer_process), without vLLM: the same log as the
writer thread, a full ring, a refused path, Ctrl-C, and real kills of either side."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from logfactory import meta
from test_hook_sinks import LAYERS, META, TOP_K, Feed, _jsonl, _parquet_routes, _writer

import moeprof
from moeprof.columns import META_KEY
from moeprof.errors import HookRefusal
from moeprof.hook import writer_process
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


# --- starting the writer process on a busy machine (issue #11's bench) ----------------------


def test_a_writer_process_that_never_answers_is_refused_in_one_line_and_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen for real: with three engines starting side by side on two cores, the writer process
    got no CPU for over 60 s, and the worker failed with a traceback of
    ``subprocess.TimeoutExpired`` instead of the hook's one line. Here the child gets no CPU at
    all (a real SIGSTOP right after it starts): the worker refuses with one line naming the
    log and the wait, and the child is killed, not left behind."""
    started: list[subprocess.Popen] = []

    class StoppedChild(subprocess.Popen):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            os.kill(self.pid, signal.SIGSTOP)
            started.append(self)

    monkeypatch.setattr(writer_process.subprocess, "Popen", StoppedChild)
    monkeypatch.setattr(writer_process, "START_TIMEOUT_SEC", 1.0)
    log = tmp_path / "routes.jsonl"
    with pytest.raises(HookRefusal) as refusal:
        _process_writer(log)
    assert refusal.value.reason == (
        f"moeprof's writer process did not open {log} within 1 s (the machine may be "
        "overloaded); it was stopped"
    )
    (child,) = started
    assert child.wait(10) == -signal.SIGKILL
    assert not log.exists()


def test_the_writer_process_runs_the_workers_moeprof_not_one_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m`` puts the working directory first on the child's path: run from a folder
    holding another moeprof (a checkout of another version, here a broken one), the writer
    process imported that one and failed, or ran other code than the worker's."""
    elsewhere = tmp_path / "checkout"
    (elsewhere / "moeprof").mkdir(parents=True)
    (elsewhere / "moeprof" / "__init__.py").write_text("raise ImportError('the wrong moeprof')\n")
    monkeypatch.chdir(elsewhere)
    log = tmp_path / "routes.jsonl"
    p = _process_writer(log)
    Feed(p).workload(decode_steps=2)
    p.close()
    _, routes, end = _jsonl(log)
    assert end is not None and end["routes"] == len(routes) == 4 * 5 * len(LAYERS)


_PINNED_WORKER = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
os.sched_setaffinity(0, {0})  # as vLLM's CPU worker pins its compute core
from test_writer_process import _process_writer
p = _process_writer(Path(sys.argv[1]))
child = p._proc.pid
threads = {
    t: open(f"/proc/{child}/task/{t}/status").read().split("Cpus_allowed_list:")[1].split()[0]
    for t in os.listdir(f"/proc/{child}/task")
}
print(json.dumps({
    "threads": threads,
    "same_session": os.getsid(child) == os.getsid(0),
    "own_group": os.getpgid(child) != os.getpgid(0),
}))
p.close()
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a second CPU to move the writer to")
def test_the_writer_process_runs_off_a_pinned_workers_core_in_the_workers_session(
    tmp_path: Path,
) -> None:
    """The worker moves the writer process off its compute core the moment it starts, and
    OpenMP's pinning variables, which vLLM sets for its CPU workers with libgomp preloaded, do
    not pin it back as it loads (seen: ``GOMP_CPU_AFFINITY=0`` put it on the worker's core).
    It stays in the worker's session: a session of its own is a scheduler autogroup of its own,
    which Linux starved there for over 60 s. Its own process group keeps Ctrl-C away."""
    script = tmp_path / "worker.py"
    script.write_text(_PINNED_WORKER)
    env = dict(os.environ, GOMP_CPU_AFFINITY="0", OMP_PROC_BIND="true", OMP_PLACES="{0}")
    torch_spec = importlib.util.find_spec("torch")
    gomp = Path(torch_spec.origin).parent / "lib" / "libgomp.so.1" if torch_spec else None
    if gomp is not None and gomp.exists():
        env["LD_PRELOAD"] = str(gomp)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "routes.jsonl"), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    last = (os.cpu_count() or 2) - 1
    expected = "1" if last == 1 else f"1-{last}"  # every CPU but the worker's
    assert set(seen["threads"].values()) == {expected}, seen["threads"]
    assert len(seen["threads"]) >= 2  # the writer thread too, not only the main one
    assert seen["same_session"] and seen["own_group"]
