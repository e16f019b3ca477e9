"""Statistics of expert routing: pure functions on numpy arrays, plus streaming accumulators.

The functions take per-expert counts (and co-selection counts) and return plain numbers, so a
test can check them against hand-computed values. The accumulators exist because logs are too big
to hold: they fold one chunk of routes at a time into a few fixed-size arrays and merge.

Vocabulary used throughout:

- a *token* is one route record (one token at one layer); it selects ``k`` distinct experts;
- ``counts[e]`` is the number of tokens that selected expert ``e`` (a *selection*), so
  ``counts.sum() == k * tokens``;
- the *normalized distribution* is ``counts / counts.sum()``: the share of all selections each
  expert receives, summing to 1 (uniform routing gives ``1/E`` everywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MAX_COSELECT_EXPERTS = 1024
"""Above this the E x E co-selection matrix (8 bytes a cell) stops being worth its memory."""

MAX_INFERRED_EXPERTS = 1 << 16
"""An expert id this large without a declared ``num_experts`` is a broken log, not a model."""


# --------------------------------------------------------------------------- load balance


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


# --------------------------------------------------------------------------- co-selection


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
    """The ``n`` most frequently co-selected expert pairs (i < j), with their lift."""
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


# --------------------------------------------------------------------------- accumulation


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    return (
        a if a.shape[0] >= size else np.pad(a, [(0, size - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
    )


@dataclass
class RoutingAccumulator:
    """Running sums of one stream of routes (one layer, one phase); ``add`` a chunk at a time.

    ``num_experts=None`` lets the expert axis grow to the largest id seen (logs without
    ``num_experts``); the co-selection matrix is dropped if it would exceed
    ``MAX_COSELECT_EXPERTS``.
    """

    num_experts: int | None = None
    tokens: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pairs: np.ndarray | None = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    """pairs[i, j]: tokens with i listed before j; :meth:`coselection` adds the transpose."""
    weight_sums: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    top1_sum: float = 0.0
    wsum_sum: float = 0.0
    wsum_sq: float = 0.0
    rank_sums: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.num_experts is not None:
            self._grow(self.num_experts)

    def _grow(self, size: int) -> None:
        if size <= self.counts.size:
            return
        if size > MAX_INFERRED_EXPERTS:
            raise ValueError(
                f"expert id {size - 1} is implausibly large for an MoE layer; "
                "declare num_experts (meta or --num-experts)"
            )
        self.counts = _pad(self.counts, size)
        self.weight_sums = _pad(self.weight_sums, size)
        if self.pairs is not None:
            if size > MAX_COSELECT_EXPERTS:
                self.pairs = None
            else:
                grown = np.zeros((size, size), np.int64)
                old = self.pairs.shape[0]
                grown[:old, :old] = self.pairs
                self.pairs = grown

    def add(self, ids: np.ndarray, weights: np.ndarray) -> None:
        """Fold in routes: ``ids`` (n, k) non-negative ints, ``weights`` (n, k) floats."""
        n, k = ids.shape
        if n == 0:
            return
        self._grow(int(ids.max()) + 1)
        size = self.counts.size
        flat = ids.ravel()
        self.counts += np.bincount(flat, minlength=size)
        self.weight_sums += np.bincount(flat, weights=weights.ravel(), minlength=size)
        if self.pairs is not None and k > 1:
            a, b = np.triu_indices(k, 1)
            codes = ids[:, a] * size + ids[:, b]  # ordered (column a < column b); see coselection
            self.pairs += np.bincount(codes.ravel(), minlength=size * size).reshape(size, size)
        w = weights.astype(np.float64)
        if k > 1 and not (w[:, :-1] >= w[:, 1:]).all():  # vLLM's top-k is sorted already
            w = -np.sort(-w, axis=1)
        sums = w.sum(axis=1)
        rank = w.sum(axis=0)
        self.tokens += n
        self.top1_sum += float(rank[0])
        self.wsum_sum += float(rank.sum())
        # Not np.dot: OpenBLAS spreads a long dot product over threads, which costs far more
        # than the sum itself (and stalls whenever another process holds the other cores).
        self.wsum_sq += float(np.square(sums).sum())
        self.rank_sums = rank if self.rank_sums is None else self.rank_sums + rank

    def merge(self, other: RoutingAccumulator) -> RoutingAccumulator:
        """Add another accumulator's sums into this one (e.g. prefill + decode = all)."""
        self._grow(other.counts.size)
        size = self.counts.size
        self.counts += _pad(other.counts, size)
        self.weight_sums += _pad(other.weight_sums, size)
        if self.pairs is not None and other.pairs is not None:
            other_pairs = np.zeros_like(self.pairs)
            m = other.pairs.shape[0]
            other_pairs[:m, :m] = other.pairs
            self.pairs += other_pairs
        elif other.tokens:
            self.pairs = None
        self.tokens += other.tokens
        self.top1_sum += other.top1_sum
        self.wsum_sum += other.wsum_sum
        self.wsum_sq += other.wsum_sq
        if other.rank_sums is not None:
            self.rank_sums = (
                other.rank_sums.copy()
                if self.rank_sums is None
                else self.rank_sums + other.rank_sums
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
        if self.pairs is None:
            return None
        sym = self.pairs + self.pairs.T
        np.fill_diagonal(sym, self.counts)
        return sym


@dataclass(frozen=True)
class WeightStats:
    """Router weights. Qwen1.5-MoE does not renormalize the top-k weights (norm_topk_prob=false),
    so their sum is below 1 and is itself informative."""

    mean_top1: float
    """Mean over tokens of the largest of the token's k weights."""
    mean_sum: float
    """Mean over tokens of the sum of its k weights."""
    std_sum: float
    mean_by_rank: list[float]
    """Mean weight of the largest, second largest, ... selected expert."""


@dataclass(frozen=True)
class ExpertStats:
    """Everything ``analyze`` reports about one stream of routes."""

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


def summarize(acc: RoutingAccumulator, top: int = 3, pairs: int = 5) -> ExpertStats:
    """Turn an accumulator into the reported numbers."""
    counts = acc.counts
    t = acc.tokens
    max_ratio, min_ratio = load_ratios(counts)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_expert = acc.weight_sums / counts
    mean_w = [float(v) if c else None for v, c in zip(per_expert, counts, strict=True)]
    if t:
        var = max(acc.wsum_sq / t - (acc.wsum_sum / t) ** 2, 0.0)
        weights = WeightStats(
            mean_top1=acc.top1_sum / t,
            mean_sum=acc.wsum_sum / t,
            std_sum=math.sqrt(var),
            mean_by_rank=[
                float(v) / t for v in (acc.rank_sums if acc.rank_sums is not None else [])
            ],
        )
    else:
        weights = WeightStats(math.nan, math.nan, math.nan, [])
    co = acc.coselection()
    return ExpertStats(
        tokens=t,
        selections=int(counts.sum()),
        num_experts=int(counts.size),
        counts=[int(c) for c in counts],
        distribution=[float(v) for v in distribution(counts)],
        top=top_experts(counts, top),
        entropy_bits=entropy_bits(counts),
        max_entropy_bits=max_entropy_bits(counts.size),
        entropy_ratio=entropy_ratio(counts),
        cv=coefficient_of_variation(counts),
        max_over_mean=max_ratio,
        min_over_mean=min_ratio,
        gini=gini(counts),
        never_used=never_used(counts),
        weights=weights,
        mean_weight_per_expert=mean_w,
        top_pairs=None if co is None else top_pairs(co, counts, t, pairs),
    )


# --------------------------------------------------------------------------- seen positions


def _concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices start_0..start_0+len_0-1, start_1.., concatenated, without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    return offsets + np.arange(total)


class PositionSet:
    """Which (group, position) keys have been seen, one bit per position.

    A group is one (request, layer) pair; a position is a token index. Duplicate detection and
    gap finding need the set of positions per group; a bit each keeps 10M routes in about
    2.5 MB (regions grow by doubling, abandoned regions are not reused). Positions beyond
    ``FAR`` (no real sequence is that long) go to a plain set so a bogus index cannot blow up
    memory.
    """

    FAR = 1 << 24

    def __init__(self) -> None:
        self._bits = np.zeros(1 << 16, np.uint8)
        self._used = 0
        self._base = np.zeros(0, np.int64)
        """Byte offset of each group's region in ``_bits``."""
        self._cap = np.zeros(0, np.int64)
        """Positions each region holds (a multiple of 8)."""
        self.count = np.zeros(0, np.int64)
        """Distinct positions seen per group."""
        self.lo = np.zeros(0, np.int64)
        self.hi = np.zeros(0, np.int64)
        self._far: dict[int, set[int]] = {}

    @property
    def groups(self) -> int:
        return int(self.count.size)

    @property
    def nbytes(self) -> int:
        return int(self._bits.nbytes + 5 * self.count.nbytes)

    def _ensure_groups(self, size: int) -> None:
        old = self.count.size
        if size <= old:
            return
        grow = size - old
        self._base = np.concatenate([self._base, np.zeros(grow, np.int64)])
        self._cap = np.concatenate([self._cap, np.zeros(grow, np.int64)])
        self.count = np.concatenate([self.count, np.zeros(grow, np.int64)])
        self.lo = np.concatenate([self.lo, np.full(grow, np.iinfo(np.int64).max, np.int64)])
        self.hi = np.concatenate([self.hi, np.full(grow, -1, np.int64)])

    def _ensure_capacity(self, groups: np.ndarray, need: np.ndarray) -> None:
        """Give each of ``groups`` a region of at least ``need`` positions, copying old bits."""
        new_cap = np.maximum(np.maximum(need, 2 * self._cap[groups]), 256)
        new_cap = (new_cap + 7) // 8 * 8
        nbytes = new_cap // 8
        total = int(nbytes.sum())
        if self._used + total > self._bits.size:
            bigger = np.zeros(max(2 * self._bits.size, self._used + total), np.uint8)
            bigger[: self._used] = self._bits[: self._used]
            self._bits = bigger
        new_base = self._used + np.cumsum(nbytes) - nbytes
        old_bytes = self._cap[groups] // 8
        src = _concat_ranges(self._base[groups], old_bytes)
        dst = _concat_ranges(new_base, old_bytes)
        self._bits[dst] = self._bits[src]
        self._base[groups] = new_base
        self._cap[groups] = new_cap
        self._used += total

    def add(self, group: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Record keys; returns a mask of rows whose key was seen before (earlier chunk or
        earlier row of this chunk), i.e. every copy after the first."""
        n = group.size
        dup = np.zeros(n, bool)
        if n == 0:
            return dup
        group = group.astype(np.int64, copy=False)
        pos = pos.astype(np.int64, copy=False)
        self._ensure_groups(int(group.max()) + 1)
        near = pos < self.FAR
        if not near.all():
            for i in np.flatnonzero(~near):
                seen = self._far.setdefault(int(group[i]), set())
                p = int(pos[i])
                dup[i] = p in seen
                seen.add(p)
            g, p = group[near], pos[near]
        else:
            g, p = group, pos
        if g.size:
            batch_hi = np.full(self.count.size, -1, np.int64)
            np.maximum.at(batch_hi, g, p)
            grow = np.flatnonzero(batch_hi >= self._cap)
            if grow.size:
                self._ensure_capacity(grow, batch_hi[grow] + 1)
            bit = self._base[g] * 8 + p
            byte = bit >> 3
            mask = np.left_shift(1, bit & 7).astype(np.uint8)
            near_dup = (self._bits[byte] & mask) != 0
            ordered = np.sort(bit)
            if (ordered[1:] == ordered[:-1]).any():
                order = np.argsort(bit, kind="stable")
                s = bit[order]
                near_dup[order[1:]] |= s[1:] == s[:-1]
            np.bitwise_or.at(self._bits, byte, mask)
            dup[near] = near_dup
        fresh = ~dup
        self.count += np.bincount(group[fresh], minlength=self.count.size)
        np.minimum.at(self.lo, group, pos)
        np.maximum.at(self.hi, group, pos)
        return dup

    def first_missing(self, group: int) -> int | None:
        """The lowest position in [lo, hi] of ``group`` that was never seen (None if none)."""
        lo, hi = int(self.lo[group]), int(self.hi[group])
        if hi < 0:
            return None
        top = min(hi, int(self._cap[group]) - 1)
        base = int(self._base[group])
        region = self._bits[base : base + (top + 8) // 8]
        present = np.unpackbits(region, bitorder="little")[lo : top + 1].astype(bool)
        missing = np.flatnonzero(~present)
        if missing.size:
            return lo + int(missing[0])
        far = self._far.get(group, set())
        p = top + 1
        while p <= hi:
            if p not in far:
                return p
            p += 1
        return None


# --------------------------------------------------------------------------- contamination


@dataclass(frozen=True)
class Run:
    layer: int
    first_line: int
    last_line: int
    length: int


@dataclass
class Contamination:
    """What looks like warm-up/dummy batches or double logging rather than real tokens."""

    records: int = 0
    duplicate_records: int = 0
    """Records whose (req_id, token_idx, layer) key appeared earlier: every copy after the first."""
    duplicate_keys: int = 0
    """Distinct keys that appear more than once."""
    identical_runs: int = 0
    """Runs of >= ``min_run`` consecutive records of one layer with identical ids and weights."""
    identical_run_records: int = 0
    suspect_records: int = 0
    """Records that are a repeated key or sit in such a run (counted once)."""
    longest_run: Run | None = None
    min_run: int = 64

    @property
    def suspect_share(self) -> float:
        return self.suspect_records / self.records if self.records else 0.0

    @property
    def suspicious(self) -> bool:
        return self.suspect_records > 0


class ContaminationDetector:
    """Streams over routes and finds the fingerprints of logs that are not just real tokens.

    Naive hooks log the warm-up, profiling and graph-capture passes vLLM makes with dummy batches:
    thousands of identical tokens, hence thousands of consecutive identical routes, often under
    keys that real tokens use again later. Real consecutive tokens practically never share all k
    ids AND all k float weights, so ``min_run`` identical routes in a row (per layer, in file
    order) flags a run; any repeated (req_id, token_idx, layer) key is flagged too.
    """

    def __init__(self, min_run: int = 64) -> None:
        self.min_run = min_run
        self.positions = PositionSet()
        self._repeated = PositionSet()
        """Keys seen more than once (one bit each, however many copies)."""
        self._records = 0
        self._dup_records = 0
        self._open: dict[int, _OpenRun] = {}
        self._runs: list[Run] = []
        self._run_records = 0
        self._run_count = 0
        self._overlap = 0
        self._longest: Run | None = None

    def add(
        self,
        group: np.ndarray,
        token_idx: np.ndarray,
        layer: np.ndarray,
        ids: np.ndarray,
        weights: np.ndarray,
        line: np.ndarray,
    ) -> np.ndarray:
        """Fold in one chunk (rows in file order); returns the repeated-key mask of its rows."""
        n = group.size
        self._records += n
        dup = self.positions.add(group, token_idx)
        if dup.any():
            self._dup_records += int(dup.sum())
            self._repeated.add(group[dup], token_idx[dup])
        layers = np.unique(layer)
        for lay in layers.tolist():
            rows = slice(None) if layers.size == 1 else layer == lay
            self._scan_runs(int(lay), ids[rows], weights[rows], line[rows], dup[rows])
        return dup

    def _scan_runs(
        self, layer: int, ids: np.ndarray, w: np.ndarray, line: np.ndarray, dup: np.ndarray
    ) -> None:
        n = ids.shape[0]
        if n == 0:
            return
        same = np.empty(n, bool)
        same[1:] = _rows_equal_next(ids) & _rows_equal_next(w)
        cur = self._open.get(layer)
        same[0] = (
            cur is not None
            and bool((cur.ids == ids[0]).all())
            and bool((cur.weights == w[0]).all())
        )
        starts = np.flatnonzero(~same)
        bounds = np.append(starts, n)
        dup_cum = np.concatenate([[0], np.cumsum(dup)])
        head = int(bounds[0])  # rows continuing the open run
        if cur is not None and head:
            cur.length += head
            cur.dups += int(dup_cum[head])
            cur.last_line = int(line[head - 1])
        if starts.size:
            if cur is not None:
                self._close(layer, cur)
            seg_len = np.diff(bounds)
            seg_dup = dup_cum[bounds[1:]] - dup_cum[bounds[:-1]]
            for s in np.flatnonzero(seg_len[:-1] >= self.min_run):
                a, b = int(bounds[s]), int(bounds[s + 1])
                self._record(Run(layer, int(line[a]), int(line[b - 1]), b - a), int(seg_dup[s]))
            a = int(starts[-1])
            self._open[layer] = _OpenRun(
                ids[a].copy(),
                w[a].copy(),
                int(seg_len[-1]),
                int(line[a]),
                int(line[n - 1]),
                int(seg_dup[-1]),
            )

    def _close(self, layer: int, run: _OpenRun) -> None:
        if run.length >= self.min_run:
            self._record(Run(layer, run.first_line, run.last_line, run.length), run.dups)

    def _record(self, run: Run, dups: int) -> None:
        self._run_count += 1
        self._run_records += run.length
        self._overlap += dups
        self._runs.append(run)
        if self._longest is None or run.length > self._longest.length:
            self._longest = run

    def finish(self) -> Contamination:
        """Close open runs and return the verdict; call once, after the last chunk."""
        for layer, run in self._open.items():
            self._close(layer, run)
        self._open.clear()
        dup_keys = int(self._repeated.count.sum())
        return Contamination(
            records=self._records,
            duplicate_records=self._dup_records,
            duplicate_keys=dup_keys,
            identical_runs=self._run_count,
            identical_run_records=self._run_records,
            suspect_records=self._dup_records + self._run_records - self._overlap,
            longest_run=self._longest,
            min_run=self.min_run,
        )

    @property
    def runs(self) -> list[Run]:
        return self._runs


def _rows_equal_next(a: np.ndarray) -> np.ndarray:
    """out[i] = row i+1 equals row i, bit for bit; comparing rows as 64-bit words where they
    fit is several times cheaper than an element-wise compare and reduce. (Integer rows of any
    width in whole words qualify: for them bits and values are the same thing.)"""
    width = a.shape[1] * a.itemsize
    words_ok = width in (8, 16) or (a.dtype.kind in "iu" and width % 8 == 0 and width <= 64)
    if a.flags.c_contiguous and words_ok and a.shape[0]:
        words = a.view(np.uint64)
        out = words[1:, 0] == words[:-1, 0]
        for j in range(1, width // 8):
            out &= words[1:, j] == words[:-1, j]
        return out
    return (a[1:] == a[:-1]).all(axis=1)


@dataclass
class _OpenRun:
    ids: np.ndarray
    weights: np.ndarray
    length: int
    first_line: int
    last_line: int
    dups: int


class SuspectFilter:
    """After a :class:`ContaminationDetector` pass, tells which rows of a chunk to drop, in a
    second pass over the same log: every row inside a long identical run (dummy batches), then,
    among the rest, every repeat of a key already kept (double logging keeps its first copy).
    Real tokens whose keys a dummy batch used first are therefore kept."""

    def __init__(self, detector: ContaminationDetector) -> None:
        by_layer: dict[int, list[Run]] = {}
        for run in detector.runs:
            by_layer.setdefault(run.layer, []).append(run)
        self._runs = {}
        for layer, runs in by_layer.items():
            runs.sort(key=lambda r: r.first_line)
            first = np.array([r.first_line for r in runs], np.int64)
            last = np.array([r.last_line for r in runs], np.int64)
            self._runs[layer] = (first, last)
        self._kept = PositionSet()

    def mask(
        self, group: np.ndarray, token_idx: np.ndarray, layer: np.ndarray, line: np.ndarray
    ) -> np.ndarray:
        """True for rows to drop; call once per chunk, in file order."""
        drop = np.zeros(group.size, bool)
        for lay, (first, last) in self._runs.items():
            rows = np.flatnonzero(layer == lay)
            if not rows.size:
                continue
            ln = line[rows]
            k = np.searchsorted(first, ln, side="right") - 1
            inside = (k >= 0) & (ln <= last[np.maximum(k, 0)])
            drop[rows[inside]] = True
        keep = np.flatnonzero(~drop)
        drop[keep[self._kept.add(group[keep], token_idx[keep])]] = True
        return drop
