"""Which of a router's rows are this rank's tokens, under every data-parallel token layout.

The CPU build of vLLM cannot run data parallelism with an MoE model (its ``CpuCommunicator``
has no ``all_gatherv``, see ``test_parallel_vllm.py``), so the layouts are pinned here with fake
forward contexts (``SimpleNamespace``) shaped like vLLM's ``DPMetadata``, and once with vLLM's
own ``DPMetadata`` class where vLLM is installed. The layouts are those vLLM's own
``routed_experts_capturer.py`` handles: naive dispatch (every DP rank's tokens concatenated
before routing), a modular kernel (only this rank's), sequence parallelism (every rank's
padded shards), and no data parallelism.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from fakes import FakeRouter

from moeprof.errors import HookRefusal
from moeprof.hook import compat
from moeprof.hook.capture import RouteCapture
from moeprof.hook.collector import StepCollector
from moeprof.hook.config import HookConfig
from moeprof.hook.rows import StepBatch
from moeprof.layers import parse_layers

TOP_K = 2


def _dp(counts: list[int], local_sizes: list[int] | None = None) -> types.SimpleNamespace:
    """A forward pass's ``dp_metadata``: every DP rank's token count (a CPU tensor in vLLM)."""
    return types.SimpleNamespace(
        num_tokens_across_dp_cpu=torch.tensor(counts, dtype=torch.int32), local_sizes=local_sizes
    )


def _routes(n: int, first_token: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Router output for ``n`` tokens whose routing names them: token ``t`` picks experts
    ``(t, t + 100)`` with weights ``(t / 1000, 0.5)``."""
    t = torch.arange(first_token, first_token + n)
    ids = torch.stack([t, t + 100], dim=1).to(torch.int64)
    weights = torch.stack([t / 1000, torch.full((n,), 0.5)], dim=1).to(torch.float32)
    return ids, weights


def _captured(capture: RouteCapture, n: int, slot: int = 0) -> tuple[list, list]:
    rows = capture.rows[:n, slot]
    return rows[:, :TOP_K].tolist(), rows[:, TOP_K:].contiguous().view(torch.float32).tolist()


# --- rank_rows: the layouts -------------------------------------------------------------------


def test_without_data_parallelism_every_row_is_this_ranks() -> None:
    assert compat.rank_rows(7, 0, None) == (0, 7)


def test_naive_dispatch_puts_each_ranks_tokens_after_those_of_the_lower_ranks() -> None:
    meta = _dp([5, 3, 4])  # the router sees all 12 tokens, rank 0's first
    assert [compat.rank_rows(12, r, meta) for r in range(3)] == [(0, 5), (5, 3), (8, 4)]


def test_a_modular_kernel_routes_only_this_ranks_tokens() -> None:
    meta = _dp([5, 3])  # the DP exchange happens inside the experts' kernel, after routing
    assert compat.rank_rows(5, 0, meta) == (0, 5)
    assert compat.rank_rows(3, 1, meta) == (0, 3)


def test_ranks_padded_to_one_count_under_cuda_graphs_take_whole_padded_spans() -> None:
    meta = _dp([8, 8])  # 5 and 3 real tokens, each rank padded to the graph's 8
    assert compat.rank_rows(16, 1, meta) == (8, 8)  # the host reads the first 3 of them


def test_an_idle_rank_before_this_one_leaves_the_span_at_row_zero() -> None:
    meta = _dp([0, 4])  # naive and modular layouts look alike here, and agree
    assert compat.rank_rows(4, 1, meta) == (0, 4)


def test_sequence_parallel_naive_dispatch_skips_the_padded_shards_of_lower_ranks() -> None:
    # 5 and 3 tokens, SP size 2: shards of ceil(5/2)=3 and ceil(3/2)=2 rows, DP-then-TP order
    meta = _dp([5, 3], local_sizes=[3, 3, 2, 2])
    assert compat.rank_rows(10, 0, meta) == (0, 5)  # rows 0-4, row 5 is padding
    assert compat.rank_rows(10, 1, meta) == (6, 3)  # rows 6-8, row 9 is padding


def test_a_sequence_parallel_shard_under_a_modular_kernel_matches_no_layout() -> None:
    # each TP rank routes ceil(5/2)=3 of its DP rank's 5 tokens: only a collective could
    # reassemble them, so the capture does not guess
    assert compat.rank_rows(3, 0, _dp([5, 3])) is None


def test_layouts_whose_tokens_no_rank_router_sees_whole_are_refused_at_load() -> None:
    ns = types.SimpleNamespace
    sp_modular = ns(
        moe_config=ns(pcp_size=1, is_sequence_parallel=True), do_naive_dispatch_combine=False
    )
    with pytest.raises(HookRefusal, match=r"^moeprof: layer 3: sequence-parallel MoE with a"):
        compat.refuse_unsupported_token_layout(sp_modular, 3)
    pcp = ns(moe_config=ns(pcp_size=2, is_sequence_parallel=False), do_naive_dispatch_combine=True)
    with pytest.raises(HookRefusal, match="prefill context parallelism"):
        compat.refuse_unsupported_token_layout(pcp, 3)
    sp_naive = ns(
        moe_config=ns(pcp_size=1, is_sequence_parallel=True), do_naive_dispatch_combine=True
    )
    compat.refuse_unsupported_token_layout(sp_naive, 3)  # the router sees every shard
    compat.refuse_unsupported_token_layout(ns(), 3)  # a runner without a config: nothing known


def test_the_layouts_are_read_from_vllms_own_forward_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Against vLLM's real ``DPMetadata`` (its field names and its SP shard sizes)."""
    fc = pytest.importorskip("vllm.forward_context")
    read = compat.rank_rows_reader(dp_rank=1)
    assert read(6) == (0, 6)  # outside a forward pass: nothing to slice
    meta = fc.DPMetadata(torch.tensor([5, 3], dtype=torch.int32))
    monkeypatch.setattr(fc, "_forward_context", types.SimpleNamespace(dp_metadata=meta))
    assert read(8) == (5, 3)  # naive dispatch
    assert read(3) == (0, 3)  # modular kernel
    with meta.sp_local_sizes(2):  # what a sequence-parallel MoE layer runs inside
        assert read(10) == (6, 3)
    monkeypatch.setattr(fc, "_forward_context", types.SimpleNamespace(dp_metadata=None))
    assert read(8) == (0, 8)


# --- The capture: only this rank's span reaches the buffer ------------------------------------


def test_a_capture_copies_only_this_ranks_span_to_row_zero() -> None:
    meta = _dp([5, 3])
    capture = RouteCapture(
        16, 2, TOP_K, torch.device("cpu"), lambda n: compat.rank_rows(n, 1, meta)
    )
    ids, weights = _routes(8)  # tokens 0-4: rank 0's, 5-7: rank 1's (naive dispatch)
    capture.tap(1)(ids, weights)
    got_ids, got_weights = _captured(capture, 3, slot=1)
    assert got_ids == [[5, 105], [6, 106], [7, 107]]
    assert got_weights == weights[5:8].tolist()  # float32 bit for bit
    assert capture.take_unmatched() is None


def test_a_capture_without_a_layout_copies_every_row() -> None:
    capture = RouteCapture(16, 1, TOP_K, torch.device("cpu"))
    capture.tap(0)(*_routes(8))
    assert _captured(capture, 8)[0] == [[t, t + 100] for t in range(8)]
    assert capture.take_unmatched() is None


def test_a_router_output_of_no_known_layout_is_not_copied_but_remembered() -> None:
    capture = RouteCapture(16, 1, TOP_K, torch.device("cpu"), lambda n: None)
    capture.tap(0)(*_routes(4))
    assert capture.rows.count_nonzero() == 0
    assert capture.take_unmatched() == 4
    assert capture.take_unmatched() is None  # taken once


def test_the_span_is_asked_at_run_time_not_traced_into_a_compiled_graph() -> None:
    """Dynamo traces vLLM's router on the CPU build: the span must follow each forward pass's
    token counts, not the ones seen while tracing."""
    context = {"meta": _dp([5, 3])}
    capture = RouteCapture(
        16, 1, TOP_K, torch.device("cpu"), lambda n: compat.rank_rows(n, 1, context["meta"])
    )
    tap = capture.tap(0)

    def router(x: torch.Tensor) -> torch.Tensor:
        weights, ids = torch.topk(x.softmax(dim=-1), TOP_K, dim=-1)
        tap(ids, weights)
        return weights.sum()

    compiled = torch.compile(router, backend="aot_eager", fullgraph=True)
    x = torch.randn(8, 16)
    expected = torch.topk(x.softmax(dim=-1), TOP_K, dim=-1)[1]
    compiled(x)
    assert _captured(capture, 3)[0] == expected[5:8].tolist()
    context["meta"] = _dp([2, 6])  # same shapes, another split: no retrace
    compiled(x)
    assert _captured(capture, 6)[0] == expected[2:8].tolist()


# --- The collector: each DP rank's log holds its own tokens -----------------------------------


def _facts(dp_rank: int, dp_size: int) -> compat.EngineFacts:
    return compat.EngineFacts(
        model_id="fake/moe",
        seed=0,
        dtype="float32",
        enforce_eager=True,
        prefix_caching=False,
        cudagraph_mode="NONE",
        speculative=False,
        pipeline_parallel_size=1,
        tensor_parallel_size=1,
        tensor_parallel_rank=0,
        data_parallel_rank=dp_rank,
        data_parallel_size=dp_size,
        max_router_tokens=64 * dp_size,
        num_experts=200,
        device=torch.device("cpu"),
    )


def _log_dp_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dp_rank: int, meta: Any, router_rows: int
) -> tuple[StepCollector, list[dict]]:
    """One prefill step of request ``"r"`` (this rank's ``counts[dp_rank]`` tokens) on DP rank
    ``dp_rank`` of two, its router returning ``router_rows`` rows that name their tokens'
    positions in the gathered batch; the routes its log holds."""
    monkeypatch.setattr(
        compat, "rank_rows_reader", lambda r: lambda n: compat.rank_rows(n, r, meta)
    )
    monkeypatch.setattr(compat, "vllm_version", lambda: "0.0.fake")
    router = FakeRouter()  # returns what the test sets in ``output``
    n = int(meta.num_tokens_across_dp_cpu[dp_rank]) if meta is not None else router_rows
    batch = StepBatch(["r"], [0, n], [0], n)
    step = compat.ScheduledStep(frozenset(), batch, {"r": n})
    config = HookConfig(tmp_path / "log.jsonl", parse_layers("0"), overwrite=False)
    routers = {0: compat.Router(router, TOP_K, 200)}
    collector = StepCollector.open(_facts(dp_rank, 2), routers, config, lambda _: step)
    collector.armed = True
    tap_target = routers[0].router
    router.output = _routes(router_rows)
    tap_target._compute_routing(torch.zeros(router_rows, 4))
    collector.after_step(object())
    collector.close()
    path = tmp_path / f"log.dp{dp_rank}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return collector, [r for r in records if r.get("type") == "route"]


@pytest.mark.parametrize(
    ("dp_rank", "router_rows", "expected_first_row"),
    [
        (0, 8, 0),  # naive dispatch: rank 0's 5 tokens lead the 8 rows
        (1, 8, 5),  # naive dispatch: rank 1's 3 tokens follow them (the bug logged rows 0-2)
        (1, 3, 0),  # modular kernel: the router saw rank 1's 3 tokens only
    ],
)
def test_each_dp_rank_logs_its_own_tokens_routes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dp_rank: int,
    router_rows: int,
    expected_first_row: int,
) -> None:
    _, routes = _log_dp_rank(tmp_path, monkeypatch, dp_rank, _dp([5, 3]), router_rows)
    n = [5, 3][dp_rank]
    assert [r["token_idx"] for r in routes] == list(range(n))
    assert [r["topk_ids"] for r in routes] == [
        [t, t + 100] for t in range(expected_first_row, expected_first_row + n)
    ]


def test_a_router_output_of_no_known_layout_stops_logging_but_not_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    collector, routes = _log_dp_rank(tmp_path, monkeypatch, 0, _dp([5, 3]), router_rows=3)
    assert routes == [] and collector.disabled
    assert "a router returned 3 rows, which match none of the data-parallel" in caplog.text
