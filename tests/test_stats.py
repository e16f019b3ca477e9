"""Statistics, running sums and position sets against hand-computed values on tiny inputs
(contamination: tests/test_foreign_logs.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moeprof.analysis import coselection, load_balance
from moeprof.analysis.accumulate import (
    ImplausibleExpertIdError,
    LayerPhaseAccumulators,
    RoutingAccumulator,
)
from moeprof.analysis.positions import PositionSet
from moeprof.analysis.summary import summarize


def test_entropy_of_uniform_load_is_log2_of_the_expert_count() -> None:
    assert load_balance.entropy_bits(np.full(60, 7)) == pytest.approx(math.log2(60))
    assert load_balance.max_entropy_bits(60) == pytest.approx(5.906890595608519)
    assert load_balance.entropy_ratio(np.full(60, 7)) == pytest.approx(1.0)


def test_entropy_of_one_hot_load_is_zero() -> None:
    counts = np.zeros(8)
    counts[3] = 10
    assert load_balance.entropy_bits(counts) == 0.0
    assert load_balance.entropy_ratio(counts) == 0.0


def test_entropy_by_hand() -> None:
    # shares 1/2, 1/4, 1/4 -> 0.5*1 + 2 * 0.25*2 = 1.5 bits
    assert load_balance.entropy_bits(np.array([2, 1, 1])) == pytest.approx(1.5)


def test_gini_is_zero_for_equal_load_and_n_minus_1_over_n_for_one_hot() -> None:
    assert load_balance.gini(np.full(10, 3)) == pytest.approx(0.0)
    assert load_balance.gini(np.array([0, 0, 0, 9])) == pytest.approx(3 / 4)


def test_gini_by_hand() -> None:
    # sorted 1,2,3,4: sum (2i-n-1) x_i = -3 - 2 + 3 + 12 = 10; / (4 * 10)
    assert load_balance.gini(np.array([4, 1, 3, 2])) == pytest.approx(0.25)


def test_cv_and_load_ratios_by_hand() -> None:
    counts = np.array([1, 3])  # mean 2, population std 1
    assert load_balance.coefficient_of_variation(counts) == pytest.approx(0.5)
    assert load_balance.load_ratios(counts) == pytest.approx((1.5, 0.5))
    assert math.isnan(load_balance.coefficient_of_variation(np.zeros(4)))


def test_never_used_and_top_experts_with_stable_ties() -> None:
    counts = np.array([5, 0, 9, 5, 0])
    assert load_balance.never_used(counts) == [1, 4]
    top = load_balance.top_experts(counts, 3)
    assert [(t.expert, t.count) for t in top] == [(2, 9), (0, 5), (3, 5)]
    assert top[0].share == pytest.approx(9 / 19)
    assert load_balance.distribution(counts).sum() == pytest.approx(1.0)


def test_jensen_shannon_by_hand() -> None:
    assert load_balance.jensen_shannon(np.array([3, 1]), np.array([6, 2])) == pytest.approx(0.0)
    assert load_balance.jensen_shannon(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)
    # p=(1,0), q=(.5,.5), m=(.75,.25): KL(p|m)=log2(4/3), KL(q|m)=.5 log2(2/3) + .5 log2(2)
    expected = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5)
    assert load_balance.jensen_shannon(np.array([1, 0]), np.array([1, 1])) == pytest.approx(
        expected
    )
    # different lengths are zero-padded
    assert load_balance.jensen_shannon(np.array([1, 1]), np.array([1, 1, 0])) == pytest.approx(0.0)


def _acc(ids: list[list[int]], num_experts: int | None = None) -> RoutingAccumulator:
    a = np.array(ids)
    acc = RoutingAccumulator(num_experts)
    acc.add(a, np.full(a.shape, 0.25, np.float32))
    return acc


def test_coselection_counts_and_lift_by_hand() -> None:
    # 4 tokens, top-2 of 3: c = (3, 3, 2); both-0-and-1 twice, 0+2 once, 1+2 once
    acc = _acc([[0, 1], [1, 0], [0, 2], [2, 1]], 3)
    co = acc.coselection()
    assert co is not None
    assert co.tolist() == [[3, 2, 1], [2, 3, 1], [1, 1, 2]]
    lift = coselection.coselection_lift(co, acc.counts, acc.tokens)
    assert lift[0, 1] == pytest.approx(2 * 4 / (3 * 3))
    assert lift[0, 2] == pytest.approx(1 * 4 / (3 * 2))
    assert math.isnan(lift[1, 1])
    pairs = coselection.top_pairs(co, acc.counts, acc.tokens, 2)
    assert [(p.experts, p.count) for p in pairs] == [((0, 1), 2), ((0, 2), 1)]
    assert pairs[0].share == pytest.approx(0.5) and pairs[0].lift == pytest.approx(8 / 9)


def test_lift_of_a_uniform_random_router_matches_the_documented_baseline() -> None:
    rng = np.random.default_rng(0)
    e, k, n = 12, 3, 40_000
    ids = np.argsort(rng.random((n, e)), axis=1)[:, :k]
    acc = _acc(ids.tolist(), e)
    lift = coselection.coselection_lift(acc.coselection(), acc.counts, acc.tokens)
    baseline = (k - 1) * e / (k * (e - 1))
    assert np.nanmean(lift) == pytest.approx(baseline, rel=0.01)


def test_accumulating_in_chunks_equals_one_pass_and_merge_adds_up() -> None:
    rng = np.random.default_rng(1)
    ids = np.argsort(rng.random((500, 10)), axis=1)[:, :4]
    w = rng.random((500, 4)).astype(np.float32)
    whole = RoutingAccumulator(10)
    whole.add(ids, w)
    parts = [RoutingAccumulator(10) for _ in range(3)]
    for i, part in enumerate(parts):
        part.add(ids[i::3], w[i::3])
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.tokens == whole.tokens == 500
    assert np.array_equal(merged.counts, whole.counts)
    assert np.array_equal(merged.coselection(), whole.coselection())
    assert merged.token_weight_sum == pytest.approx(whole.token_weight_sum)


def test_accumulator_grows_to_the_largest_id_when_num_experts_is_unknown() -> None:
    acc = _acc([[0, 1]])
    acc.add(np.array([[7, 2]]), np.array([[0.5, 0.5]], np.float32))
    assert acc.counts.tolist() == [1, 1, 1, 0, 0, 0, 0, 1]
    assert acc.coselection().shape == (8, 8)
    with pytest.raises(ImplausibleExpertIdError, match="expert id 1048576 is implausibly large"):
        acc.add(np.array([[1 << 20, 2]]), np.array([[0.5, 0.5]], np.float32))


def test_layer_phase_accumulators_equal_one_accumulator_per_layer_and_phase() -> None:
    rng = np.random.default_rng(5)
    n = 300
    ids = np.argsort(rng.random((n, 10)), axis=1)[:, :4]
    w = rng.random((n, 4)).astype(np.float32)
    slot = rng.integers(0, 2, n)
    phase = rng.integers(-1, 2, n).astype(np.int8)  # -1: no phase, 0 prefill, 1 decode
    sums = LayerPhaseAccumulators(10)
    for a in range(0, n, 70):  # several chunks, each mixing keys
        sums.add(slot[a : a + 70], phase[a : a + 70], ids[a : a + 70], w[a : a + 70])
    for s in (0, 1):
        by_phase = sums.by_phase(s)
        assert sorted(by_phase) == [-1, 0, 1]
        for p, acc in by_phase.items():
            rows = (slot == s) & (phase == p)
            ref = RoutingAccumulator(10)
            ref.add(ids[rows], w[rows])
            assert acc.tokens == int(rows.sum())
            assert np.array_equal(acc.counts, ref.counts)
            assert np.array_equal(acc.coselection(), ref.coselection())
            assert acc.token_weight_sum == pytest.approx(ref.token_weight_sum)
    assert sums.widest() == 10


def test_weight_stats_by_hand() -> None:
    acc = RoutingAccumulator(4)
    acc.add(np.array([[0, 1], [2, 3]]), np.array([[0.2, 0.6], [0.5, 0.1]], np.float32))
    s = summarize(acc, top=2)
    assert s.weights.mean_top1 == pytest.approx((0.6 + 0.5) / 2)
    assert s.weights.mean_sum == pytest.approx((0.8 + 0.6) / 2)
    assert s.weights.mean_by_rank == pytest.approx([0.55, 0.15])
    assert s.mean_weight_per_expert == pytest.approx([0.2, 0.6, 0.5, 0.1])
    assert s.selections == 4 and s.tokens == 2


def test_position_set_finds_repeats_across_and_within_chunks() -> None:
    ps = PositionSet()
    g = np.array([0, 0, 1, 1])
    assert ps.add(g, np.array([0, 1, 0, 1])).tolist() == [False] * 4
    dup = ps.add(np.array([0, 1, 1, 2]), np.array([1, 5, 5, 0]))
    assert dup.tolist() == [True, False, True, False]
    assert ps.count.tolist() == [2, 3, 1]
    assert ps.first_missing(1) == 2
    assert ps.first_missing(0) is None


def test_position_set_survives_region_growth_and_far_positions() -> None:
    ps = PositionSet()
    for start in range(0, 5000, 1000):
        pos = np.arange(start, start + 1000)
        assert not ps.add(np.zeros(1000, np.int64), pos).any()
        assert not ps.add(np.ones(1000, np.int64), pos).any()
    assert ps.add(np.array([0, 1]), np.array([4321, 17])).tolist() == [True, True]
    far = np.array([PositionSet.FAR + 3, PositionSet.FAR + 3])
    assert ps.add(np.array([2, 2]), far).tolist() == [False, True]
    assert ps.count.tolist() == [5000, 5000, 1]
