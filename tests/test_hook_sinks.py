"""The writer's sinks without vLLM: JSONL and Parquet from the same steps, parts, locks, the
closing record, progress under constant load, and a real full disk (a small tmpfs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from moeprof.columns import END_KEY, META_KEY, temp_part_name
from moeprof.errors import HookRefusal
from moeprof.hook import compat
from moeprof.hook.config import load_config
from moeprof.hook.ring import HostRing
from moeprof.hook.rows import StepBatch
from moeprof.hook.sinks import LOCK_NAME, ParquetSink, part_names
from moeprof.hook.writer import LogWriter, StepItem
from moeprof.schema import EndRecord

TOP_K = 2
LAYERS = (1, 3)
META = {"type": "meta", "model_id": "m", "layers_logged": list(LAYERS), "top_k": TOP_K}


def _writer(path: Path, ring_rows: int = 256, **kw: Any) -> LogWriter:
    ring = HostRing(ring_rows, len(LAYERS), TOP_K, pin=False)
    return LogWriter(
        path, META, LAYERS, TOP_K, compat.external_request_id, overwrite=False, ring=ring, **kw
    )


class Feed:
    """What the collector does for each step: rows into the ring (random ids and weights),
    then the step item; prompts of 3 tokens, then decode steps, for requests "0".."n-1"."""

    def __init__(self, writer: LogWriter, seed: int = 0) -> None:
        self.w = writer
        self.rng = np.random.default_rng(seed)
        self.step = 0
        self.weights: list[np.ndarray] = []
        """The weights fed, per step, in route order (token by token, layer by layer)."""

    def submit(self, reqs: list[str], counts: list[int], computed: list[int], **kw: Any) -> None:
        n = sum(counts)
        qsl = np.concatenate([[0], np.cumsum(counts)]).tolist()
        batch = StepBatch(reqs, qsl, computed, n)
        start = self.w.ring.reserve(n, self.w.wake, timeout=10)
        row = start % self.w.ring.capacity
        ids = np.argsort(self.rng.random((n, len(LAYERS), 8)), axis=2)[:, :, :TOP_K]
        self.w.ring.ids_np[row : row + n] = ids
        weights = self.rng.random((n, len(LAYERS), TOP_K)).astype(np.float32)
        self.w.ring.weights_np[row : row + n] = weights
        self.weights.append(weights.reshape(-1, TOP_K))
        prompts = {r: 3 for r, c in zip(reqs, computed, strict=True) if c == 0}
        finished = kw.get("finished", frozenset())
        self.w.submit(StepItem(batch, start, None, prompts, finished, self.step))
        self.step += 1

    def workload(self, num_reqs: int = 4, decode_steps: int = 5) -> None:
        reqs = [f"{i}-1a2b3c4d" for i in range(num_reqs)]
        self.submit(reqs, [3] * num_reqs, [0] * num_reqs)
        for d in range(decode_steps):
            self.submit(reqs, [1] * num_reqs, [3 + d] * num_reqs)


def _jsonl(path: Path) -> tuple[dict, list[dict], dict | None]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    end = lines[-1] if lines[-1]["type"] == "end" else None
    return lines[0], lines[1 : len(lines) - (end is not None)], end


def _parquet_routes(path: Path) -> list[tuple]:
    rows = []
    for name in part_names(path):
        t = pq.read_table(path / name, use_threads=False).to_pydict()
        rows += list(zip(*(t[c] for c in t), strict=True))
    return rows


def _end_of(path: Path) -> dict | None:
    last = pq.ParquetFile(path / part_names(path)[-1]).metadata.metadata
    return json.loads(last[END_KEY]) if END_KEY in last else None


def test_parquet_holds_the_same_routes_as_jsonl_with_weights_bit_exact(tmp_path: Path) -> None:
    feeds = {}
    for name in ("log.jsonl", "log.parquet"):
        w = _writer(tmp_path / name)
        feeds[name] = Feed(w)
        feeds[name].workload()
        w.close()
    meta, routes, end = _jsonl(tmp_path / "log.jsonl")
    assert meta == META and end is not None
    rows = _parquet_routes(tmp_path / "log.parquet")
    assert len(rows) == len(routes) == 4 * (3 + 5) * len(LAYERS)
    for r, (req, tok, layer, ids, weights, phase, step) in zip(routes, rows, strict=True):
        assert (r["req_id"], r["token_idx"], r["layer"], r["topk_ids"]) == (req, tok, layer, ids)
        assert (r["phase"], r["step"]) == (phase, step)
        # the JSONL line reads back as the very float32 the Parquet log holds
        as_float32 = np.array(r["topk_weights"], np.float32)
        assert as_float32.tobytes() == np.array(weights, np.float32).tobytes()
    fed = np.concatenate(feeds["log.parquet"].weights)
    logged = np.array([row[4] for row in rows], np.float32)
    assert logged.tobytes() == fed.tobytes()  # bit for bit what the router produced
    assert _end_of(tmp_path / "log.parquet") | {"closed": None} == end | {"closed": None}


def test_the_closing_record_counts_routes_requests_and_steps(tmp_path: Path) -> None:
    w = _writer(tmp_path / "log.jsonl")
    feed = Feed(w)
    feed.workload(num_reqs=3, decode_steps=2)
    feed.submit(["0-1a2b3c4d"], [1], [5], finished=frozenset({"1-1a2b3c4d", "2-1a2b3c4d"}))
    w.close()
    end = EndRecord.model_validate(_jsonl(tmp_path / "log.jsonl")[2])
    assert (end.routes, end.dropped, end.stopped) == ((9 + 6 + 1) * 2, 0, None)
    assert (end.requests, end.requests_unfinished, end.steps) == (3, 1, 4)
    assert end.closed is not None and end.closed.endswith("+00:00")


def test_logging_stopped_by_the_collector_is_said_in_the_closing_record(tmp_path: Path) -> None:
    w = _writer(tmp_path / "log.jsonl")
    feed = Feed(w)
    feed.workload(num_reqs=1, decode_steps=1)
    w.halt("RingFull: the writer has not freed host memory in 30 s")
    feed.submit(["0-1a2b3c4d"], [1], [4])  # refused: its rows go back at once
    w.close()
    end = _jsonl(tmp_path / "log.jsonl")[2]
    assert end["stopped"] == "RingFull: the writer has not freed host memory in 30 s"
    assert (end["routes"], end["dropped"]) == (8, 2)


def test_every_part_carries_the_meta_and_only_the_last_the_closing_record(tmp_path: Path) -> None:
    log = tmp_path / "log.parquet"
    w = _writer(log)
    w._sink.part_routes = 20  # type: ignore[attr-defined]
    Feed(w).workload(num_reqs=4, decode_steps=5)  # 64 routes: 3 full parts and the rest
    w.close()
    names = part_names(log)
    assert names == [f"part-{i:05d}.parquet" for i in range(4)]
    for i, name in enumerate(names):
        kv = pq.ParquetFile(log / name).metadata.metadata
        assert json.loads(kv[META_KEY]) == META
        assert (END_KEY in kv) == (i == len(names) - 1)
    assert sorted(os.listdir(log)) == [LOCK_NAME, *names]  # no temporary part left
    assert _end_of(log)["routes"] == len(_parquet_routes(log)) == 64


def test_a_part_is_closed_after_part_sec_while_the_log_stays_open(tmp_path: Path) -> None:
    log = tmp_path / "log.parquet"
    w = _writer(log, part_sec=0.2)
    Feed(w).workload(num_reqs=2, decode_steps=1)
    deadline = time.monotonic() + 5
    while not part_names(log) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert part_names(log) == ["part-00000.parquet"]  # readable before the engine stops
    assert len(_parquet_routes(log)) == 2 * 4 * len(LAYERS)
    assert _end_of(log) is None  # not closed yet: no closing record
    w.close()
    assert _end_of(log)["routes"] == 16


def test_a_clean_close_with_no_open_part_adds_a_part_without_rows(tmp_path: Path) -> None:
    log = tmp_path / "log.parquet"
    w = _writer(log)
    w.close()
    assert part_names(log) == ["part-00000.parquet"]
    assert pq.ParquetFile(log / "part-00000.parquet").metadata.num_rows == 0
    assert _end_of(log)["routes"] == 0


def test_an_existing_parquet_directory_is_refused_unless_overwrite_and_keeps_other_files(
    tmp_path: Path,
) -> None:
    log = tmp_path / "log.parquet"
    w = _writer(log)
    Feed(w).workload()
    w.close()
    (log / "notes.txt").write_text("mine")
    (log / temp_part_name(7)).write_bytes(b"half")
    before = sorted(os.listdir(log))
    with pytest.raises(HookRefusal, match=r"^moeprof: .* already exists and is not empty"):
        _writer(log)
    assert sorted(os.listdir(log)) == before
    ring = HostRing(16, len(LAYERS), TOP_K, pin=False)
    w = LogWriter(log, META, LAYERS, TOP_K, compat.external_request_id, True, ring)
    w.close()
    assert sorted(os.listdir(log)) == [LOCK_NAME, "notes.txt", "part-00000.parquet"]
    assert _end_of(log)["routes"] == 0


def test_a_second_writer_on_a_parquet_directory_is_refused_with_one_line(tmp_path: Path) -> None:
    log = tmp_path / "log.parquet"
    w = _writer(log)
    try:
        with pytest.raises(HookRefusal) as refused:
            ParquetSink(log, META, TOP_K, overwrite=True)
        message = str(refused.value)
        assert message.startswith(f"moeprof: {log} is being written by another process")
        assert "\n" not in message
    finally:
        w.close()
    assert _end_of(log)["routes"] == 0


def test_removing_a_parquet_directory_stops_logging_with_one_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moeprof.hook.writer as writer_module

    monkeypatch.setattr(writer_module.logger, "handlers", [caplog.handler])
    monkeypatch.setattr(writer_module.logger, "propagate", False)
    log = tmp_path / "log.parquet"
    w = _writer(log)
    feed = Feed(w)
    feed.workload(num_reqs=1, decode_steps=1)
    w.wake()
    deadline = time.monotonic() + 5
    while w.routes_written == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    shutil.rmtree(log)
    feed.submit(["0-1a2b3c4d"], [1], [4])
    w.wake()
    deadline = time.monotonic() + 5
    while not w.failed and time.monotonic() < deadline:
        time.sleep(0.01)
    w.close()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"the log file {log} was removed" in errors[0]
    assert w.stopped == "log removed" and not log.exists()


def test_a_file_at_a_parquet_path_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    log = tmp_path / "log.parquet"
    log.write_text("a file")
    with pytest.raises(HookRefusal, match="is not a directory"):
        ParquetSink(log, META, TOP_K, overwrite=True)
    assert log.read_text() == "a file"


@pytest.mark.parametrize("name", ["log.jsonl", "log.parquet"])
def test_steps_are_written_within_a_bounded_time_while_the_engine_never_idles(
    tmp_path: Path, name: str
) -> None:
    """A step every 2 ms, never a pause: the first steps are on disk long before the ring
    fills (the old writer waited for idleness or a half-full ring)."""
    log = tmp_path / name
    w = _writer(log, ring_rows=1 << 14, part_sec=0.3)
    feed = Feed(w)
    stop = threading.Event()

    def engine() -> None:
        reqs = [f"{i}" for i in range(4)]
        feed.submit(reqs, [3] * 4, [0] * 4)
        d = 0
        while not stop.is_set():
            feed.submit(reqs, [1] * 4, [3 + d] * 4)
            d += 1
            time.sleep(0.002)

    def on_disk() -> int:
        if name.endswith(".jsonl"):
            return log.read_bytes().count(b'"type":"route"')
        return len(_parquet_routes(log)) if part_names(log) else 0

    thread = threading.Thread(target=engine)
    thread.start()
    try:
        deadline = time.monotonic() + 2.0  # bound 0.5 s, generous margin for a busy machine
        while on_disk() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        written = on_disk()
        assert thread.is_alive() and written > 0
        assert w.ring.backlog * 2 < w.ring.capacity  # not the half-full-ring rule
    finally:
        stop.set()
        thread.join()
        w.close()


_FILL_TMPFS = """
import json, sys
from pathlib import Path
import numpy as np
from moeprof.hook import compat
from moeprof.hook.ring import HostRing
from moeprof.hook.rows import StepBatch
from moeprof.hook.writer import LogWriter, StepItem
from moeprof.layout import WEIGHT_FORMAT
log = Path(sys.argv[1])
meta = {"type": "meta", "model_id": "m", "layers_logged": [0, 1, 2, 3], "top_k": 4}
ring = HostRing(4096, 4, 4, pin=False)
w = LogWriter(log, meta, [0, 1, 2, 3], 4, compat.external_request_id, False, ring, part_sec=60)
if log.suffix == ".parquet":
    w._sink.part_routes = 4096
rng = np.random.default_rng(0)
for step in range(400):  # 64 tokens x 4 layers a step: far more than 300 KB either way
    start = ring.reserve(64, w.wake, 30)
    row = start % ring.capacity
    ring.ids_np[row : row + 64] = np.argsort(rng.random((64, 4, 60)), axis=2)[:, :, :4]
    ring.weights_np[row : row + 64] = rng.random((64, 4, 4))
    batch = StepBatch([str(step)], [0, 64], [0], 64)
    w.submit(StepItem(batch, start, None, {str(step): 64}, (), step))
    if step % 20 == 0:
        w.wake()
w.close()
print(json.dumps({"routes": w.routes_written, "dropped": w.dropped, "captured": w.captured}))
"""


def _fill_small_tmpfs(tmp_path: Path, name: str) -> tuple[dict, str, Path]:
    """Run the writer on a real 300 KB tmpfs in a private mount namespace; the log is copied
    out before the namespace goes."""
    if not shutil.which("unshare"):
        pytest.skip("unshare is not installed: cannot mount a small tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = tmp_path / "out"
    script = tmp_path / "fill.py"
    script.write_text(_FILL_TMPFS)
    log = mnt / name
    cmd = (
        f"mount -t tmpfs -o size=300k tmpfs {mnt} && {sys.executable} {script} {log}; "
        f"rc=$?; cp -a {log} {out}; exit $rc"
    )
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=300
    )
    if "mount" in proc.stderr and "permission denied" in proc.stderr.lower():
        pytest.skip(f"no permission to mount a tmpfs here: {proc.stderr.strip()}")
    if proc.returncode != 0 and "unshare" in proc.stderr:
        pytest.skip(f"unshare is not permitted here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr, out


def _stop_line(stderr: str, log_name: str) -> str:
    lines = [line for line in stderr.splitlines() if "stopped after" in line]
    assert len(lines) == 1, stderr
    assert "moeprof: logging to " in lines[0] and log_name in lines[0]
    assert "No space left on device" in lines[0] and lines[0].endswith("(the engine goes on)")
    return lines[0]


def test_a_full_disk_keeps_every_whole_line_that_fit_and_counts_exactly(tmp_path: Path) -> None:
    counts, stderr, out = _fill_small_tmpfs(tmp_path, "log.jsonl")
    _, routes, end = _jsonl(out)
    on_disk = len(routes)
    assert out.read_bytes().endswith(b"\n")
    assert out.stat().st_size > 250_000  # the disk was filled, not given up early
    assert counts["routes"] == on_disk and counts["dropped"] == 400 * 64 * 4 - on_disk
    line = _stop_line(stderr, "log.jsonl")
    assert f"stopped after {on_disk} routes on disk (" in line
    # the cut went back END_RESERVE bytes more, so the closing line fit
    assert end is not None, stderr
    assert (end["routes"], end["dropped"]) == (on_disk, counts["dropped"])
    assert "No space left on device" in end["stopped"]


def test_a_full_disk_keeps_the_closed_parquet_parts_and_removes_the_failed_one(
    tmp_path: Path,
) -> None:
    counts, stderr, out = _fill_small_tmpfs(tmp_path, "log.parquet")
    names = part_names(out)
    assert len(names) >= 2
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    on_disk = len(_parquet_routes(out))  # every part readable
    assert counts["routes"] == on_disk and counts["dropped"] == 400 * 64 * 4 - on_disk
    _stop_line(stderr, "log.parquet")
    end = _end_of(out)  # the failed part's space, given back, holds the closing part
    assert end is not None, stderr
    assert (end["routes"], end["dropped"]) == (on_disk, counts["dropped"])
    assert "No space left on device" in end["stopped"]


# --- the path, checked before vLLM starts (issue 15, defect 6) -----------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Any:
    for key in ("VLLM_LOG_MOE_OVERWRITE", "_MOEPROF_CHECKED_PATH", "VLLM_LOG_MOE_PART_SEC"):
        monkeypatch.delenv(key, raising=False)

    def use(path: Path, **extra: str) -> Any:
        monkeypatch.setenv("VLLM_LOG_MOE", str(path))
        for k, v in extra.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("_MOEPROF_CHECKED_PATH", raising=False)
        return load_config()

    return use


def test_the_sink_follows_the_paths_suffix(env: Any, tmp_path: Path) -> None:
    assert env(tmp_path / "r.parquet").sink == "parquet"
    assert env(tmp_path / "r.jsonl").sink == "jsonl"
    assert env(tmp_path / "r.parquet", VLLM_LOG_MOE_PART_SEC="2.5").part_sec == 2.5


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.symlink_to(p.parent / "nowhere.jsonl"), "is a dangling symbolic link"),
        (lambda p: p.mkdir(), "is a directory, not a file"),
        (lambda p: p.write_text("x"), "already exists"),
    ],
    ids=["dangling-symlink", "directory", "existing"],
)
def test_a_jsonl_path_that_cannot_be_a_new_log_is_refused_in_one_line(
    env: Any, tmp_path: Path, make: Any, message: str
) -> None:
    path = tmp_path / "log.jsonl"
    make(path)
    with pytest.raises(HookRefusal, match=message) as refused:
        env(path)
    assert "\n" not in str(refused.value)


def test_a_parquet_path_is_checked_as_a_directory(env: Any, tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    path.mkdir()
    assert env(path).sink == "parquet"  # an empty directory is fine
    (path / "part-00000.parquet").write_bytes(b"x")
    with pytest.raises(HookRefusal, match="already exists and is not empty"):
        env(path)
    assert env(path, VLLM_LOG_MOE_OVERWRITE="1").overwrite
    (tmp_path / "file.parquet").write_text("")
    with pytest.raises(HookRefusal, match="is not a directory"):
        env(tmp_path / "file.parquet", VLLM_LOG_MOE_OVERWRITE="1")
