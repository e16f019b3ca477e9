"""Expert reuse between consecutive tokens (``analyze --reuse``): how much of a token's expert
set the request's previous token already used, and what a per-request LRU cache of experts
would hit; the question behind expert offloading.

Per logged layer, each request's tokens are taken in position order (``token_idx``):

- **overlap**: for consecutive positions ``t-1, t`` of one request, ``|S_t ∩ S_{t-1}| / k``
  (:func:`set_overlap`), averaged over such pairs, overall and by the phase of token ``t``. A
  gap in the positions (tokens not logged) breaks the chain: the pair is not formed and the
  token counts as a break. Chance: :func:`chance_overlap`.
- **LRU hit rate** for a cache of ``C`` experts per request and layer, for ``C`` from ``k`` to
  ``E`` (:func:`capacity_grid`). A token's ``k`` experts are looked up together in the cache as
  it was after the request's previous logged token, then become its most recently used (of
  one token's experts, the first listed, the router's top choice, counts as the most recent).
  An access hits when fewer than ``C`` distinct experts were used since the expert's last
  use: its *stack distance* ``d`` (1 + that number) is at most ``C``, so one pass gives the
  whole curve (:func:`hit_rates`). The first use of an expert by a request is a compulsory
  miss at every ``C``; ``hit_rate`` counts it, ``warm_hit_rate`` leaves it out (for a request
  that repeats one set: the first token left out). The cache persists over gaps in positions.
  Chance: :func:`che_hit_rates`.

Per-request state (a recency rank per expert, ``E`` int16 per live (request, layer), and one
bit per (request, layer) ever seen) is kept only while a request is live. A log does not say
when a request ends, so a request's state is dropped once no route of it was seen for
:data:`HORIZON_LINES` lines, or, beyond :data:`MAX_LIVE` live (request, layer) states, the
least recently seen first. A request that comes back after that starts again with an empty
cache (counted as ``resumed``, and as a new request in ``requests``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moeprof.analysis.passes import PassOptions, register
from moeprof.analysis.reader import RouteChunk, RouteLog
from moeprof.schema import NO_PHASE, PHASES

HORIZON_LINES = 1 << 22
"""A (request, layer) whose last route is this many lines back is taken as finished."""
MAX_LIVE = 1 << 16
"""Most (request, layer) states kept at once (``E`` int16 ranks each): 8 MiB at 64 experts."""
BATCH_ROWS = 1 << 15
"""Rows the LRU takes at once: bounds its temporaries (a sparse table of ``log2(rows)`` x rows
x ``ceil(E/64)`` words)."""
MAX_CAPACITIES = 128
"""Beyond this many capacities from ``k`` to ``E``, :func:`capacity_grid` thins them."""
PHASE_LABELS = ("unknown", *PHASES)
"""Phase names by code + 1 (``NO_PHASE`` is -1)."""


# --------------------------------------------------------------------------- statistics


def set_overlap(ids: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """``|S ∩ S'|`` row by row: how many of the experts in each row of ``ids`` (``(n, k)``,
    distinct within a row) also appear in the same row of ``prev`` (``(n, k')``)."""
    ids, prev = np.asarray(ids), np.asarray(prev)
    if ids.ndim != 2 or prev.ndim != 2 or ids.shape[0] != prev.shape[0]:
        raise ValueError(
            f"ids and prev must be (n, k) arrays with the same rows, got {ids.shape} and "
            f"{prev.shape}"
        )
    out = np.zeros(ids.shape[0], np.int64)
    for a in range(ids.shape[1]):  # k x k column comparisons beat one (n, k, k) broadcast
        col = ids[:, a : a + 1]
        out += (col == prev).any(axis=1) if prev.shape[1] > 8 else _any_equal(col[:, 0], prev)
    return out


def _any_equal(col: np.ndarray, prev: np.ndarray) -> np.ndarray:
    hit = col == prev[:, 0]
    for b in range(1, prev.shape[1]):
        hit |= col == prev[:, b]
    return hit


def chance_overlap(counts: np.ndarray, tokens: int, k: int) -> float:
    """The overlap ``E|S ∩ S'| / k`` of two tokens whose expert sets are drawn independently
    with the layer's loads: ``sum_e q_e^2 / k`` with ``q_e = counts[e] / tokens`` the share of
    tokens that chose expert ``e`` (its probability of being in a set). Exact for any
    within-set dependence, since ``E|S ∩ S'| = sum_e P(e in S) P(e in S')``: ``k/E`` for a
    uniform router (``q_e = k/E``), 1 when every token chooses the same set. NaN without
    tokens."""
    c = np.asarray(counts, np.float64)
    if c.ndim != 1 or (c < 0).any():
        raise ValueError("counts must be a 1-d array of non-negative counts")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if tokens < 0 or (tokens and c.max(initial=0) > tokens):
        raise ValueError(f"tokens must be >= every count, got {tokens}")
    if tokens == 0:
        return math.nan
    q = c / tokens
    return float((q * q).sum() / k)


def capacity_grid(k: int, num_experts: int) -> np.ndarray:
    """Cache sizes to report: every ``C`` from ``k`` to ``E`` when that is at most
    :data:`MAX_CAPACITIES` values, else ``k, 2k, 3k, 4k``, about :data:`MAX_CAPACITIES` - 4
    evenly spaced sizes and ``E``; always ``k``, ``2k`` (when at most ``E``) and ``E``."""
    if not 1 <= k <= num_experts:
        raise ValueError(f"need 1 <= k <= num_experts, got k={k}, num_experts={num_experts}")
    if num_experts - k + 1 <= MAX_CAPACITIES:
        return np.arange(k, num_experts + 1)
    even = np.linspace(k, num_experts, MAX_CAPACITIES - 4).round().astype(np.int64)
    grid = np.concatenate([k * np.arange(1, 5), even, [num_experts]])
    return np.unique(grid[grid <= num_experts])


def hit_rates(distances: np.ndarray, capacities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hit rate, warm hit rate) of an LRU cache of each size in ``capacities``, from
    ``distances[d]`` = accesses at stack distance ``d`` (``d >= 1``; ``distances[0]``: first
    uses, compulsory misses). An access hits a cache of ``C`` iff ``d <= C``:

        hit_rate(C) = sum_{1 <= d <= C} distances[d] / sum_d distances[d]
        warm_hit_rate(C) = sum_{1 <= d <= C} distances[d] / sum_{d >= 1} distances[d]

    The hit rate per token is hits / k, so its mean over tokens is the same ratio. NaN where
    there are no accesses."""
    h = np.asarray(distances, np.float64)
    cap = np.asarray(capacities)
    if h.ndim != 1 or not h.size or (h < 0).any():
        raise ValueError("distances must be a non-empty 1-d array of counts")
    if cap.ndim != 1 or (cap.size and cap.min() < 1):
        raise ValueError("capacities must be a 1-d array of sizes >= 1")
    cum = np.cumsum(h)
    hits = cum[np.minimum(cap, h.size - 1)] - h[0]
    total, warm = cum[-1], cum[-1] - h[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / total, hits / warm


def _distinct(q: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Expected distinct experts in ``t`` independent tokens: ``sum_e 1 - (1 - q_e)^t``."""
    return (1.0 - np.power.outer(1.0 - q, t)).sum(axis=0)


def che_hit_rates(
    q: np.ndarray, k: int, lengths: np.ndarray, capacities: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(hit rate, warm hit rate) of an LRU cache of each size in ``capacities`` when a
    request's tokens choose their experts independently, expert ``e`` with probability
    ``q[e]`` (the layer's loads: no reuse beyond chance), for requests of the lengths in
    ``lengths`` (``lengths[n]`` = requests of ``n`` tokens).

    Che's approximation, per token: an expert is in the cache iff it was used within the last
    ``T_C`` tokens, ``T_C`` solving ``D(T) = C`` for ``D(T) = sum_e 1 - (1 - q_e)^T``, the
    expected distinct experts of ``T`` tokens (``T_C`` infinite when ``C`` reaches the experts
    ever used). A request of ``n`` tokens then expects

        hits(n) = k m - D(m) + (n - m) sum_e q_e (1 - (1 - q_e)^T_C),   m = min(n, T_C)

    (no evictions during its first ``T_C`` tokens, then the steady state), and ``D(n)``
    compulsory misses. ``hit_rate = sum hits / (k sum n)``, ``warm_hit_rate = sum hits /
    sum (k n - D(n))``, both over the requests. For uniform loads (``q_e = k/E``) the steady
    state hits ``C/E``, which the warm rate approaches for long requests; for a request that
    repeats one set, the warm rate is 1. NaN without tokens."""
    q = np.asarray(q, np.float64)
    lengths = np.asarray(lengths, np.float64)
    cap = np.asarray(capacities, np.float64)
    if q.ndim != 1 or (q < 0).any() or (q > 1 + 1e-9).any():
        raise ValueError("q must be a 1-d array of probabilities")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if lengths.ndim != 1 or (lengths < 0).any():
        raise ValueError("lengths must be a 1-d array of request counts by length")
    if cap.ndim != 1 or (cap.size and cap.min() < 1):
        raise ValueError("capacities must be a 1-d array of sizes >= 1")
    q = np.minimum(q[q > 0], 1.0)
    n = np.flatnonzero(lengths).astype(np.float64)
    reqs = lengths[lengths > 0]
    accesses = k * float((reqs * n).sum())
    if not accesses or not q.size:
        nan = np.full(cap.size, np.nan)
        return nan, nan.copy()
    t = _che_times(q, cap)
    d_n = _distinct(q, n)  # D(n) per length; D(T_C) = C by definition
    finite = np.isfinite(t)
    steady = np.full(t.size, float(k))
    if finite.any():
        steady[finite] = (q[:, None] * (1.0 - np.power.outer(1.0 - q, t[finite]))).sum(axis=0)
    short = n[None, :] <= t[:, None]  # (C, lengths): no eviction for the whole request
    m = np.where(short, n[None, :], t[:, None])
    d_m = np.where(short, d_n[None, :], cap[:, None])
    hits = ((k * m - d_m + (n[None, :] - m) * steady[:, None]) * reqs).sum(axis=1)
    compulsory = float((d_n * reqs).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / accesses, hits / (accesses - compulsory)


def _che_times(q: np.ndarray, capacities: np.ndarray) -> np.ndarray:
    """``T_C`` with ``D(T_C) = C`` for each capacity (inf where ``C`` >= experts used)."""
    t = np.full(capacities.size, np.inf)
    solve = capacities < q.size
    if not solve.any():
        return t
    target = capacities[solve]
    lo = np.zeros(target.size)
    hi = np.ones(target.size)
    while (short := _distinct(q, hi) < target).any():
        hi[short] *= 2
    for _ in range(60):  # bisection: D is increasing in T
        mid = (lo + hi) / 2
        below = _distinct(q, mid) < target
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    t[solve] = (lo + hi) / 2
    return t


# --------------------------------------------------------------------------- the LRU


@dataclass(frozen=True)
class Reuse:
    """What :meth:`RequestCaches.feed` found for each row it was given (in the given order)."""

    distance: np.ndarray
    """(n, k) LRU stack distance of each access: 1 + distinct experts the request used at that
    layer since its last use of this one; 0 for a first use (compulsory miss)."""
    overlap: np.ndarray
    """(n,) ``|S_t ∩ S_{t-1}|`` with the request's previous token; -1 where the previous
    logged token is not at ``t - 1`` (or there is none)."""
    gap: np.ndarray
    """(n,) bool: the request has an earlier logged token, but not at ``t - 1``."""


class RequestCaches:
    """One LRU state per live (request, layer) group: the recency rank of each expert.

    :meth:`feed` takes rows in any order (a group's rows are put in position order, rows of
    the same position kept in the order given) and computes, vectorised over all groups, each
    access's stack distance against the state that group's earlier tokens left.

    How, for rows sorted by (group, position): one stable sort of the accesses by (group,
    expert) finds each access's previous use of its expert. The distinct experts used between
    the two are the bits set in the OR of the rows' expert bit masks over that window (a sparse
    table gives any window's OR in two lookups), with the previous row's own experts that count
    as more recent (listed before it); when the previous use is in the state, the window starts
    at the group's first row and the state's more recent experts join it. The stack distance is
    1 + the number of bits. Cost: a sort and ``log2(rows)`` passes of ``rows x ceil(E/64)``
    words, whatever ``E``.
    """

    def __init__(self, k: int, num_experts: int) -> None:
        if not 1 <= k <= num_experts < 1 << 15:
            raise ValueError(
                f"need 1 <= k <= num_experts < 32768, got k={k}, num_experts={num_experts}"
            )
        self.k = k
        self.experts = num_experts
        self.codes = np.empty(0, np.int64)
        """Sorted codes of the live groups (any non-negative ints: the pass uses
        ``request * layers + layer slot``)."""
        self.where = np.empty(0, np.int64)
        """Pool row of each code in :attr:`codes`."""
        cap = 64
        self.rank = np.full((cap, num_experts), -1, np.int16)
        """Recency rank of each expert in the group (higher: more recent; -1 never used)."""
        self.count = np.zeros(cap, np.int64)
        """Tokens the group has had (its next token's time)."""
        self.last_tok = np.zeros(cap, np.int64)
        self.last_ids = np.zeros((cap, k), np.int64)
        self.seen = np.zeros(cap, np.int64)
        """Last line seen."""
        self.free = np.arange(cap - 1, -1, -1, dtype=np.int64)
        self.ever = np.zeros(0, bool)
        """Codes ever seen (to tell a resumed request from a new one)."""
        self.resumed = 0
        self.ended: list[tuple[np.ndarray, np.ndarray]] = []
        """(codes, token counts) of the groups dropped since the last :meth:`take_ended`."""

    # ------------------------------------------------------------------ pool

    def widen(self, num_experts: int) -> None:
        """Grow the expert axis (ids seen so far reach ``num_experts - 1``)."""
        if num_experts >= 1 << 15:
            raise ValueError(f"num_experts must be below 32768, got {num_experts}")
        if num_experts > self.experts:
            pad = np.full((self.rank.shape[0], num_experts - self.experts), -1, np.int16)
            self.rank = np.hstack([self.rank, pad])
            self.experts = num_experts

    def _grow(self, need: int) -> None:
        cap = self.rank.shape[0]
        new = max(2 * cap, cap + need)
        self.rank = np.vstack([self.rank, np.full((new - cap, self.experts), -1, np.int16)])
        for name in ("count", "last_tok", "seen"):
            setattr(
                self, name, np.concatenate([getattr(self, name), np.zeros(new - cap, np.int64)])
            )
        self.last_ids = np.vstack([self.last_ids, np.zeros((new - cap, self.k), np.int64)])
        self.free = np.concatenate([np.arange(new - 1, cap - 1, -1, dtype=np.int64), self.free])

    def _lookup(self, codes: np.ndarray) -> np.ndarray:
        """Pool rows of ``codes`` (sorted, distinct); new groups get fresh rows."""
        pos = np.searchsorted(self.codes, codes)
        found = np.zeros(codes.size, bool)
        inside = pos < self.codes.size
        found[inside] = self.codes[pos[inside]] == codes[inside]
        rows = np.empty(codes.size, np.int64)
        rows[found] = self.where[pos[found]]
        new = np.flatnonzero(~found)
        if new.size:
            fresh = codes[new]
            top = int(fresh.max()) + 1
            if top > self.ever.size:
                self.ever = np.concatenate(
                    [self.ever, np.zeros(max(top, 2 * self.ever.size) - self.ever.size, bool)]
                )
            self.resumed += int(np.count_nonzero(self.ever[fresh]))
            self.ever[fresh] = True
            if new.size > self.free.size:
                self._grow(new.size - self.free.size)
            got = self.free[-new.size :][::-1]
            self.free = self.free[: -new.size]
            self.rank[got] = -1
            self.count[got] = 0
            rows[new] = got
            self.codes = np.insert(self.codes, pos[new], fresh)
            self.where = np.insert(self.where, pos[new], got)
        return rows

    def expire(self, before_line: int, max_live: int = MAX_LIVE) -> None:
        """Drop the groups last seen before ``before_line``, then the least recently seen
        beyond ``max_live``; their token counts go to :attr:`ended`."""
        seen = self.seen[self.where]
        drop = seen < before_line
        live = self.codes.size - int(np.count_nonzero(drop))
        if live > max_live:
            order = np.argsort(seen, kind="stable")
            drop[order[: self.codes.size - max_live]] = True
        if drop.any():
            self._drop(drop)

    def end_all(self) -> None:
        """Take every group as finished (end of the log)."""
        if self.codes.size:
            self._drop(np.ones(self.codes.size, bool))

    def _drop(self, drop: np.ndarray) -> None:
        rows = self.where[drop]
        self.ended.append((self.codes[drop], self.count[rows].copy()))
        self.free = np.concatenate([self.free, rows])
        self.codes, self.where = self.codes[~drop], self.where[~drop]

    def take_ended(self) -> tuple[np.ndarray, np.ndarray]:
        """(codes, token counts) of the groups dropped since the last call."""
        if not self.ended:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        codes = np.concatenate([c for c, _ in self.ended])
        counts = np.concatenate([n for _, n in self.ended])
        self.ended = []
        return codes, counts

    # ------------------------------------------------------------------ feeding

    def feed(
        self, group: np.ndarray, tok: np.ndarray, ids: np.ndarray, line: np.ndarray | None = None
    ) -> Reuse:
        """Stack distances and overlaps of the rows ``(group, tok, ids)``, ids below
        :attr:`experts`; ``line`` (for :meth:`expire`) defaults to 0."""
        n = group.size
        if ids.shape != (n, self.k):
            raise ValueError(f"ids must be ({n}, {self.k}), got {ids.shape}")
        if line is None:
            line = np.zeros(n, np.int64)
        order = _group_order(group, tok)
        dist = np.empty((n, self.k), np.int64)
        overlap = np.empty(n, np.int64)
        gap = np.empty(n, bool)
        step = max(1, BATCH_ROWS)
        for s in range(0, n, step):
            rows = order[s : s + step]
            dist[rows], overlap[rows], gap[rows] = self._feed_sorted(
                group[rows], tok[rows], ids[rows], line[rows]
            )
        return Reuse(dist, overlap, gap)

    def _feed_sorted(
        self, group: np.ndarray, tok: np.ndarray, ids: np.ndarray, line: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n, k, e = group.size, self.k, self.experts
        first = np.ones(n, bool)
        first[1:] = group[1:] != group[:-1]
        starts = np.flatnonzero(first)
        gi = np.cumsum(first) - 1
        sizes = np.diff(np.append(starts, n))
        pool = self._lookup(group[starts])
        count = self.count[pool]
        local = np.arange(n) - starts[gi]

        # overlap with the previous token: the row before, or the state's last token
        prev_ids = np.empty_like(ids)
        prev_tok = np.empty(n, np.int64)
        prev_ids[1:], prev_tok[1:] = ids[:-1], tok[:-1]
        prev_ids[starts], prev_tok[starts] = self.last_ids[pool], self.last_tok[pool]
        has_prev = (local > 0) | (count[gi] > 0)
        chain = has_prev & (tok == prev_tok + 1)
        overlap = np.where(chain, set_overlap(ids, prev_ids), -1)

        # accesses oldest first: rows in order, a row's columns last to first (the first
        # listed is the most recent); access a is row a // k, column k - 1 - a % k
        exp = ids[:, ::-1].ravel()
        owner = np.repeat(gi, k)
        key = owner * e + exp
        small = key.size and int(key.max()) < 1 << 16  # radix sort
        order = np.argsort(key.astype(np.uint16) if small else key, kind="stable")
        key = key[order]
        again = np.zeros(order.size, bool)
        again[1:] = key[1:] == key[:-1]
        prev = np.full(order.size, -1)
        prev[order[again]] = order[np.flatnonzero(again) - 1]  # previous use, or -1

        words = _bits(ids, e)  # (n, k, W): each column's expert as a bit mask
        ahead = np.zeros_like(words)  # a row's experts listed before each column
        for c in range(1, k):
            np.bitwise_or(ahead[:, c - 1], words[:, c - 1], out=ahead[:, c])
        table = _or_table(ahead[:, -1] | words[:, -1], int(sizes.max()))
        ahead = ahead[:, ::-1].reshape(n * k, -1)  # in access order
        row = np.repeat(np.arange(n), k)
        seen = np.flatnonzero(prev >= 0)
        lo = np.repeat(starts[gi], k)
        lo[seen] = prev[seen] // k + 1
        window = _range_or(table, lo, row)
        window[seen] |= ahead[prev[seen]]
        warm = prev >= 0
        fresh = np.flatnonzero(~warm & (count[owner] > 0))
        if fresh.size:
            rank = self.rank[pool]
            r = rank[owner[fresh], exp[fresh]].astype(np.int64)
            fresh, r = fresh[r >= 0], r[r >= 0]
            window[fresh] |= _newer_in_state(rank, e)[owner[fresh], r]
            warm[fresh] = True
        dist = np.zeros(n * k, np.int64)
        dist[warm] = _popcount(window[warm]) + 1
        dist = dist.reshape(n, k)[:, ::-1]

        # the state each group leaves: experts by last use, this batch's before the state's
        last = np.ones(order.size, bool)
        last[:-1] = key[:-1] != key[1:]
        value = self.rank[pool].astype(np.int64)
        a = order[last]
        value[owner[a], exp[a]] = order.size + a  # later accesses have higher indices
        self.rank[pool] = _dense_ranks(value)
        end = starts + sizes - 1
        self.count[pool] = count + sizes
        self.last_tok[pool] = tok[end]
        self.last_ids[pool] = ids[end]
        self.seen[pool] = np.maximum.reduceat(line, starts)
        return dist, overlap, has_prev & ~chain


def _bits(ids: np.ndarray, experts: int) -> np.ndarray:
    """``(n, k, W)`` uint64: expert ``ids[i, j]`` as bit ``id % 64`` of word ``id // 64``."""
    one = np.left_shift(np.uint64(1), (ids & 63).astype(np.uint64))
    if experts <= 64:
        return one[:, :, None]
    words = np.zeros((*ids.shape, (experts + 63) // 64), np.uint64)
    idx = np.indices(ids.shape)
    words[idx[0], idx[1], ids >> 6] = one
    return words


def _or_table(rows: np.ndarray, longest: int) -> np.ndarray:
    """Sparse table of ``rows`` (``(n, W)`` masks): ``t[L, i]`` = OR of rows ``i .. i + 2^L -
    1`` (clipped at the end), for windows up to ``longest`` rows."""
    levels = max(int(longest).bit_length(), 1)
    t = np.empty((levels, *rows.shape), np.uint64)
    t[0] = rows
    for lv in range(1, levels):
        half = 1 << (lv - 1)
        t[lv] = t[lv - 1]
        t[lv, :-half] |= t[lv - 1, half:]
    return t


_LOG2 = np.zeros(BATCH_ROWS + 1, np.int64)
_LOG2[2:] = np.floor(np.log2(np.arange(2, BATCH_ROWS + 1))).astype(np.int64)


def _range_or(table: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """OR of rows ``lo .. hi - 1`` for each pair (0 for an empty window): ``(m, W)``."""
    length = hi - lo
    lv = _LOG2[length] if length.size and int(length.max()) < _LOG2.size else _log2(length)
    n, w = table.shape[1], table.shape[2]
    first = lv * n + lo
    second = first + (length - (1 << lv))
    if w == 1:  # 1-d gathers are several times faster than gathers of 1-word rows
        flat = table.reshape(-1)
        out = (flat[first] | flat[second])[:, None]
    else:
        flat = table.reshape(-1, w)
        out = flat[first] | flat[second]
    out[length <= 0] = 0
    return out


def _log2(x: np.ndarray) -> np.ndarray:
    """floor(log2(x)) for x >= 1, 0 elsewhere."""
    return np.floor(np.log2(np.maximum(x, 1))).astype(np.int64)


def _newer_in_state(rank: np.ndarray, experts: int) -> np.ndarray:
    """``(G, E, W)``: for each group and rank ``r``, the mask of the group's state experts with
    a higher rank (more recent)."""
    g = rank.shape[0]
    by_rank = np.full((g, experts), -1, np.int64)  # expert of each rank
    gg, ee = np.nonzero(rank >= 0)
    by_rank[gg, rank[gg, ee]] = ee
    bits = np.zeros((g, experts + 1, (experts + 63) // 64), np.uint64)
    gg, rr = np.nonzero(by_rank >= 0)
    x = by_rank[gg, rr]
    bits[gg, rr, x >> 6] = np.left_shift(np.uint64(1), (x & 63).astype(np.uint64))
    newer = np.bitwise_or.accumulate(bits[:, ::-1], axis=1)[:, ::-1]  # ranks r .. E-1
    return newer[:, 1:]


def _dense_ranks(value: np.ndarray) -> np.ndarray:
    """Row by row: 0 for the smallest non-negative value, 1 for the next, ...; -1 where the
    value is negative."""
    order = np.argsort(value, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(value.shape[1]), axis=1)
    ranks -= np.count_nonzero(value < 0, axis=1)[:, None]
    return np.maximum(ranks, -1).astype(np.int16)


_POP8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per row of ``(m, W)`` uint64 words."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words).sum(axis=1, dtype=np.int64)
    return _POP8[words.view(np.uint8)].sum(axis=1, dtype=np.int64)


def _group_order(group: np.ndarray, tok: np.ndarray) -> np.ndarray:
    """Rows by (group, position), ties in the given order: one stable sort of a combined key
    when it fits in 63 bits (about twice as fast as ``lexsort``)."""
    if not group.size:
        return np.arange(0)
    lo, hi = int(tok.min()), int(tok.max())
    span = hi - lo + 1
    if group.min() >= 0 and (int(group.max()) + 1) * span < 1 << 62:
        return np.argsort(group * span + (tok - lo), kind="stable")
    return np.lexsort((tok, group))


# --------------------------------------------------------------------------- results


@dataclass
class PhaseOverlap:
    phase: str
    """Phase of the later token of each pair."""
    pairs: int
    overlap: float
    """Mean ``|S_t ∩ S_{t-1}| / k`` over the pairs whose token ``t`` is in this phase."""
    chance: float
    """:func:`chance_overlap` with this phase's loads."""


@dataclass
class LayerReuse:
    layer: int
    tokens: int
    requests: int
    """(Request, layer) runs: requests, plus one for each return after its state was dropped."""
    pairs: int
    """Consecutive position pairs (t-1, t) of one request."""
    breaks: int
    """Tokens whose request's previous logged token is not at t-1 (a gap)."""
    overlap: float
    chance_overlap: float
    by_phase: list[PhaseOverlap]
    """Only when the log records phases."""
    accesses: int
    """Tokens x k."""
    compulsory: int
    """Accesses that were a request's first use of the expert."""
    capacities: list[int]
    hit_rate: list[float]
    """Per capacity: hits / accesses (compulsory misses count as misses)."""
    warm_hit_rate: list[float]
    """Per capacity: hits / (accesses - compulsory)."""
    chance_hit_rate: list[float]
    """:func:`che_hit_rates`: the same requests with tokens independent, same loads."""
    chance_warm_hit_rate: list[float]

    def at(self, capacity: int) -> int | None:
        """Index of ``capacity`` in :attr:`capacities`, None when not reported."""
        try:
            return self.capacities.index(capacity)
        except ValueError:
            return None


@dataclass
class ReuseResult:
    top_k: int
    num_experts: int
    layers: list[LayerReuse]
    resumed: int
    """(Request, layer) groups that came back after their state had been dropped."""
    horizon_lines: int


# --------------------------------------------------------------------------- the pass


class ReusePass:
    """Feeds every chunk to one :class:`RequestCaches` for all layers and sums, per layer,
    stack distances, overlaps (by phase), expert loads and request lengths."""

    def __init__(self, log: RouteLog, num_experts: int | None, options: PassOptions) -> None:
        assert log.meta is not None
        self.log = log
        self.k = log.meta.top_k
        self.layers = list(log.meta.layers_logged)
        n = len(self.layers)
        self.fixed = num_experts is not None
        e = num_experts or self.k
        self.caches = RequestCaches(self.k, e)
        self.distances = np.zeros((n, e + 1), np.int64)
        self.loads = np.zeros((n, 3, e), np.int64)
        """Selections per (layer slot, phase code + 1, expert)."""
        self.tokens = np.zeros((n, 3), np.int64)
        self.pairs = np.zeros((n, 3), np.int64)
        self.overlap = np.zeros((n, 3), np.int64)
        """Sum of |S_t ∩ S_{t-1}| per (slot, phase of t)."""
        self.breaks = np.zeros(n, np.int64)
        self.lengths: list[np.ndarray] = [np.zeros(1, np.int64) for _ in range(n)]

    def _widen(self, e: int) -> None:
        old = self.distances.shape[1] - 1
        if e <= old:
            return
        self.caches.widen(e)
        self.distances = np.pad(self.distances, ((0, 0), (0, e - old)))
        self.loads = np.pad(self.loads, ((0, 0), (0, 0), (0, e - old)))

    def add(self, chunk: RouteChunk) -> None:
        if not len(chunk):
            return
        if not self.fixed:
            self._widen(int(chunk.ids.max()) + 1)
        nl, e = len(self.layers), self.distances.shape[1] - 1
        slot = self.log.layer_slot(chunk.layer)
        r = self.caches.feed(chunk.req * nl + slot, chunk.token_idx, chunk.ids, chunk.line)
        ph = chunk.phase.astype(np.int64) - NO_PHASE  # 0 unknown, 1 prefill, 2 decode
        cell = slot * 3 + ph
        self.tokens += np.bincount(cell, minlength=nl * 3).reshape(nl, 3)
        sel = (cell[:, None] * e + chunk.ids).ravel()
        self.loads += np.bincount(sel, minlength=nl * 3 * e).reshape(nl, 3, e)
        d = (slot[:, None] * (e + 1) + r.distance).ravel()
        self.distances += np.bincount(d, minlength=nl * (e + 1)).reshape(nl, e + 1)
        chained = r.overlap >= 0
        self.pairs += np.bincount(cell[chained], minlength=nl * 3).reshape(nl, 3)
        self.overlap += (
            np.bincount(cell[chained], weights=r.overlap[chained], minlength=nl * 3)
            .astype(np.int64)
            .reshape(nl, 3)
        )
        self.breaks += np.bincount(slot[r.gap], minlength=nl)
        self.caches.expire(int(chunk.line[-1]) - HORIZON_LINES)
        self._record_lengths()

    def _record_lengths(self) -> None:
        codes, counts = self.caches.take_ended()
        if not codes.size:
            return
        slots = codes % len(self.layers)
        for s in np.unique(slots).tolist():
            c = np.bincount(counts[slots == s])
            if c.size > self.lengths[s].size:
                c[: self.lengths[s].size] += self.lengths[s]
                self.lengths[s] = c
            else:
                self.lengths[s][: c.size] += c

    def finish(self) -> ReuseResult:
        self.caches.end_all()
        self._record_lengths()
        k = self.k
        e = self.distances.shape[1] - 1
        caps = capacity_grid(k, max(e, k))
        return ReuseResult(
            top_k=k,
            num_experts=e,
            layers=[self._layer(s, layer, caps) for s, layer in enumerate(self.layers)],
            resumed=self.caches.resumed,
            horizon_lines=HORIZON_LINES,
        )

    def _layer(self, s: int, layer: int, caps: np.ndarray) -> LayerReuse:
        k = self.k
        tokens = int(self.tokens[s].sum())
        loads = self.loads[s].sum(axis=0)
        pairs = int(self.pairs[s].sum())
        by_phase = []
        if self.tokens[s, 1:].any():
            for p in range(3):
                if self.tokens[s, p]:
                    by_phase.append(
                        PhaseOverlap(
                            PHASE_LABELS[p],
                            int(self.pairs[s, p]),
                            _ratio(self.overlap[s, p], self.pairs[s, p] * k),
                            chance_overlap(self.loads[s, p], int(self.tokens[s, p]), k),
                        )
                    )
        hist = self.distances[s]
        hit, warm = hit_rates(hist, caps)
        q = loads / tokens if tokens else np.zeros_like(loads, dtype=np.float64)
        c_hit, c_warm = che_hit_rates(q, k, self.lengths[s], caps)
        return LayerReuse(
            layer=layer,
            tokens=tokens,
            requests=int(self.lengths[s][1:].sum()),
            pairs=pairs,
            breaks=int(self.breaks[s]),
            overlap=_ratio(self.overlap[s].sum(), pairs * k),
            chance_overlap=chance_overlap(loads, tokens, k),
            by_phase=by_phase,
            accesses=int(hist.sum()),
            compulsory=int(hist[0]),
            capacities=caps.tolist(),
            hit_rate=hit.tolist(),
            warm_hit_rate=warm.tolist(),
            chance_hit_rate=c_hit.tolist(),
            chance_warm_hit_rate=c_warm.tolist(),
        )


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else math.nan


@register("reuse")
def _make(log: RouteLog, num_experts: int | None, options: PassOptions) -> ReusePass:
    return ReusePass(log, num_experts, options)
