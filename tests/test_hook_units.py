"""The hook's host side with plain arrays: row mapping, formatting, the writer thread, config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fakes import (
    FakeMoERunner,
    FakeRouter,
    loaded_worker,
    scheduled,
    v1_runner,
    worker_class,
)

from moeprof.errors import REFUSAL_PREFIX, HookRefusal
from moeprof.generate import failure_reason
from moeprof.hook import compat, config, install
from moeprof.hook.collector import StepCollector
from moeprof.hook.config import HookConfig, load_config
from moeprof.hook.ring import HostRing, RingFull
from moeprof.hook.rows import RowMapper, StepBatch
from moeprof.hook.writer import LogWriter, StepItem, format_routes, route_template
from moeprof.layers import parse_layers
from moeprof.schema import EndRecord, parse_meta, parse_route

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
    mapped = mapper.map((batch, base, {}, (), i) for i, (batch, base) in enumerate(steps))
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
    mapped = mapper.map([(_batch(["a"], [2], [0]), 0, {}, (), 2)])  # all of it seen already
    assert mapped.skipped == 2 and len(mapped.rows) == 0


def test_a_finished_request_id_used_again_starts_from_scratch() -> None:
    mapper = RowMapper()
    mapper.map([(_batch(["a"], [3], [0]), 0, {"a": 3}, (), 0)])
    mapped = mapper.map([(_batch(["a"], [2], [0]), 0, {"a": 2}, {"a"}, 1)])  # new "a", same name
    assert mapped.skipped == 0
    assert mapped.token_idx.tolist() == [0, 1] and mapped.prefill.tolist() == [True, True]


def test_a_batch_layout_that_does_not_add_up_is_refused() -> None:
    batch = StepBatch(["a"], [0, 4], [0], 5)
    with pytest.raises(ValueError, match="does not add up"):
        RowMapper().map([(batch, 0, {}, (), 0)])


def test_formatted_routes_parse_as_schema_records() -> None:
    text = format_routes(
        route_template(3, 2),
        ['"r-1"', '"r\\"2"'],
        np.array([0, 5]),
        np.array([[1, 7], [2, 0]], dtype=np.int32),
        np.array([[0.5, 0.25], [1e-8, 0.125]], dtype=np.float32),
        np.array([True, False]),
        step=np.array([4, 9]),
    )
    meta = parse_meta(json.dumps(META))
    routes = [parse_route(line, meta) for line in text.splitlines()]
    assert [r.req_id for r in routes] == ["r-1", 'r"2']
    assert routes[1].topk_weights == pytest.approx([1e-8, 0.125])
    assert [r.phase for r in routes] == ["prefill", "decode"]
    assert [r.step for r in routes] == [4, 9] and {r.layer for r in routes} == {3}


def test_non_finite_weights_are_written_so_readers_can_name_them() -> None:
    text = format_routes(
        route_template(0, 2),
        ['"a"'],
        np.array([0]),
        np.array([[0, 1]]),
        np.array([[np.nan, np.inf]]),
        np.array([True]),
        step=np.array([0]),
    )
    assert '"topk_weights":[NaN,Infinity]' in text


def _writer(path: Path, ring_rows: int = 64, layers: tuple[int, ...] = (3,)) -> LogWriter:
    ring = HostRing(ring_rows, len(layers), 2, pin=False)
    meta = META | {"layers_logged": list(layers)}
    return LogWriter(path, meta, layers, 2, compat.external_request_id, overwrite=False, ring=ring)


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
    step = w._submitted  # the collector numbers the steps it hands over
    return StepItem(batch, start, None, prompt_lens or {}, finished, step)


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
    assert json.loads(lines[-1])["type"] == "end"
    routes = [json.loads(line) for line in lines[1:-1]]
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
    with pytest.raises(HookRefusal, match=r"^moeprof: .* already exists"):
        _writer(log)
    assert log.read_text() == "keep me\n"


def test_writer_refuses_a_log_it_cannot_open(tmp_path: Path) -> None:
    with pytest.raises(HookRefusal, match=r"^moeprof: cannot open .* for writing"):
        _writer(tmp_path / "missing-dir" / "log.jsonl")


def test_a_failing_write_keeps_the_whole_lines_that_fit_and_reports_the_true_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moeprof.hook.sinks as sinks_module
    import moeprof.hook.writer as writer_module

    real_write = sinks_module.os.write
    calls = {"n": 0}

    def disk_fills_up(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:  # the meta header
            return real_write(fd, data)
        if calls["n"] == 2:  # the first line and a half of the piece, then the disk fails
            end = bytes(data).index(b"\n") + 5
            return real_write(fd, bytes(data[:end]))
        raise OSError(5, "Input/output error")  # a full disk: see test_hook_sinks (tmpfs)

    monkeypatch.setattr(sinks_module.os, "write", disk_fills_up)
    # the hook logs under vLLM's logger, which does not propagate once vLLM has configured it
    monkeypatch.setattr(writer_module.logger, "handlers", [caplog.handler])
    monkeypatch.setattr(writer_module.logger, "propagate", False)
    log = tmp_path / "log.jsonl"
    w = _writer(log)
    w.submit(_item(w, _batch(["a"], [2], [0])))
    w.submit(_item(w, _batch(["a"], [1], [2])))
    w.close()
    assert w.failed
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2
    assert f"moeprof: logging to {log} stopped after 1 routes on disk (2 dropped)" in errors[0]
    assert "Input/output error" in errors[0] and errors[0].endswith("(the engine goes on)")
    assert "the closing record could not be written" in errors[1]  # the disk still fails
    text = log.read_text()
    assert text.endswith("\n")
    assert [json.loads(line)["type"] for line in text.splitlines()] == ["meta", "route"]
    assert (w.routes_written, w.dropped) == (1, 2)


def test_external_request_id_strips_the_engine_suffix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", raising=False)
    assert compat.external_request_id("cmpl-abc-0-1a2b3c4d") == "cmpl-abc-0"
    assert compat.external_request_id("7") == "7"
    monkeypatch.setenv("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "1")
    assert compat.external_request_id("cmpl-abc-0-1a2b3c4d") == "cmpl-abc-0-1a2b3c4d"


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ("x", "VLLM_MOE_LAYER: 'x' is not a layer selection"),
        ("-1", "VLLM_MOE_LAYER: '-1' is not a layer selection"),
        ("3-1", "VLLM_MOE_LAYER: '3-1': range 3-1 runs backwards"),
        ("1,,2", "VLLM_MOE_LAYER: '1,,2' is not a layer selection"),
    ],
)
def test_bad_layer_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, layer: str, message: str
) -> None:
    monkeypatch.setenv("VLLM_LOG_MOE", str(tmp_path / "log.jsonl"))
    monkeypatch.setenv("VLLM_MOE_LAYER", layer)
    with pytest.raises(HookRefusal, match=f"^moeprof: {message}"):
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
    routes = [json.loads(line) for line in log.read_text().splitlines()[1:-1]]
    assert len(routes) == 120
    assert sorted((r["req_id"], r["token_idx"]) for r in routes) == sorted(
        (rid, t) for rid in "abc" for t in range(40)
    )


def test_a_ring_nobody_empties_gives_up_after_its_timeout() -> None:
    ring = HostRing(4, 1, 2, pin=False)
    ring.reserve(3, lambda: None, timeout=1)
    woken = []
    with pytest.raises(RingFull, match="not freed host memory"):
        ring.reserve(2, lambda: woken.append(True), timeout=0.05)
    assert woken == [True]


def test_a_step_that_would_cross_the_ring_end_starts_at_row_zero() -> None:
    ring = HostRing(8, 1, 2, pin=False)
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


# --- The one refusal type ------------------------------------------------------------------------


def test_a_refusal_carries_the_prefix_once_and_keeps_the_bare_reason() -> None:
    refusal = HookRefusal("layer 3 is busy")
    assert str(refusal) == f"{REFUSAL_PREFIX}layer 3 is busy" == "moeprof: layer 3 is busy"
    assert refusal.reason == "layer 3 is busy"
    assert isinstance(refusal, RuntimeError)


def test_generate_finds_the_refusal_reason_in_a_failed_engines_output(tmp_path: Path) -> None:
    reason = "VLLM_MOE_LAYER=7 is not an MoE layer of tiny; its MoE layers are 0-3"
    engine_log = tmp_path / "vllm-logged.log"
    engine_log.write_text(
        "INFO 11-30 starting\n"
        "(EngineCore pid=1) INFO [collector.py:120] moeprof: logging MoE layers 0-3 of tiny\n"
        "Traceback (most recent call last):\n"
        f"moeprof.errors.HookRefusal: {HookRefusal(reason)}\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
    )
    assert failure_reason(engine_log) == reason
    engine_log.write_text(
        "(EngineCore pid=1) INFO [collector.py:120] moeprof: logging MoE layers 0-3 of tiny\n"
        "Traceback (most recent call last):\n"
        "MemoryError: out of memory\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
    )
    assert failure_reason(engine_log) == "MemoryError: out of memory"  # not the hook's info line


# --- Configuration from the environment ----------------------------------------------------------


@pytest.fixture
def log_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fresh launch: VLLM_LOG_MOE set, nothing checked yet in this process."""
    path = tmp_path / "log.jsonl"
    monkeypatch.setenv(config.ENV_LOG, str(path))
    monkeypatch.delenv(config.ENV_LAYER, raising=False)
    monkeypatch.delenv(config.ENV_OVERWRITE, raising=False)
    monkeypatch.setenv("_MOEPROF_CHECKED_PATH", "")  # so that the marker is removed afterwards
    monkeypatch.delenv("_MOEPROF_CHECKED_PATH")
    return path


def test_config_reads_path_layer_and_overwrite(
    log_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(config.ENV_LAYER, " 12 ")
    assert load_config() == HookConfig(path=log_env, layers=parse_layers("12"), overwrite=False)
    monkeypatch.setenv(config.ENV_LAYER, "all")
    assert load_config().layers.is_all
    monkeypatch.setenv(config.ENV_LAYER, "0-2,5")
    assert load_config().layers.indices == (0, 1, 2, 5)
    for off in ("0", "false", ""):
        monkeypatch.setenv(config.ENV_OVERWRITE, off)
        assert load_config().overwrite is False


def test_an_existing_log_is_refused_unless_overwrite_is_set(
    log_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_env.write_text("precious\n")
    with pytest.raises(HookRefusal, match=r"already exists; remove it or set VLLM_LOG_MOE_OVERW"):
        load_config()
    monkeypatch.setenv(config.ENV_OVERWRITE, "1")
    assert load_config().overwrite is True
    assert log_env.read_text() == "precious\n"


def test_a_log_path_that_is_a_directory_is_refused(log_env: Path) -> None:
    log_env.mkdir()
    with pytest.raises(HookRefusal, match="is a directory, not a file"):
        load_config()


def test_a_log_in_a_missing_directory_is_refused(
    log_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(config.ENV_LOG, str(log_env.parent / "nope" / "log.jsonl"))
    with pytest.raises(HookRefusal, match=r"^moeprof: cannot write .*: .*nope does not exist$"):
        load_config()


def test_a_log_in_an_unwritable_directory_is_refused(
    log_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chmod does not stop root, so ask the question the hook asks, with the answer "no"
    monkeypatch.setattr(config.os, "access", lambda path, mode: False)
    with pytest.raises(HookRefusal, match="is not writable"):
        load_config()


def test_only_the_first_process_of_a_launch_checks_the_path(log_env: Path) -> None:
    """Workers inherit the marker: a sibling rank may have created its file by then."""
    load_config()
    log_env.write_text("a sibling rank's log\n")
    assert load_config().path == log_env


# --- Start-up against the loaded model, with plain fakes of vLLM's objects ----------------------


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """What compat imports from vLLM itself, for fakes: the MoE runner type, TP rank, version."""
    monkeypatch.setattr(compat, "moe_runner_class", lambda: FakeMoERunner)
    monkeypatch.setattr(compat, "tensor_parallel_rank", lambda: 0)
    monkeypatch.setattr(compat, "vllm_version", lambda: "0.0.fake")


def _start(worker: Any, tmp_path: Path, layer: int | str = 1) -> StepCollector | None:
    selection = parse_layers(str(layer))
    return StepCollector.start(worker, HookConfig(tmp_path / "log.jsonl", selection, False))


def test_engine_facts_are_read_from_the_config(fake_vllm: None) -> None:
    worker = loaded_worker([], data_parallel_size=2, data_parallel_rank=1, tensor_parallel_size=4)
    worker.vllm_config.compilation_config.max_cudagraph_capture_size = 512
    facts = compat.engine_facts(worker)
    assert facts.model_id == "fake/moe" and facts.seed == 1234 and facts.dtype == "bfloat16"
    assert facts.max_router_tokens == 512 * 2  # the largest graph, every DP rank's tokens
    assert (facts.data_parallel_rank, facts.tensor_parallel_size) == (1, 4)
    assert facts.num_experts == 8 and facts.speculative is False
    assert facts.device == torch.device("cpu")
    worker.vllm_config.model_config.get_num_experts = lambda: 0
    assert compat.engine_facts(worker).num_experts is None


def test_speculative_decoding_is_refused(fake_vllm: None, tmp_path: Path) -> None:
    worker = loaded_worker([FakeMoERunner(1)])
    worker.vllm_config.speculative_config = types.SimpleNamespace(num_speculative_tokens=3)
    with pytest.raises(HookRefusal, match=r"^moeprof: speculative decoding routes draft tokens"):
        _start(worker, tmp_path)
    assert not (tmp_path / "log.jsonl").exists()


def test_a_model_without_moe_layers_is_refused(fake_vllm: None, tmp_path: Path) -> None:
    with pytest.raises(HookRefusal, match=r"^moeprof: fake/moe has no MoE layer to log$"):
        _start(loaded_worker([]), tmp_path)


def test_a_layer_that_is_not_an_moe_layer_is_refused_with_the_moe_layers(
    fake_vllm: None, tmp_path: Path
) -> None:
    worker = loaded_worker([FakeMoERunner(i) for i in (0, 1, 2, 5)])
    with pytest.raises(
        HookRefusal,
        match=r"^moeprof: VLLM_MOE_LAYER=4 is not an MoE layer of fake/moe; "
        r"its MoE layers are 0-2, 5$",
    ):
        _start(worker, tmp_path, layer=4)


def test_a_pipeline_stage_without_the_layer_starts_nothing(fake_vllm: None, tmp_path: Path) -> None:
    worker = loaded_worker([FakeMoERunner(0), FakeMoERunner(1)], pipeline_parallel_size=2)
    assert _start(worker, tmp_path, layer=3) is None  # another stage holds layer 3
    assert not (tmp_path / "log.jsonl").exists()


def test_a_monolithic_kernel_is_refused(fake_vllm: None, tmp_path: Path) -> None:
    worker = loaded_worker([FakeMoERunner(1, monolithic=True)])
    with pytest.raises(HookRefusal, match=r"^moeprof: layer 1 runs a monolithic MoE kernel"):
        _start(worker, tmp_path)


def test_a_runner_without_a_router_is_an_unsupported_vllm(fake_vllm: None, tmp_path: Path) -> None:
    worker = loaded_worker([FakeMoERunner(1, router=types.SimpleNamespace(top_k=2))])
    with pytest.raises(
        HookRefusal,
        match=r"^moeprof: vLLM 0\.0\.fake is not supported: the MoE runner of layer 1 has no "
        r"router\._compute_routing \(moeprof knows vLLM ",
    ):
        _start(worker, tmp_path)


def test_tensor_parallel_ranks_other_than_0_log_nothing_but_refuse_alike(
    fake_vllm: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every TP rank routes the same tokens: rank 0 writes them, the others tap nothing. A
    layer that cannot be logged is refused on every rank."""
    monkeypatch.setattr(compat, "tensor_parallel_rank", lambda: 1)
    runner = FakeMoERunner(1)
    assert _start(loaded_worker([runner], tensor_parallel_size=2), tmp_path) is None
    assert "_compute_routing" not in vars(runner.router)
    assert not (tmp_path / "log.jsonl").exists()
    with pytest.raises(HookRefusal, match="monolithic"):
        _start(loaded_worker([FakeMoERunner(1, monolithic=True)], tensor_parallel_size=2), tmp_path)


def test_each_data_parallel_rank_writes_its_own_log(fake_vllm: None, tmp_path: Path) -> None:
    worker = loaded_worker([FakeMoERunner(1)], data_parallel_size=2, data_parallel_rank=1)
    collector = _start(worker, tmp_path)
    assert collector is not None
    collector.close()
    meta = json.loads((tmp_path / "log.dp1.jsonl").read_text().splitlines()[0])
    assert (meta["data_parallel_rank"], meta["data_parallel_size"]) == (1, 2)
    assert collector.capture.rows.shape == (64 * 2, 1, 4)  # both ranks' tokens reach the router


def test_meta_describes_the_engine_and_falls_back_to_the_routers_expert_count(
    fake_vllm: None, tmp_path: Path
) -> None:
    worker = loaded_worker([FakeMoERunner(1)])
    worker.vllm_config.model_config.get_num_experts = lambda: 0
    collector = _start(worker, tmp_path)
    assert collector is not None
    collector.close()
    meta = parse_meta((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert meta.model_id == "fake/moe" and meta.vllm_version == "0.0.fake"
    assert meta.layers_logged == [1] and meta.top_k == 2 and meta.num_experts == 8
    assert meta.dtype == "bfloat16" and meta.prefix_caching is False


# --- Reading a step ----------------------------------------------------------------------------


def _v2_runner(req_ids: list[str], qsl: list[int], computed: list[int], num_tokens: int) -> Any:
    """A Model Runner V2 between ``execute_model`` and ``sample_tokens``: arrays padded."""
    ns = types.SimpleNamespace
    pad = 4
    batch = ns(
        req_ids=req_ids,
        query_start_loc_np=np.array(qsl + [num_tokens] * pad, dtype=np.int32),
        num_computed_tokens_np=np.array(computed + [0] * pad, dtype=np.int32),
        num_tokens=np.int32(num_tokens),
    )
    return ns(execute_model_state=ns(input_batch=batch))


def test_the_v2_model_runner_batch_is_read_and_copied() -> None:
    runner = _v2_runner(["a", "b"], [0, 3, 4], [0, 9], 4)
    read = compat.step_batch_reader(runner)
    batch = read(6)  # V2 knows its real token count; the scheduled count is not used
    assert batch == StepBatch(["a", "b"], [0, 3, 4], [0, 9], 4)
    assert isinstance(batch.num_tokens, int)
    runner.execute_model_state.input_batch.num_computed_tokens_np[:] = 7  # reused next step
    assert batch.num_computed == [0, 9]
    runner.execute_model_state = types.SimpleNamespace(
        input_batch=_v2_runner(["c"], [0, 1], [5], 1).execute_model_state.input_batch
    )
    assert read(1) == StepBatch(["c"], [0, 1], [5], 1)  # read afresh every step


def test_the_v1_model_runner_batch_is_read_with_the_scheduled_token_count() -> None:
    runner = v1_runner([])
    runner.input_batch.req_ids = ["a", "b"]
    runner.input_batch.num_computed_tokens_cpu[:2] = [0, 9]
    runner.query_start_loc.np[:3] = [0, 3, 4]
    assert compat.step_batch_reader(runner)(4) == StepBatch(["a", "b"], [0, 3, 4], [0, 9], 4)


def test_a_model_runner_with_neither_batch_layout_is_unsupported(fake_vllm: None) -> None:
    with pytest.raises(HookRefusal, match="neither a V1 nor a V2 input batch"):
        compat.step_batch_reader(types.SimpleNamespace(execute_model_state=None))


def test_a_step_without_tokens_does_not_decide_which_runner_it_is() -> None:
    """V2 keeps no batch for an empty step; the runner is looked at once a step has tokens."""
    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(execute_model_state=None))
    read = compat.StepReader(worker)
    step = read(scheduled(0, finished=frozenset({"x"})))
    assert step == compat.ScheduledStep(frozenset({"x"}), None, {})
    worker.model_runner = _v2_runner(["a"], [0, 2], [0], 2)
    new = [types.SimpleNamespace(req_id="a", prompt_token_ids=[5, 6])]
    assert read(scheduled(2, new)) == compat.ScheduledStep(
        frozenset(), StepBatch(["a"], [0, 2], [0], 2), {"a": 2}
    )


def test_prompt_lengths_come_from_token_ids_or_embeddings() -> None:
    ns = types.SimpleNamespace
    new = [
        ns(req_id="ids", prompt_token_ids=[1, 2, 3]),
        ns(req_id="embeds", prompt_token_ids=None, prompt_embeds=torch.zeros(5, 8)),
        ns(req_id="neither", prompt_token_ids=None, prompt_embeds=None),
    ]
    assert compat.new_prompt_lens(scheduled(9, new)) == {"ids": 3, "embeds": 5, "neither": -1}


# --- The wiring into the worker, end to end with fakes -----------------------------------------


def _patched_worker_after_a_prefill(
    runners: list[FakeMoERunner], hook_config: HookConfig, warm_up_tokens: int = 0
) -> Any:
    """A fake worker class patched by the hook, started (load, warm-up), after the prefill step
    of request ``0-1a2b3c4d`` (prompt ``[7, 8, 9]``); its batch set for the first decode step."""
    cls = worker_class(runners, warm_up_tokens)
    install._patch_worker(types.SimpleNamespace(Worker=cls), hook_config)
    worker = cls()
    worker.load_model()
    worker.compile_or_warm_up_model()
    runner = worker.model_runner
    runner.input_batch.req_ids = ["0-1a2b3c4d"]
    runner.query_start_loc.np[:2] = [0, 3]
    new = [types.SimpleNamespace(req_id="0-1a2b3c4d", prompt_token_ids=[7, 8, 9])]
    assert worker.execute_model(scheduled(3, new)) == "output"  # prefill
    runner.input_batch.num_computed_tokens_cpu[0] = 3
    runner.query_start_loc.np[:2] = [0, 1]
    return worker


def test_a_patched_worker_logs_real_steps_after_warm_up_only(
    fake_vllm: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", raising=False)
    hook_config = HookConfig(tmp_path / "log.jsonl", parse_layers("1"), overwrite=False)
    runners = [FakeMoERunner(0), FakeMoERunner(1)]
    # a warm-up step (3 tokens of a made-up request), then the prefill
    worker = _patched_worker_after_a_prefill(runners, hook_config, warm_up_tokens=3)
    worker.execute_model(scheduled(1))  # first decode step
    worker.shutdown()
    assert worker.shut_down
    lines = hook_config.path.read_text().splitlines()
    meta = parse_meta(lines[0])
    routes = [parse_route(line, meta) for line in lines[1:-1]]  # the last: the end record
    assert [(r.req_id, r.token_idx, r.phase) for r in routes] == [
        ("0", 0, "prefill"),
        ("0", 1, "prefill"),
        ("0", 2, "prefill"),
        ("0", 3, "decode"),
    ]
    assert [r.topk_ids for r in routes] == [[0, 1], [2, 3], [4, 5], [0, 1]]
    assert routes[1].topk_weights == pytest.approx([0.27, 0.28])
    assert [r.step for r in routes] == [0, 0, 0, 1]  # the warm-up step is not counted
    assert "_compute_routing" not in vars(runners[0].router)  # only the logged layer is tapped


def test_after_logging_stops_the_closing_record_says_why_and_counts_the_steps_not_logged(
    fake_vllm: None, tmp_path: Path
) -> None:
    hook_config = HookConfig(tmp_path / "log.jsonl", parse_layers("1"), overwrite=False)
    runners = [FakeMoERunner(0), FakeMoERunner(1)]
    worker = _patched_worker_after_a_prefill(runners, hook_config)  # the prefill: logged
    runner = worker.model_runner
    good_ids = runner.input_batch.req_ids
    runner.input_batch.req_ids = None  # the batch cannot be read: logging stops here
    worker.execute_model(scheduled(1))
    runner.input_batch.req_ids = good_ids
    worker.execute_model(scheduled(1))  # after the stop: counted, not logged
    worker.shutdown()
    lines = hook_config.path.read_text().splitlines()
    end = EndRecord.model_validate_json(lines[-1])
    assert len(lines) == 1 + 3 + 1  # meta, the prefill's three routes, the closing record
    assert end.routes == 3 and end.dropped == 1
    assert end.stopped is not None and "TypeError" in end.stopped


def test_a_worker_module_without_the_worker_class_is_an_unsupported_vllm(
    fake_vllm: None, tmp_path: Path
) -> None:
    hook_config = HookConfig(tmp_path / "log.jsonl", parse_layers("1"), overwrite=False)
    with pytest.raises(HookRefusal, match=r"vllm\.v1\.worker\.gpu_worker\.Worker has changed"):
        install._patch_worker(types.SimpleNamespace(Worker=object), hook_config)


# --- Several layers in one log -----------------------------------------------------------------


def test_the_writer_emits_every_logged_layer_of_a_token_together(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    w = _writer(log, layers=(0, 2))
    n = 2
    start = w.ring.reserve(n, w.wake, timeout=5)
    row = start % w.ring.capacity
    w.ring.ids_np[row : row + n, 0] = [1, 2]  # layer 0
    w.ring.ids_np[row : row + n, 1] = [5, 6]  # layer 2
    w.ring.weights_np[row : row + n, 0] = 0.5
    w.ring.weights_np[row : row + n, 1] = 0.25
    w.submit(StepItem(_batch(["a"], [2], [0]), start, None, {"a": 2}, frozenset(), 7))
    w.close()
    lines = log.read_text().splitlines()
    meta = parse_meta(lines[0])
    routes = [parse_route(line, meta) for line in lines[1:-1]]  # the last: the end record
    assert [(r.token_idx, r.layer, r.topk_ids, r.topk_weights, r.step) for r in routes] == [
        (0, 0, [1, 2], [0.5, 0.5], 7),
        (0, 2, [5, 6], [0.25, 0.25], 7),
        (1, 0, [1, 2], [0.5, 0.5], 7),
        (1, 2, [5, 6], [0.25, 0.25], 7),
    ]
    assert w.stats()["routes"] == 4 and w.stats()["layers"] == 2


def test_all_logs_every_moe_layer_and_skips_dense_ones(fake_vllm: None, tmp_path: Path) -> None:
    """Layer 0 and 3 are dense (no MoE runner), as DeepSeek's first layers are."""
    runners = [FakeMoERunner(i, router=FakeRouter(shift=i)) for i in (1, 2, 4)]
    collector = _start(loaded_worker(runners), tmp_path, layer="all")
    assert collector is not None
    assert collector.capture.rows.shape == (64, 3, 4)  # token-major: every layer of a token
    for runner in runners:
        runner.router._compute_routing(torch.zeros(2, 4))
    ids = collector.capture.rows[:2, :, :2]
    assert ids[:, 0].tolist() == [[1, 2], [3, 4]]  # layer 1 in slot 0
    assert ids[:, 2].tolist() == [[4, 5], [6, 7]]  # layer 4 in slot 2
    collector.close()
    meta = parse_meta((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert meta.layers_logged == [1, 2, 4]


def test_naming_dense_layers_is_refused_with_the_moe_layers(
    fake_vllm: None, tmp_path: Path
) -> None:
    worker = loaded_worker([FakeMoERunner(i) for i in (1, 2, 4)])
    with pytest.raises(
        HookRefusal,
        match=r"^moeprof: VLLM_MOE_LAYER=0, 3 are not MoE layers of fake/moe; "
        r"its MoE layers are 1-2, 4$",
    ):
        _start(worker, tmp_path, layer="0-4")


def test_layers_with_different_top_k_are_refused(fake_vllm: None, tmp_path: Path) -> None:
    wide = FakeRouter()
    wide.top_k = 4
    worker = loaded_worker([FakeMoERunner(1), FakeMoERunner(2, router=wide)])
    with pytest.raises(HookRefusal, match="different numbers of experts"):
        _start(worker, tmp_path, layer="all")


def test_pipeline_stages_log_only_selections_they_hold_whole(
    fake_vllm: None, tmp_path: Path
) -> None:
    worker = loaded_worker([FakeMoERunner(0), FakeMoERunner(1)], pipeline_parallel_size=2)
    assert _start(worker, tmp_path, layer="2-3") is None  # the other stage's layers
    with pytest.raises(HookRefusal, match="this pipeline stage holds only layers 1 of them"):
        _start(worker, tmp_path, layer="1-2")
    with pytest.raises(HookRefusal, match="all with pipeline parallelism is not supported"):
        _start(worker, tmp_path, layer="all")
    collector = _start(worker, tmp_path, layer="0,1")
    assert collector is not None
    collector.close()


def test_the_host_ring_is_bounded_by_bytes_but_holds_two_of_the_largest_steps() -> None:
    from moeprof.hook.collector import RING_BYTES, ring_rows

    one_layer = ring_rows(max_tokens=8192, row_bytes=32)
    assert one_layer * 32 == RING_BYTES
    sixty_layers = ring_rows(max_tokens=8192, row_bytes=60 * 32)
    assert sixty_layers == 2 * 8192  # the floor, not 60 times the one-layer ring
    assert ring_rows(max_tokens=16, row_bytes=60 * 32) * 60 * 32 <= RING_BYTES


def test_a_patched_worker_numbers_its_steps_for_every_layer(
    fake_vllm: None, tmp_path: Path
) -> None:
    runners = [FakeMoERunner(i, router=FakeRouter(shift=3 * i)) for i in range(3)]
    worker = loaded_worker(runners)
    collector = _start(worker, tmp_path, layer="0,2")
    assert collector is not None
    collector.armed = True
    runner = worker.model_runner
    new = [types.SimpleNamespace(req_id="r", prompt_token_ids=[1, 2])]
    for step, (first, count) in enumerate([(0, 2), (2, 1), (3, 1)]):
        runner.input_batch.req_ids = ["r"]
        runner.input_batch.num_computed_tokens_cpu[0] = first
        runner.query_start_loc.np[:2] = [0, count]
        for r in runners:
            r.router._compute_routing(torch.zeros(count, 4))
        collector.after_step(scheduled(count, new if step == 0 else ()))
    collector.close()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    meta = parse_meta(lines[0])
    routes = [parse_route(line, meta) for line in lines[1:-1]]  # the last: the end record
    assert [(r.token_idx, r.layer, r.step, r.phase) for r in routes] == [
        (0, 0, 0, "prefill"),
        (0, 2, 0, "prefill"),
        (1, 0, 0, "prefill"),
        (1, 2, 0, "prefill"),
        (2, 0, 1, "decode"),
        (2, 2, 1, "decode"),
        (3, 0, 2, "decode"),
        (3, 2, 2, "decode"),
    ]
    assert routes[0].topk_ids == [0, 1] and routes[1].topk_ids == [6, 7]  # layer 2: shift 6


# --- A log removed or shared while it is written (issue 15) -------------------------------------


def _wait_until(cond: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(cond())


@pytest.fixture
def writer_errors(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], list[str]]:
    """The hook writer's logger into ``caplog`` alone; call it for the ERROR messages so far."""
    import moeprof.hook.writer as writer_module

    monkeypatch.setattr(writer_module.logger, "handlers", [caplog.handler])
    monkeypatch.setattr(writer_module.logger, "propagate", False)
    return lambda: [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_removing_the_logs_directory_stops_logging_with_one_error(
    tmp_path: Path, writer_errors: Callable[[], list[str]]
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "log.jsonl"
    w = _writer(log)
    w.submit(_item(w, _batch(["a"], [2], [0])))
    w.wake()
    assert _wait_until(lambda: w.routes_written == 2)
    shutil.rmtree(logs)  # the real thing: the file's last name goes with its directory
    w.submit(_item(w, _batch(["a"], [1], [2])))
    w.wake()
    assert _wait_until(lambda: w.failed)
    assert w.ring.backlog == 0
    for step in range(3):  # later steps are dropped at once, their rows given back
        w.submit(_item(w, _batch(["a"], [1], [3 + step])))
        assert w.ring.backlog == 0
    w.close()
    assert w.routes_written == 2
    errors = writer_errors()
    assert len(errors) == 1
    message = errors[0]
    assert f"the log file {log} was removed" in message
    assert "stopped after 2 routes" in message and "the engine goes on" in message
    assert not logs.exists()


def test_a_log_removed_after_its_last_flush_is_reported_at_close(
    tmp_path: Path, writer_errors: Callable[[], list[str]]
) -> None:
    log = tmp_path / "log.jsonl"
    w = _writer(log)
    w.submit(_item(w, _batch(["a"], [1], [0])))
    w.wake()
    assert _wait_until(lambda: w.routes_written == 1)
    log.unlink()
    w.close()
    w.close()
    assert w.failed
    errors = writer_errors()
    assert len(errors) == 1 and f"the log file {log} was removed" in errors[0]


_HOLD_LOG = """
import sys
from pathlib import Path
from moeprof.hook import compat
from moeprof.hook.ring import HostRing
from moeprof.hook.writer import LogWriter
meta = {"type": "meta", "layers_logged": [3]}
ring = HostRing(8, 1, 2, pin=False)
w = LogWriter(Path(sys.argv[1]), meta, [3], 2, compat.external_request_id, True, ring)
print("ready", flush=True)
sys.stdin.readline()
w.close()
"""


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_second_writer_on_the_same_log_is_refused_and_leaves_it_untouched(
    tmp_path: Path, overwrite: bool
) -> None:
    log = tmp_path / "log.jsonl"
    first = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOG, str(log)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "ready"
        held = log.read_bytes()
        assert held.startswith(b'{"type":"meta"')
        ring = HostRing(8, 1, 2, pin=False)
        with pytest.raises(HookRefusal) as refused:
            LogWriter(log, META, [3], 2, compat.external_request_id, overwrite, ring)
        message = str(refused.value)
        assert message.startswith("moeprof: ") and "\n" not in message
        if overwrite:
            assert f"{log} is being written by another process" in message
        else:  # refused before the lock is tried: the file exists
            assert "already exists" in message
        if f"pid {first.pid}" not in message:
            assert "(pid" not in message  # no pid where /proc/locks does not tell it
        assert log.read_bytes() == held  # not truncated, nothing interleaved
    finally:
        first.communicate("\n", timeout=30)
    assert first.returncode == 0
    w = LogWriter(log, META, [3], 2, compat.external_request_id, True, HostRing(8, 1, 2, pin=False))
    w.close()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0] == META and [r["type"] for r in lines] == ["meta", "end"]
