"""analyze's load statistics the fast way give the numbers of the general path.

The fused accumulators (one ``np.bincount`` over every (layer, phase) stream of a chunk) against
one ``RoutingAccumulator`` per stream; the Parquet reader's projected read (``load_chunks``:
layer, phase, ids, weights only) against the full read and against the same log as JSON Lines,
bad rows included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from logfactory import (
    assert_close,
    bad_routes,
    foreign_parquet_table,
    meta,
    parquet_twin,
    route,
    sequential_routes,
    skewed_routes,
    twin_logs,
    write_log,
    write_parquet_log,
)

from moeprof.analysis.accumulate import (
    MAX_COSELECT_EXPERTS,
    ImplausibleExpertIdError,
    LayerPhaseAccumulators,
    RoutingAccumulator,
    load_statistics,
)
from moeprof.analysis.analyze import PHASE_NAMES, _jsonable, analyze_log
from moeprof.analysis.reader import Issue, LogError, open_log
from moeprof.analysis.sources import open_one
from moeprof.schema import NO_PHASE, PHASES

LAYERS = (3, 7, 11)
FLOAT_RTOL = 1e-12
"""Float sums may add the same terms in another order (runs of a stream, square sums): float64
rounding apart, they are equal."""


def _random_chunks(
    seed: int, slots: int, experts: int, k: int = 4, chunks: int = 3
) -> list[tuple[np.ndarray, ...]]:
    """(slot, phase, ids, weights) chunks: streams interleaved row by row and in runs, every
    phase code, distinct ids, weights largest first except in some rows."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(chunks):
        n = 500 + 137 * c
        slot = rng.integers(0, slots, n) if c % 2 else np.sort(rng.integers(0, slots, n))
        phase = rng.integers(NO_PHASE, len(PHASES), n).astype(np.int8)
        ids = np.argsort(rng.random((n, experts)), axis=1)[:, :k].astype(np.int64)
        weights = -np.sort(-rng.random((n, k)).astype(np.float32), axis=1)
        weights[::17] = weights[::17, ::-1]  # a few rows out of order
        out.append((slot.astype(np.int64), phase, ids, weights))
    return out


def _per_stream(chunks: list[tuple[np.ndarray, ...]], num_experts: int | None) -> dict:
    """The reference: one RoutingAccumulator per (slot, phase), fed its rows of each chunk."""
    accs: dict[tuple[int, int], RoutingAccumulator] = {}
    for slot, phase, ids, weights in chunks:
        for s, p in sorted(set(zip(slot.tolist(), phase.tolist(), strict=True))):
            rows = (slot == s) & (phase == p)
            acc = accs.setdefault((s, p), RoutingAccumulator(num_experts))
            acc.add(ids[rows], weights[rows])
    return accs


def _assert_same_sums(got: RoutingAccumulator, want: RoutingAccumulator) -> None:
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(got.counts, want.counts)
    if want.pair_counts is None:
        assert got.pair_counts is None
    else:
        assert got.pair_counts is not None
        np.testing.assert_array_equal(got.pair_counts, want.pair_counts)
    np.testing.assert_allclose(got.expert_weight_sums, want.expert_weight_sums, rtol=FLOAT_RTOL)
    for name in ("top1_weight_sum", "token_weight_sum", "token_weight_sq_sum"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=FLOAT_RTOL), name
    assert want.rank_weight_sums is not None and got.rank_weight_sums is not None
    np.testing.assert_allclose(got.rank_weight_sums, want.rank_weight_sums, rtol=FLOAT_RTOL)


@pytest.mark.parametrize("num_experts", [60, None])
def test_fused_sums_equal_one_accumulator_per_stream(num_experts: int | None) -> None:
    chunks = _random_chunks(1, slots=3, experts=60)
    fused = LayerPhaseAccumulators(num_experts)
    for chunk in chunks:
        fused.add(*chunk)
    want = _per_stream(chunks, num_experts)
    for slot in range(3):
        got = fused.by_phase(slot)
        assert sorted(got) == sorted(p for s, p in want if s == slot)
        for phase, acc in got.items():
            _assert_same_sums(acc, want[(slot, phase)])
    assert fused.widest() == max(a.counts.size for a in want.values())


def test_streams_drop_their_coselection_on_their_own_without_num_experts() -> None:
    """Ids reaching MAX_COSELECT_EXPERTS in one stream of a log without num_experts: that
    stream drops its co-selection matrix, the others keep theirs, as per-stream accumulators
    do."""
    chunks = _random_chunks(2, slots=2, experts=40, chunks=2)
    slot, phase, ids, weights = chunks[1]
    wide = (slot == 1) & (phase == 0)
    ids = ids.copy()
    ids[wide, 0] = MAX_COSELECT_EXPERTS + 3
    chunks[1] = (slot, phase, ids, weights)
    fused = LayerPhaseAccumulators(None)
    for chunk in chunks:
        fused.add(*chunk)
    want = _per_stream(chunks, None)
    assert want[(1, 0)].pair_counts is None and want[(0, 0)].pair_counts is not None
    for s in range(2):
        for phase, acc in fused.by_phase(s).items():
            _assert_same_sums(acc, want[(s, phase)])


def test_an_implausible_expert_id_is_refused() -> None:
    ids = np.array([[1 << 17, 2, 3, 4]], np.int64)
    with pytest.raises(ImplausibleExpertIdError, match="131072"):
        LayerPhaseAccumulators(None).add(
            np.zeros(1, np.int64), np.zeros(1, np.int8), ids, np.ones((1, 4), np.float32)
        )


# --------------------------------------------------------------------------- logs

HEADER = meta(layers_logged=list(LAYERS), moeprof_version="0.1.0")


def _twins(tmp_path: Path, header: dict[str, Any] = HEADER) -> tuple[Path, Path]:
    body = skewed_routes(n_requests=5, prompt=16, generated=10, layers=LAYERS)
    return twin_logs(tmp_path, body, header, parts=3)


def _counts(path: Path | list[Path]) -> dict[tuple[int, int], list[int]]:
    log = open_one(path)
    stats = load_statistics(log)
    return {
        (slot, phase): c.tolist()
        for slot in range(len(log.layers))
        for phase, c in stats.by_phase(slot).items()
    }


def test_load_statistics_of_parquet_equal_jsonl_and_analyze(tmp_path: Path) -> None:
    jsonl, parquet = _twins(tmp_path)
    got = _counts(parquet)
    assert got == _counts(jsonl)
    assert {p for _, p in got} == {PHASES.index("prefill"), PHASES.index("decode")}
    report = analyze_log(jsonl)
    for slot, layer in enumerate(report.layers):
        assert layer.layer == LAYERS[slot]
        for phase_name, stats in layer.by_phase.items():
            phase = next(p for p, n in PHASE_NAMES.items() if n == phase_name)
            assert got[(slot, phase)] == stats.counts
    # the whole analysis too: counts exactly, floats as test_parquet_reader compares them (a
    # std computed as sqrt(E[x^2] - E[x]^2) turns float64 rounding into ~1e-8 when x is
    # near-constant)
    a, b = (_jsonable(analyze_log(p).layers) for p in (jsonl, parquet))
    assert_close(a, b)


def test_projected_columns_equal_the_full_read(tmp_path: Path) -> None:
    _, parquet = _twins(tmp_path)
    log = open_log(parquet)
    full = list(log.chunks())
    lines = log.lines_read
    projected = list(log.load_chunks())
    assert log.lines_read == lines and log.end is not None
    for field in ("layer", "phase", "ids"):
        a = np.concatenate([getattr(c, field) for c in full])
        b = np.concatenate([getattr(c, field) for c in projected])
        np.testing.assert_array_equal(a, b, err_msg=field)
    a = np.concatenate([c.weights for c in full])
    b = np.concatenate([c.weights for c in projected if c.weights is not None])
    assert a.dtype == b.dtype == np.float32 and a.tobytes() == b.tobytes()
    assert all(c.weights is None for c in log.load_chunks(weights=False))


def test_counts_without_num_experts_end_at_each_streams_largest_id(tmp_path: Path) -> None:
    jsonl, parquet = _twins(tmp_path, meta(layers_logged=list(LAYERS), num_experts=None))
    got = _counts(parquet)
    assert got == _counts(jsonl)
    sums = LayerPhaseAccumulators(None)
    log = open_log(jsonl)
    for c in log.chunks():
        sums.add(log.layer_slot(c.layer), c.phase, c.ids, c.weights)
    for (slot, phase), counts in got.items():
        assert counts == sums.by_phase(slot)[phase].counts.tolist()
        assert counts[-1] > 0


def test_rank_files_load_as_one_run(tmp_path: Path) -> None:
    paths = []
    for r in (0, 1):
        body = sequential_routes({f"{r}a": 5, f"{r}b": 3}, layers=LAYERS)
        header = meta(
            layers_logged=list(LAYERS),
            moeprof_version="0.1.0",
            data_parallel_size=2,
            data_parallel_rank=r,
        )
        paths.append(write_parquet_log(tmp_path / f"routes.dp{r}.parquet", body, header, parts=2))
        write_log(tmp_path / f"routes.dp{r}.jsonl", body, header)
    got = _counts(paths)
    assert got == _counts([tmp_path / "routes.dp0.jsonl", tmp_path / "routes.dp1.jsonl"])
    assert sum(sum(c) for c in got.values()) == 2 * 8 * len(LAYERS) * 4


def test_bad_rows_read_projected_give_the_full_reads_errors(tmp_path: Path) -> None:
    # bad_routes' negative token_idx is in a column load_chunks does not read
    jsonl = write_log(tmp_path / "bad.jsonl", bad_routes())
    parquet = parquet_twin(jsonl, tmp_path / "bad.parquet", parts=2)
    full: list[Issue] = []
    kept = sum(len(c) for c in open_log(parquet).chunks(full.append))
    projected: list[Issue] = []
    log = open_log(parquet)
    rows = sum(len(c) for c in log.load_chunks(projected.append))
    # every rule on a column read is checked, with the full read's reason and place; the
    # token_idx rule is validate's (and analyze's) to check
    assert projected == [i for i in full if "token_idx" not in i.message]
    assert len(projected) == 4 and rows == kept + 1
    lenient: list[Issue] = []
    assert sum(len(c) for c in log.load_chunks(lenient.append, weights=False)) == rows + 1
    assert lenient == [i for i in projected if "nan" not in i.message.lower()]
    # without a sink the first error stops the pass, in the words of the full read
    with pytest.raises(LogError) as full_error:
        list(open_log(parquet).chunks())
    with pytest.raises(LogError) as stats_error:
        load_statistics(open_log(parquet))
    assert str(stats_error.value) == str(full_error.value)
    assert "row 3: topk_ids repeats an expert: [5, 5, 6, 7]" in str(stats_error.value)
    with pytest.raises(LogError) as jsonl_error:
        load_statistics(open_log(jsonl))
    assert str(jsonl_error.value).endswith(str(full_error.value).split(": row 3: ")[1])


def test_other_writers_columns_read_projected_as_in_full(tmp_path: Path) -> None:
    """Variable lists of int64 (one row short of top_k), float64 weights, a null phase column,
    no step: the projected read keeps and refuses the rows the full read does."""
    body = sequential_routes({"x": 5, "y": 4}, steps=False)
    body[3] = route("x", 3, ids=[0, 1, 2])  # three ids at top_k=4
    table = foreign_parquet_table(body)
    path = tmp_path / "f.parquet"
    pq.write_table(table, path)
    full: list[Issue] = []
    chunks = list(open_log(path).chunks(full.append))
    projected: list[Issue] = []
    loads = list(open_log(path).load_chunks(projected.append))
    assert projected == full and [i.row for i in full] == [4]
    for field in ("layer", "phase", "ids", "weights"):
        a = np.concatenate([getattr(c, field) for c in chunks])
        b = np.concatenate([getattr(c, field) for c in loads])
        assert a.tobytes() == b.astype(a.dtype).tobytes(), field
