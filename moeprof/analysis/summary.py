"""The numbers ``analyze`` reports about one stream of routes, computed from its running sums."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moeprof.analysis.accumulate import RoutingAccumulator
from moeprof.analysis.coselection import PairStat, top_pairs
from moeprof.analysis.load_balance import (
    ExpertShare,
    balance_of,
    distribution,
    max_entropy_bits,
    top_experts,
)


@dataclass(frozen=True)
class WeightStats:
    """Router weights. Qwen1.5-MoE does not renormalize the top-k weights (norm_topk_prob=false),
    so their sum is below 1 and is itself informative."""

    mean_top1: float
    """Mean over tokens of the largest of the token's k weights."""
    mean_sum: float
    """Mean over tokens of the sum of its k weights."""
    std_sum: float
    """Population standard deviation over tokens of the sum of its k weights."""
    mean_by_rank: list[float]
    """Mean weight of the largest, second largest, ... selected expert."""


@dataclass(frozen=True)
class ExpertStats:
    """Everything ``analyze`` reports about one stream of routes. The fields it shares with
    :class:`~moeprof.analysis.load_balance.Balance` are the stream's balance (``never_used``
    as a list)."""

    tokens: int
    selections: int
    num_experts: int
    counts: list[int]
    distribution: list[float]
    top: list[ExpertShare]
    entropy_bits: float
    max_entropy_bits: float
    entropy_ratio: float
    cv: float
    max_over_mean: float
    min_over_mean: float
    gini: float
    never_used: list[int]
    weights: WeightStats
    mean_weight_per_expert: list[float | None]
    top_pairs: list[PairStat] | None


def weight_stats(acc: RoutingAccumulator) -> WeightStats:
    """Means (and the spread of the per-token sum) of the router weights; NaN with no tokens."""
    t = acc.tokens
    if not t:
        return WeightStats(math.nan, math.nan, math.nan, [])
    mean_sum = acc.token_weight_sum / t
    var = max(acc.token_weight_sq_sum / t - mean_sum**2, 0.0)
    by_rank = acc.rank_weight_sums if acc.rank_weight_sums is not None else []
    return WeightStats(
        mean_top1=acc.top1_weight_sum / t,
        mean_sum=mean_sum,
        std_sum=math.sqrt(var),
        mean_by_rank=[float(v) / t for v in by_rank],
    )


def summarize(acc: RoutingAccumulator, top: int = 3, pairs: int = 5) -> ExpertStats:
    """Turn an accumulator into the reported numbers: the ``top`` experts, the ``pairs`` most
    co-selected pairs (None when the co-selection matrix was dropped)."""
    counts = acc.counts
    balance = balance_of(counts)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_expert = acc.expert_weight_sums / counts
    co = acc.coselection()
    return ExpertStats(
        tokens=acc.tokens,
        num_experts=int(counts.size),
        counts=[int(c) for c in counts],
        distribution=[float(v) for v in distribution(counts)],
        top=top_experts(counts, top),
        max_entropy_bits=max_entropy_bits(counts.size),
        **{**vars(balance), "never_used": list(balance.never_used)},
        weights=weight_stats(acc),
        mean_weight_per_expert=[
            float(v) if c else None for v, c in zip(per_expert, counts, strict=True)
        ],
        top_pairs=None if co is None else top_pairs(co, counts, acc.tokens, pairs),
    )
