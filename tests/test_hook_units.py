"""The hook's host side with plain arrays: row mapping, formatting, the writer thread, config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moeprof.hook import compat
from moeprof.hook.config import HookConfigError, load_config
from moeprof.hook.ring import HostRing, RingFull
from moeprof.hook.rows import RowMapper, StepBatch
from moeprof.hook.writer import LogWriter, StepItem, format_routes, route_template
from moeprof.schema import parse_meta, parse_route

META = {
    "type": "meta",
    "model_id": "m",
    "vllm_version": "v",
    "torch_version": "t",
    "device": "cpu",
    "seed": 1,
    "layers_logged": [3],
    "top_k": 2,
    "num_experts": 8,
}


def _batch(req_ids: list[str], counts: list[int], computed: list[int]) -> StepBatch:
    qsl = [0, *np.cumsum(counts).tolist()]
    return StepBatch(req_ids, qsl, computed, qsl[-1])


def _map(mapper: RowMapper, *steps: tuple[StepBatch, int]) -> list[tuple[str, int, int]]:
    """(req_id, token_idx, row) of every row logged, in log order."""
    mapped = mapper.map((batch, base, {}, ()) for batch, base in steps)
    req = np.repeat(np.array(mapped.seg_req, dtype=object), mapped.seg_len)
    return list(zip(req.tolist(), mapped.token_idx.tolist(), mapped.rows.tolist(), strict=True))


def test_rows_map_to_their_request_and_position() -> None:
    assert _map(RowMapper(), (_batch(["a", "b"], [3, 1], [0, 7]), 0)) == [
        ("a", 0, 0),
        ("a", 1, 1),
        ("a", 2, 2),
        ("b", 7, 3),
    ]


def test_steps_mapped_together_keep_their_order_and_their_own_rows() -> None:
    prefill = (_batch(["a", "b"], [2, 3], [0, 0]), 10)
    decode = (_batch(["b", "a"], [1, 1], [3, 2]), 40)  # the batch order changed
    assert _map(RowMapper(), prefill, decode) == [
        ("a", 0, 10),
        ("a", 1, 11),
        ("b", 0, 12),
        ("b", 1, 13),
        ("b", 2, 14),
        ("b", 3, 40),
        ("a", 2, 41),
    ]


def test_recomputed_tokens_after_preemption_are_dropped() -> None:
    mapper = RowMapper()
    _map(mapper, (_batch(["a"], [3], [0]), 0))  # tokens 0..2 logged, then "a" is preempted
    assert _map(mapper, (_batch(["a"], [5], [0]), 8)) == [("a", 3, 11), ("a", 4, 12)]
    mapped = mapper.map([(_batch(["a"], [2], [0]), 0, {}, ())])  # all of it seen already
    assert mapped.skipped == 2 and len(mapped.rows) == 0


def test_a_finished_request_id_used_again_starts_from_scratch() -> None:
    mapper = RowMapper()
    mapper.map([(_batch(["a"], [3], [0]), 0, {"a": 3}, ())])
    mapped = mapper.map([(_batch(["a"], [2], [0]), 0, {"a": 2}, {"a"})])  # new "a", same name
    assert mapped.skipped == 0
    assert mapped.token_idx.tolist() == [0, 1] and mapped.prefill.tolist() == [True, True]


def test_a_batch_layout_that_does_not_add_up_is_refused() -> None:
    batch = StepBatch(["a"], [0, 4], [0], 5)
    with pytest.raises(ValueError, match="does not add up"):
        RowMapper().map([(batch, 0, {}, ())])


def test_formatted_routes_parse_as_schema_records() -> None:
    text = format_routes(
        route_template(3, 2),
        ['"r-1"', '"r\\"2"'],
        np.array([0, 5]),
        np.array([[1, 7], [2, 0]], dtype=np.int32),
        np.array([[0.5, 0.25], [1e-8, 0.125]], dtype=np.float32),
        np.array([True, False]),
    )
    meta = parse_meta(json.dumps(META))
    routes = [parse_route(line, meta) for line in text.splitlines()]
    assert [r.req_id for r in routes] == ["r-1", 'r"2']
    assert routes[1].topk_weights == pytest.approx([1e-8, 0.125])
    assert [r.phase for r in routes] == ["prefill", "decode"]


def test_non_finite_weights_are_written_so_readers_can_name_them() -> None:
    text = format_routes(
        route_template(0, 2),
        ['"a"'],
        np.array([0]),
        np.array([[0, 1]]),
        np.array([[np.nan, np.inf]]),
        np.array([True]),
    )
    assert '"topk_weights":[NaN,Infinity]' in text


def _writer(path: Path, ring_rows: int = 64) -> LogWriter:
    ring = HostRing(ring_rows, 2, pin=False)
    return LogWriter(path, META, 3, 2, compat.external_request_id, overwrite=False, ring=ring)


def _item(
    w: LogWriter,
    batch: StepBatch,
    prompt_lens: dict[str, int] | None = None,
    finished: frozenset[str] = frozenset(),
) -> StepItem:
    """What the collector does for a step: rows into the ring, then the item."""
    n = batch.num_tokens
    start = w.ring.reserve(n, w.wake, timeout=5)
    row = start % w.ring.capacity
    w.ring.ids_np[row : row + n] = [1, 2]
    w.ring.weights_np[row : row + n] = 0.5
    return StepItem(batch, start, None, prompt_lens or {}, finished)


def test_writer_logs_every_real_token_once_with_phase_and_user_request_id(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    w = _writer(log)
    w.submit(_item(w, _batch(["0-1a2b3c4d"], [3], [0]), {"0-1a2b3c4d": 3}))  # prefill
    w.submit(_item(w, _batch(["0-1a2b3c4d"], [1], [3])))  # first decode step
    w.submit(_item(w, _batch(["0-1a2b3c4d"], [4], [0])))  # recomputed after preemption
    w.submit(_item(w, _batch(["0-1a2b3c4d"], [1], [4])))
    w.close()
    lines = log.read_text().splitlines()
    assert json.loads(lines[0])["layers_logged"] == [3]
    routes = [json.loads(line) for line in lines[1:]]
    assert [(r["req_id"], r["token_idx"], r["phase"]) for r in routes] == [
        ("0", 0, "prefill"),
        ("0", 1, "prefill"),
        ("0", 2, "prefill"),
        ("0", 3, "decode"),
        ("0", 4, "decode"),
    ]
    assert w.routes_written == 5


def test_writer_refuses_to_replace_an_existing_log(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("keep me\n")
    with pytest.raises(RuntimeError, match="already exists"):
        _writer(log)
    assert log.read_text() == "keep me\n"


def test_a_failing_write_stops_logging_and_keeps_the_log_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moeprof.hook.writer as writer_module

    real_write = writer_module.os.write
    calls = {"n": 0}

    def disk_fills_up(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:  # the meta header
            return real_write(fd, data)
        if calls["n"] == 2:  # half of the first step, then the disk is full
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module.os, "write", disk_fills_up)
    log = tmp_path / "log.jsonl"
    w = _writer(log)
    w.submit(_item(w, _batch(["a"], [2], [0])))
    w.submit(_item(w, _batch(["a"], [1], [2])))
    w.close()
    assert w.failed
    assert calls["n"] == 3  # the second step is never attempted
    errors = [r for r in caplog.records if "logging to" in r.getMessage()]
    assert len(errors) == 1 and "No space left" in errors[0].getMessage()
    text = log.read_text()
    assert text.endswith("\n")
    assert [json.loads(line)["type"] for line in text.splitlines()] == ["meta"]


def test_external_request_id_strips_the_engine_suffix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", raising=False)
    assert compat.external_request_id("cmpl-abc-0-1a2b3c4d") == "cmpl-abc-0"
    assert compat.external_request_id("7") == "7"
    monkeypatch.setenv("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "1")
    assert compat.external_request_id("cmpl-abc-0-1a2b3c4d") == "cmpl-abc-0-1a2b3c4d"


@pytest.mark.parametrize(
    ("layer", "message"), [("x", "is not a layer index"), ("-1", "must be >= 0")]
)
def test_bad_layer_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, layer: str, message: str
) -> None:
    monkeypatch.setenv("VLLM_LOG_MOE", str(tmp_path / "log.jsonl"))
    monkeypatch.setenv("VLLM_MOE_LAYER", layer)
    with pytest.raises(HookConfigError, match=message):
        load_config()


def test_plugin_with_the_flag_unset_imports_nothing_else() -> None:
    code = (
        "import os, sys; os.environ.pop('VLLM_LOG_MOE', None);"
        "from moeprof.hook.plugin import register; register();"
        "print(sorted(m for m in sys.modules if m.startswith(('moeprof', 'torch', 'vllm'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['moeprof', 'moeprof.hook', 'moeprof.hook.plugin']"


def test_steps_after_close_give_their_rows_back_instead_of_waiting(tmp_path: Path) -> None:
    w = _writer(tmp_path / "log.jsonl")
    w.close()
    item = _item(w, _batch(["a"], [3], [0]))
    assert w.ring.backlog == 3
    w.submit(item)
    assert w.ring.backlog == 0


def test_a_full_ring_wakes_the_writer_and_the_step_goes_on_once_rows_are_written(
    tmp_path: Path,
) -> None:
    """Steps far faster than the writer's tick: the model's thread waits for room instead of
    overwriting rows the writer has not rendered, and every token still lands once."""
    log = tmp_path / "log.jsonl"
    w = _writer(log, ring_rows=8)
    for step in range(40):  # 5 ring-fulls of 3-row steps, crossing the ring's end each time
        w.submit(_item(w, _batch(["a", "b", "c"], [1, 1, 1], [step] * 3), finished=frozenset()))
    w.close()
    routes = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    assert len(routes) == 120
    assert sorted((r["req_id"], r["token_idx"]) for r in routes) == sorted(
        (rid, t) for rid in "abc" for t in range(40)
    )


def test_a_ring_nobody_empties_gives_up_after_its_timeout() -> None:
    ring = HostRing(4, 2, pin=False)
    ring.reserve(3, lambda: None, timeout=1)
    woken = []
    with pytest.raises(RingFull, match="not freed host memory"):
        ring.reserve(2, lambda: woken.append(True), timeout=0.05)
    assert woken == [True]


def test_a_step_that_would_cross_the_ring_end_starts_at_row_zero() -> None:
    ring = HostRing(8, 2, pin=False)
    assert ring.reserve(5, lambda: None, timeout=1) == 0
    ring.release(5)
    start = ring.reserve(4, lambda: None, timeout=1)
    assert start == 8 and start % ring.capacity == 0
    assert ring.backlog == 7  # 4 rows plus the 3 skipped at the end


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2,
    reason="needs Linux thread affinity and at least 2 CPUs",
)
def test_the_writer_thread_leaves_the_cores_its_process_is_pinned_to(tmp_path: Path) -> None:
    """vLLM's CPU worker pins itself to its compute cores; the writer must not format there."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})  # as vLLM's OpenMP binding does to the worker
    try:
        w = _writer(tmp_path / "log.jsonl")
        deadline = time.monotonic() + 5
        while os.sched_getaffinity(w._thread.native_id) == {0} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert 0 not in os.sched_getaffinity(w._thread.native_id)
        w.close()
    finally:
        os.sched_setaffinity(0, before)
