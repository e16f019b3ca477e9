"""Which experts are picked together for the same token: lift and the most frequent pairs.

Inputs are the symmetric E x E co-selection counts (``pairs[i, j]``: tokens that selected both
``i`` and ``j``), the per-expert counts and the number of tokens; see
:mod:`moeprof.analysis.load_balance` for the vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def coselection_lift(pairs: np.ndarray, counts: np.ndarray, tokens: int) -> np.ndarray:
    """How much more often two experts are picked for the same token than independence predicts.

    With T tokens, c_i the tokens that selected expert i and C_ij the tokens that selected both
    i and j (i != j), the probabilities are P(i) = c_i / T and P(i, j) = C_ij / T, and

        lift(i, j) = P(i, j) / (P(i) P(j)) = C_ij * T / (c_i * c_j).

    lift 1 means "as often as if chosen independently", above 1 "chosen together more", NaN where
    either expert was never selected. Because a token cannot pick the same expert twice, a
    uniformly random top-k router does NOT score 1 but (k-1) E / (k (E-1)), e.g. 0.76 for top-4
    of 60: compare lifts with that baseline, not with 1. The diagonal is NaN.
    """
    c = np.asarray(counts, dtype=np.float64)
    denom = np.outer(c, c)
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.asarray(pairs, dtype=np.float64) * tokens / denom
    lift[denom == 0] = np.nan
    np.fill_diagonal(lift, np.nan)
    return lift


@dataclass(frozen=True)
class PairStat:
    experts: tuple[int, int]
    count: int
    """Tokens that selected both experts."""
    share: float
    """count / tokens."""
    lift: float
    """See :func:`coselection_lift`."""


def top_pairs(pairs: np.ndarray, counts: np.ndarray, tokens: int, n: int) -> list[PairStat]:
    """The ``n`` most frequently co-selected expert pairs (i < j), with their lift; ties go to
    the lower pair so output is stable."""
    upper = np.triu(np.asarray(pairs), k=1)
    flat = upper.ravel()
    nonzero = np.flatnonzero(flat)
    order = nonzero[np.lexsort((nonzero, -flat[nonzero]))][:n]
    lift = coselection_lift(pairs, counts, tokens)
    size = upper.shape[0]
    out = []
    for code in order:
        i, j = divmod(int(code), size)
        share = float(flat[code]) / tokens if tokens else math.nan
        out.append(PairStat((i, j), int(flat[code]), share, float(lift[i, j])))
    return out
