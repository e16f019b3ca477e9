"""How evenly a layer spreads its tokens over its experts: pure functions of per-expert counts.

Each function takes per-expert counts and returns plain numbers, so a test can check it against
hand-computed values.

Vocabulary used throughout the analysis:

- a *token* is one route record (one token at one layer); it selects ``k`` distinct experts;
- ``counts[e]`` is the number of tokens that selected expert ``e`` (a *selection*), so
  ``counts.sum() == k * tokens``;
- the *normalized distribution* is ``counts / counts.sum()``: the share of all selections each
  expert receives, summing to 1 (uniform routing gives ``1/E`` everywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def distribution(counts: np.ndarray) -> np.ndarray:
    """Share of all selections per expert (sums to 1; all zeros when nothing was selected)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts)


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy of the normalized distribution, in bits (0 for one-hot, log2(E) uniform)."""
    p = distribution(counts)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum()) + 0.0


def max_entropy_bits(num_experts: int) -> float:
    """The entropy of perfectly uniform routing over ``num_experts`` experts."""
    return math.log2(num_experts) if num_experts > 0 else 0.0


def entropy_ratio(counts: np.ndarray) -> float:
    """Entropy over its maximum: 1 is perfectly balanced, 0 is one expert taking everything."""
    hmax = max_entropy_bits(len(counts))
    return entropy_bits(counts) / hmax if hmax > 0 else 1.0


def coefficient_of_variation(counts: np.ndarray) -> float:
    """Population std / mean of the per-expert counts: 0 when balanced, NaN for no selections."""
    counts = np.asarray(counts, dtype=np.float64)
    mean = counts.mean() if counts.size else 0.0
    return float(counts.std() / mean) if mean > 0 else math.nan


def load_ratios(counts: np.ndarray) -> tuple[float, float]:
    """(max/mean, min/mean) of per-expert load: how far the hottest and coldest expert sit from
    a uniform share (1.0 each when balanced). NaN when nothing was selected."""
    counts = np.asarray(counts, dtype=np.float64)
    mean = counts.mean() if counts.size else 0.0
    if mean <= 0:
        return math.nan, math.nan
    return float(counts.max() / mean), float(counts.min() / mean)


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of per-expert load.

    With counts sorted ascending x_1..x_n: G = sum_i (2i - n - 1) x_i / (n sum x). 0 is perfect
    equality; all load on one expert gives (n-1)/n. NaN when nothing was selected.
    """
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = x.size, x.sum()
    if n == 0 or total <= 0:
        return math.nan
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def never_used(counts: np.ndarray) -> list[int]:
    """Experts that no token selected."""
    return [int(e) for e in np.flatnonzero(np.asarray(counts) == 0)]


@dataclass(frozen=True)
class Balance:
    """How evenly one set of per-expert counts (length E) spreads its selections: the numbers
    ``analyze`` prints for a layer and ``counts`` for each layer, each from the function of this
    module named for it. NaN where undefined (no selections)."""

    selections: int
    """Expert selections: ``counts.sum()`` (``k`` per token)."""
    cv: float
    """Population std / mean of the per-expert counts (0 when balanced)."""
    max_over_mean: float
    """The hottest expert's count over the mean count (1 when balanced)."""
    min_over_mean: float
    """The coldest expert's count over the mean count (1 when balanced)."""
    gini: float
    """Gini coefficient of the per-expert counts (0 equal, (E-1)/E all on one expert)."""
    entropy_bits: float
    """Shannon entropy of the share of selections per expert, in bits."""
    entropy_ratio: float
    """Entropy over its maximum log2(E): 1 balanced, 0 one expert takes everything."""
    never_used: tuple[int, ...]
    """Experts no token selected."""


def balance_of(counts: np.ndarray) -> Balance:
    """The :class:`Balance` of per-expert ``counts``."""
    counts = np.asarray(counts)
    max_ratio, min_ratio = load_ratios(counts)
    return Balance(
        selections=int(counts.sum()),
        cv=coefficient_of_variation(counts),
        max_over_mean=max_ratio,
        min_over_mean=min_ratio,
        gini=gini(counts),
        entropy_bits=entropy_bits(counts),
        entropy_ratio=entropy_ratio(counts),
        never_used=tuple(never_used(counts)),
    )


@dataclass(frozen=True)
class ExpertShare:
    expert: int
    count: int
    share: float
    """Fraction of all selections (the normalized distribution's value)."""


def top_experts(counts: np.ndarray, n: int) -> list[ExpertShare]:
    """The ``n`` most-selected experts, most first; ties go to the lower id so output is stable."""
    counts = np.asarray(counts)
    order = np.lexsort((np.arange(counts.size), -counts))[:n]
    p = distribution(counts)
    return [ExpertShare(int(e), int(counts[e]), float(p[e])) for e in order]


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits between two expert distributions (0 = identical,
    1 = disjoint support). Inputs are counts or probabilities; each is normalized first, and the
    shorter is zero-padded so logs with different inferred expert counts still compare."""
    n = max(len(p), len(q))
    p = distribution(np.pad(np.asarray(p, dtype=np.float64), (0, n - len(p))))
    q = distribution(np.pad(np.asarray(q, dtype=np.float64), (0, n - len(q))))
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))
