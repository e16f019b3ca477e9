"""Running sums of routes, a chunk at a time: logs are too big to hold, so ``analyze`` folds each
chunk of routes into a few fixed-size arrays per (layer, phase) and merges them at the end.
:func:`moeprof.analysis.summary.summarize` turns the sums into the reported numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moeprof.analysis.reader import NO_PHASE, PHASES

MAX_COSELECT_EXPERTS = 1024
"""Above this the E x E co-selection matrix (8 bytes a cell) stops being worth its memory."""

MAX_INFERRED_EXPERTS = 1 << 16
"""An expert id this large without a declared ``num_experts`` is a broken log, not a model."""


class ImplausibleExpertIdError(ValueError):
    """An expert id too large for any MoE layer, in a log that does not declare ``num_experts``
    (so the expert axis would have to grow to it)."""

    def __init__(self, expert: int) -> None:
        super().__init__(
            f"expert id {expert} is implausibly large for an MoE layer; "
            "declare num_experts (meta or --num-experts)"
        )
        self.expert = expert


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    return (
        a if a.shape[0] >= size else np.pad(a, [(0, size - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
    )


@dataclass
class RoutingAccumulator:
    """Running sums of one stream of routes (one layer, one phase); ``add`` a chunk at a time.

    ``num_experts=None`` lets the expert axis grow to the largest id seen (logs without
    ``num_experts``); the co-selection matrix is dropped if it would exceed
    ``MAX_COSELECT_EXPERTS``. Below, a token's *weight sum* is the sum of its k router weights.
    """

    num_experts: int | None = None
    tokens: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """counts[e]: tokens that selected expert e."""
    pair_counts: np.ndarray | None = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    """pair_counts[i, j]: tokens listing i before j; :meth:`coselection` adds the transpose."""
    expert_weight_sums: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    """expert_weight_sums[e]: sum of the weights expert e received."""
    top1_weight_sum: float = 0.0
    """Sum over tokens of the token's largest weight."""
    token_weight_sum: float = 0.0
    """Sum over tokens of the token's weight sum."""
    token_weight_sq_sum: float = 0.0
    """Sum over tokens of the square of the token's weight sum."""
    rank_weight_sums: np.ndarray | None = None
    """rank_weight_sums[r]: sum over tokens of the token's (r+1)-th largest weight."""

    def __post_init__(self) -> None:
        if self.num_experts is not None:
            self._grow(self.num_experts)

    def _grow(self, size: int) -> None:
        if size <= self.counts.size:
            return
        if size > MAX_INFERRED_EXPERTS:
            raise ImplausibleExpertIdError(size - 1)
        self.counts = _pad(self.counts, size)
        self.expert_weight_sums = _pad(self.expert_weight_sums, size)
        if self.pair_counts is not None:
            if size > MAX_COSELECT_EXPERTS:
                self.pair_counts = None
            else:
                grown = np.zeros((size, size), np.int64)
                old = self.pair_counts.shape[0]
                grown[:old, :old] = self.pair_counts
                self.pair_counts = grown

    def add(self, ids: np.ndarray, weights: np.ndarray) -> None:
        """Fold in routes: ``ids`` (n, k) non-negative ints, ``weights`` (n, k) floats.

        Raises :class:`ImplausibleExpertIdError` when an id would grow the expert axis beyond
        ``MAX_INFERRED_EXPERTS``.
        """
        n, k = ids.shape
        if n == 0:
            return
        self._grow(int(ids.max()) + 1)
        size = self.counts.size
        flat = ids.ravel()
        self.counts += np.bincount(flat, minlength=size)
        self.expert_weight_sums += np.bincount(flat, weights=weights.ravel(), minlength=size)
        if self.pair_counts is not None and k > 1:
            a, b = np.triu_indices(k, 1)
            codes = ids[:, a] * size + ids[:, b]  # ordered (column a < column b); see coselection
            self.pair_counts += np.bincount(codes.ravel(), minlength=size * size).reshape(
                size, size
            )
        w = weights.astype(np.float64)
        if k > 1 and not (w[:, :-1] >= w[:, 1:]).all():  # vLLM's top-k is sorted already
            w = -np.sort(-w, axis=1)
        per_token = w.sum(axis=1)
        per_rank = w.sum(axis=0)
        self.tokens += n
        self.top1_weight_sum += float(per_rank[0])
        self.token_weight_sum += float(per_rank.sum())
        # Not np.dot: OpenBLAS spreads a long dot product over threads, which costs far more
        # than the sum itself (and stalls whenever another process holds the other cores).
        self.token_weight_sq_sum += float(np.square(per_token).sum())
        self.rank_weight_sums = (
            per_rank if self.rank_weight_sums is None else self.rank_weight_sums + per_rank
        )

    def merge(self, other: RoutingAccumulator) -> RoutingAccumulator:
        """Add another accumulator's sums into this one (e.g. prefill + decode = all)."""
        self._grow(other.counts.size)
        size = self.counts.size
        self.counts += _pad(other.counts, size)
        self.expert_weight_sums += _pad(other.expert_weight_sums, size)
        if self.pair_counts is not None and other.pair_counts is not None:
            other_pairs = np.zeros_like(self.pair_counts)
            m = other.pair_counts.shape[0]
            other_pairs[:m, :m] = other.pair_counts
            self.pair_counts += other_pairs
        elif other.tokens:
            self.pair_counts = None
        self.tokens += other.tokens
        self.top1_weight_sum += other.top1_weight_sum
        self.token_weight_sum += other.token_weight_sum
        self.token_weight_sq_sum += other.token_weight_sq_sum
        if other.rank_weight_sums is not None:
            self.rank_weight_sums = (
                other.rank_weight_sums.copy()
                if self.rank_weight_sums is None
                else self.rank_weight_sums + other.rank_weight_sums
            )
        return self

    def resized(self, num_experts: int) -> RoutingAccumulator:
        """A copy whose expert axis is ``num_experts`` long (so logs/phases line up)."""
        out = RoutingAccumulator(num_experts=None)
        out.merge(self)
        out._grow(num_experts)
        return out

    def coselection(self) -> np.ndarray | None:
        """Symmetric E x E co-selection counts; the diagonal holds each expert's count."""
        if self.pair_counts is None:
            return None
        sym = self.pair_counts + self.pair_counts.T
        np.fill_diagonal(sym, self.counts)
        return sym


PHASE_CODES = range(NO_PHASE, len(PHASES))
"""Every phase code a chunk row can carry: :data:`NO_PHASE`, then an index into ``PHASES``."""


class LayerPhaseAccumulators:
    """One :class:`RoutingAccumulator` per (layer slot, phase code) of a log, fed whole chunks.

    A layer slot is the layer's index in the meta's ``layers_logged``; phase codes are those of
    :data:`PHASE_CODES`.
    """

    def __init__(self, num_experts: int | None) -> None:
        self.num_experts = num_experts
        self._accs: dict[tuple[int, int], RoutingAccumulator] = {}

    def add(
        self, slot: np.ndarray, phase: np.ndarray, ids: np.ndarray, weights: np.ndarray
    ) -> None:
        """Fold in rows: ``slot`` and ``phase`` (n,) codes, ``ids`` and ``weights`` (n, k).

        One stable sort of the rows by (slot, phase), then one contiguous slice per key, instead
        of a boolean mask per key.
        """
        stride = len(PHASE_CODES)
        key = slot * stride + (phase.astype(np.int64) - PHASE_CODES.start)
        sizes = np.bincount(key)
        present = np.flatnonzero(sizes)
        if present.size > 1:
            order = np.argsort(key, kind="stable")  # np.take: 6x faster than [order]
            ids, weights = np.take(ids, order, axis=0), np.take(weights, order, axis=0)
        start = 0
        for code in present.tolist():
            stop = start + int(sizes[code])
            layer_slot, phase_offset = divmod(code, stride)
            acc = self._accumulator(layer_slot, PHASE_CODES[phase_offset])
            acc.add(ids[start:stop], weights[start:stop])
            start = stop

    def _accumulator(self, slot: int, phase: int) -> RoutingAccumulator:
        acc = self._accs.get((slot, phase))
        if acc is None:
            acc = self._accs[(slot, phase)] = RoutingAccumulator(self.num_experts)
        return acc

    def by_phase(self, slot: int) -> dict[int, RoutingAccumulator]:
        """The accumulators of one layer slot, by phase code, in the order they were created."""
        return {p: acc for (s, p), acc in self._accs.items() if s == slot}

    def widest(self) -> int:
        """Length of the longest expert axis: max expert id + 1 over everything added."""
        return max((acc.counts.size for acc in self._accs.values()), default=0)
