"""Running sums of routes, a chunk at a time: logs are too big to hold, so ``analyze`` folds each
chunk of routes into a few fixed-size arrays per (layer, phase) and merges them at the end.
:func:`moeprof.analysis.summary.summarize` turns the sums into the reported numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moeprof.analysis.reader import NO_PHASE, PHASES, IssueSink, LogBase

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

MAX_DENSE_PAIR_CELLS = 1 << 22
"""Above this many cells (streams x E x E) a chunk's co-selection pairs are added in place
with ``np.add.at`` rather than counted by one ``np.bincount`` over every cell (32 MiB)."""


def stream_keys(slot: np.ndarray, phase: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """One key per route for its (layer slot, phase code): ``slot * len(PHASE_CODES) + phase
    offset``, so every (slot, phase) stream of a log has its own small non-negative int."""
    key = np.multiply(slot, len(PHASE_CODES), out=out, dtype=np.int64)
    np.add(key, phase, out=key)
    key -= PHASE_CODES.start
    return key


def _key_parts(key: int) -> tuple[int, int]:
    """(layer slot, phase code) of a :func:`stream_keys` key."""
    slot, offset = divmod(key, len(PHASE_CODES))
    return slot, PHASE_CODES[offset]


class _Scratch:
    """Arrays reused from one chunk to the next. A chunk's temporaries are MiBs each, and
    glibc hands memory that large back to the system when it is freed: allocated afresh for
    every chunk, their page faults cost as much as the arithmetic on them."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        size = int(np.prod(shape))
        buf = self._arrays.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self._arrays[name] = np.empty(size, dtype)
        return buf[:size].reshape(shape)


class LayerPhaseCounts:
    """Expert activation counts per (layer slot, phase code): analyze's *load statistics*, the
    numbers its load-balance output (CV, max/mean, entropy, Gini, never-used, top experts) is
    computed from. ``add`` a chunk at a time; each chunk costs one ``np.bincount`` over
    ``key * width + id`` for all streams at once.

    The counts live in one (streams, width) array, a row per stream with routes in the order
    of its first route (ascending :func:`stream_keys` within a chunk); ``width`` is the declared
    ``num_experts`` or, without it, the largest id seen + 1 (each stream's own width, for
    :meth:`counts`, is its largest id + 1, as a :class:`RoutingAccumulator` would have it).
    """

    def __init__(self, num_experts: int | None) -> None:
        self.num_experts = num_experts
        self.matrix = np.zeros((0, num_experts or 0), np.int64)
        """matrix[row, e]: routes of stream ``keys[row]`` that selected expert e."""
        self.tokens = np.zeros(0, np.int64)
        """tokens[row]: routes of stream ``keys[row]``."""
        self.keys: list[int] = []
        """The :func:`stream_keys` key of each row."""
        self._row_of_key = np.zeros(0, np.int64)
        """key -> row, -1 for a stream not seen yet."""
        self._scratch = _Scratch()

    def add(self, slot: np.ndarray, phase: np.ndarray, ids: np.ndarray) -> None:
        """Fold in routes: ``slot`` and ``phase`` (n,) codes, ``ids`` (n, k) non-negative ints.

        Raises :class:`ImplausibleExpertIdError` when an id would grow the expert axis beyond
        ``MAX_INFERRED_EXPERTS``."""
        if len(ids):
            key = stream_keys(slot, phase, self._scratch.get("key", (len(ids),), np.int64))
            self.add_keyed(key, ids)

    def add_keyed(self, key: np.ndarray, ids: np.ndarray) -> _Chunk:
        """:meth:`add` with the routes' :func:`stream_keys` given; returns what a chunk's
        other sums need (:class:`_Chunk`)."""
        if ids.dtype.kind == "u":  # key * width + id must stay an int
            ids = ids.astype(np.int64)
        n, k = ids.shape
        sizes = np.bincount(key)
        if sizes.size > self._row_of_key.size:
            grown = np.full(sizes.size, -1, np.int64)
            grown[: self._row_of_key.size] = self._row_of_key
            self._row_of_key = grown
        present = np.flatnonzero(sizes)
        new = present[self._row_of_key[present] < 0]
        if new.size:
            self._row_of_key[new] = np.arange(len(self.keys), len(self.keys) + new.size)
            self.keys.extend(new.tolist())
        self._grow(len(self.keys), int(ids.max()) + 1)
        width = self.matrix.shape[1]
        # rank-major: codes[r] for the ids of rank r (column r), so codes line up with weights
        # held as rows by rank
        codes = self._scratch.get("codes", (k, n), np.int64)
        np.multiply(key, width, out=codes[k - 1])
        for r in range(k - 1):
            np.add(codes[k - 1], ids[:, r], out=codes[r])
        codes[k - 1] += ids[:, k - 1]
        chunk = _Chunk(key, sizes.size, present, self._row_of_key[present], codes.reshape(-1))
        counts = np.bincount(chunk.codes, minlength=chunk.keys * width)
        self.matrix[chunk.rows] += counts.reshape(chunk.keys, width)[present]
        self.tokens[chunk.rows] += sizes[present]
        return chunk

    def _grow(self, rows: int, width: int) -> None:
        old_rows, old_width = self.matrix.shape
        if rows <= old_rows and width <= old_width:
            return
        if width > MAX_INFERRED_EXPERTS:
            raise ImplausibleExpertIdError(width - 1)
        rows, width = max(rows, old_rows), max(width, old_width)
        self.matrix = _pad2(self.matrix, rows, width)
        self.tokens = _pad(self.tokens, rows)

    def stream_width(self, row: int) -> int:
        """``num_experts``, or the stream's largest id + 1 when the log does not declare it."""
        if self.num_experts is not None:
            return int(self.matrix.shape[1])
        used = np.flatnonzero(self.matrix[row])
        return int(used[-1]) + 1 if used.size else 0

    def counts(self, slot: int, phase: int) -> np.ndarray:
        """counts[e] of one stream (an empty array for a stream without routes)."""
        key = slot * len(PHASE_CODES) + phase - PHASE_CODES.start
        if key >= self._row_of_key.size or self._row_of_key[key] < 0:
            return np.zeros(0, np.int64)
        row = int(self._row_of_key[key])
        return self.matrix[row, : self.stream_width(row)].copy()

    def by_phase(self, slot: int) -> dict[int, np.ndarray]:
        """The counts of one layer slot, by phase code, for the phases it has routes in."""
        out = {}
        for key in self.keys:
            s, phase = _key_parts(key)
            if s == slot:
                out[phase] = self.counts(s, phase)
        return out

    def widest(self) -> int:
        """Length of the longest expert axis: max expert id + 1 over everything added."""
        return max((self.stream_width(r) for r in range(len(self.keys))), default=0)


@dataclass(frozen=True)
class _Chunk:
    """A chunk as :meth:`LayerPhaseCounts.add_keyed` saw it."""

    key: np.ndarray
    """(n,) each route's :func:`stream_keys` key."""
    keys: int
    """Keys in the chunk's key space: max key + 1."""
    present: np.ndarray
    """The keys with routes in the chunk, ascending."""
    rows: np.ndarray
    """The row of each present key's stream."""
    codes: np.ndarray
    """(k * n,) ``key * width + id``, rank-major (all first ids, then all second ids, ...)."""


def _pair_codes(key: np.ndarray, ids: np.ndarray, width: int, out: np.ndarray) -> np.ndarray:
    """``(key * width + i) * width + j`` for every pair of a route's ids, i from an earlier
    column than j (see :meth:`RoutingAccumulator.coselection`), into ``out``
    (k(k-1)/2, n)."""
    k = ids.shape[1]
    j = 0
    for a in range(k):
        for b in range(a + 1, k):
            np.multiply(key, width, out=out[j])
            np.add(out[j], ids[:, a], out=out[j])
            out[j] *= width
            np.add(out[j], ids[:, b], out=out[j])
            j += 1
    return out.reshape(-1)


RUN_SUMS_SHARE = 64
"""Routes per run of one key, on average, from which :func:`_sums_by_key` sums runs."""


def _sums_by_key(key: np.ndarray, values: np.ndarray, keys: int) -> np.ndarray:
    """(keys, m) sums of ``values`` (m, n) over the columns of each key (ints below ``keys``).
    Routes of one stream usually come in long runs (a one-layer log) or interleaved (a token's
    layers on consecutive rows): long runs are summed as slices (one ``np.bincount`` per row of
    ``values`` would add into the same few bins one after the other, ~8x slower), interleaved
    keys by ``np.bincount``."""
    n = key.size
    starts = np.flatnonzero(key[1:] != key[:-1]) + 1
    if starts.size * RUN_SUMS_SHARE < n:
        starts = np.concatenate([[0], starts])
        runs = np.add.reduceat(values, starts, axis=1)  # (m, runs)
        run_key = key[starts]
        return np.stack([np.bincount(run_key, weights=row, minlength=keys) for row in runs], axis=1)
    return np.stack([np.bincount(key, weights=row, minlength=keys) for row in values], axis=1)


def _pad2(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out = np.zeros((rows, cols, *a.shape[2:]), a.dtype)
    out[: a.shape[0], : a.shape[1]] = a
    return out


class LayerPhaseAccumulators:
    """One :class:`RoutingAccumulator` per (layer slot, phase code) of a log, fed whole chunks.

    A layer slot is the layer's index in the meta's ``layers_logged``; phase codes are those of
    :data:`PHASE_CODES`. The sums of every stream are kept side by side in arrays with one row
    per stream (the rows of a :class:`LayerPhaseCounts`, which holds the counts), so a chunk is
    folded in with a few ``np.bincount`` calls over all its routes, whatever the number of
    streams; :meth:`by_phase` hands each stream out as a :class:`RoutingAccumulator`. Integer
    sums are exactly those of one ``RoutingAccumulator.add`` per stream and chunk; float sums
    add the same terms, not always in the same order (equal to float64 rounding).

    A log without ``num_experts`` whose ids reach ``MAX_COSELECT_EXPERTS`` (where each stream
    drops its co-selection matrix on its own) continues with one ``RoutingAccumulator`` per
    stream.
    """

    def __init__(self, num_experts: int | None) -> None:
        self.num_experts = num_experts
        self._counts = LayerPhaseCounts(num_experts)
        width = num_experts or 0
        self._weight_sums = np.zeros((0, width), np.float64)
        self._pairs: np.ndarray | None = (
            None
            if num_experts is not None and num_experts > MAX_COSELECT_EXPERTS
            else np.zeros((0, width, width), np.int64)
        )
        self._top1 = np.zeros(0, np.float64)
        self._token_sum = np.zeros(0, np.float64)
        self._token_sq_sum = np.zeros(0, np.float64)
        self._rank_sums: np.ndarray | None = None
        self._accs: dict[tuple[int, int], RoutingAccumulator] | None = None
        """The streams as accumulators, once the arrays above are given up (see the class)."""
        self._scratch = self._counts._scratch

    def add(
        self, slot: np.ndarray, phase: np.ndarray, ids: np.ndarray, weights: np.ndarray
    ) -> None:
        """Fold in routes: ``slot`` and ``phase`` (n,) codes, ``ids`` (n, k) non-negative
        ints, ``weights`` (n, k) floats."""
        n, k = ids.shape
        if n == 0:
            return
        if (
            self._accs is None
            and self.num_experts is None
            and int(ids.max()) >= MAX_COSELECT_EXPERTS
        ):
            keys = self._counts.keys
            self._accs = {_key_parts(key): self._stream(row) for row, key in enumerate(keys)}
        if self._accs is not None:
            self._add_by_stream(slot, phase, ids, weights)
            return
        key = stream_keys(slot, phase, self._scratch.get("key", (n,), np.int64))
        chunk = self._counts.add_keyed(key, ids)
        rows, width = self._counts.matrix.shape
        self._grow(rows, width, k)
        # by rank, as rows: w[r] holds each route's weight of rank r (column r); w[k] its
        # weight sum squared
        w = self._scratch.get("weights", (k + 1, n), np.float64)
        w[:k] = weights.T
        self._weight_sums[chunk.rows] += _by_key(chunk, width, w[:k].reshape(-1))
        if self._pairs is not None and k > 1:
            self._add_pairs(chunk, ids, width)
        if k > 1 and not all((w[r] >= w[r + 1]).all() for r in range(k - 1)):
            w[:k] = -np.sort(-weights.astype(np.float64), axis=1).T  # vLLM's top-k is sorted
        per_token = w[k]
        np.add(w[0], w[1] if k > 1 else 0.0, out=per_token)
        for r in range(2, k):
            per_token += w[r]
        np.square(per_token, out=per_token)
        sums = _sums_by_key(key, w, chunk.keys)[chunk.present]  # (present, k + 1)
        per_rank = sums[:, :k]
        self._top1[chunk.rows] += per_rank[:, 0]
        self._token_sum[chunk.rows] += per_rank.sum(axis=1)
        self._token_sq_sum[chunk.rows] += sums[:, k]
        assert self._rank_sums is not None
        self._rank_sums[chunk.rows] += per_rank

    def _add_pairs(self, chunk: _Chunk, ids: np.ndarray, width: int) -> None:
        assert self._pairs is not None
        n, k = ids.shape
        out = self._scratch.get("pairs", (k * (k - 1) // 2, n), np.int64)
        cells = chunk.keys * width * width
        if cells <= max(MAX_DENSE_PAIR_CELLS, 4 * out.size):
            pairs = _pair_codes(chunk.key, ids, width, out)
            counts = np.bincount(pairs, minlength=cells).reshape(chunk.keys, width, width)
            self._pairs[chunk.rows] += counts[chunk.present]
        else:  # many streams of many experts: add each pair where it belongs
            row_of_key = np.full(chunk.keys, -1, np.int64)
            row_of_key[chunk.present] = chunk.rows
            pairs = _pair_codes(row_of_key[chunk.key], ids, width, out)
            np.add.at(self._pairs.reshape(-1), pairs, 1)

    def _grow(self, rows: int, width: int, k: int) -> None:
        if self._rank_sums is None:
            self._rank_sums = np.zeros((0, k), np.float64)
        if self._weight_sums.shape == (rows, width) and self._rank_sums.shape[0] == rows:
            return
        self._weight_sums = _pad2(self._weight_sums, rows, width)
        if self._pairs is not None:
            grown = np.zeros((rows, width, width), np.int64)
            old_rows, old_width = self._pairs.shape[:2]
            grown[:old_rows, :old_width, :old_width] = self._pairs
            self._pairs = grown
        self._top1 = _pad(self._top1, rows)
        self._token_sum = _pad(self._token_sum, rows)
        self._token_sq_sum = _pad(self._token_sq_sum, rows)
        self._rank_sums = _pad(self._rank_sums, rows)

    def _stream(self, row: int) -> RoutingAccumulator:
        """The sums of the stream in ``row`` as a :class:`RoutingAccumulator` (a copy)."""
        width = self._counts.stream_width(row)
        acc = RoutingAccumulator(self.num_experts)
        acc.counts = self._counts.matrix[row, :width].copy()
        acc.expert_weight_sums = self._weight_sums[row, :width].copy()
        if acc.pair_counts is not None and self._pairs is not None:
            acc.pair_counts = self._pairs[row, :width, :width].copy()
        acc.tokens = int(self._counts.tokens[row])
        acc.top1_weight_sum = float(self._top1[row])
        acc.token_weight_sum = float(self._token_sum[row])
        acc.token_weight_sq_sum = float(self._token_sq_sum[row])
        assert self._rank_sums is not None
        acc.rank_weight_sums = self._rank_sums[row].copy()
        return acc

    def _add_by_stream(
        self, slot: np.ndarray, phase: np.ndarray, ids: np.ndarray, weights: np.ndarray
    ) -> None:
        """One stable sort of the routes by (slot, phase), then one ``RoutingAccumulator.add``
        per stream on its contiguous slice."""
        assert self._accs is not None
        key = stream_keys(slot, phase)
        sizes = np.bincount(key)
        present = np.flatnonzero(sizes)
        if present.size > 1:
            order = np.argsort(key, kind="stable")  # np.take: 6x faster than [order]
            ids, weights = np.take(ids, order, axis=0), np.take(weights, order, axis=0)
        start = 0
        for code in present.tolist():
            stop = start + int(sizes[code])
            part = _key_parts(code)
            acc = self._accs.get(part)
            if acc is None:
                acc = self._accs[part] = RoutingAccumulator(self.num_experts)
            acc.add(ids[start:stop], weights[start:stop])
            start = stop

    def by_phase(self, slot: int) -> dict[int, RoutingAccumulator]:
        """The accumulators of one layer slot, by phase code, in the order they were created."""
        if self._accs is not None:
            return {p: acc for (s, p), acc in self._accs.items() if s == slot}
        return {
            phase: self._stream(row)
            for row, key in enumerate(self._counts.keys)
            for s, phase in [_key_parts(key)]
            if s == slot
        }

    def widest(self) -> int:
        """Length of the longest expert axis: max expert id + 1 over everything added."""
        if self._accs is not None:
            return max((acc.counts.size for acc in self._accs.values()), default=0)
        return self._counts.widest()


def _by_key(chunk: _Chunk, width: int, weights: np.ndarray) -> np.ndarray:
    """(present keys, width) sums of ``weights`` (aligned with ``chunk.codes``) per cell."""
    sums = np.bincount(chunk.codes, weights=weights, minlength=chunk.keys * width)
    return sums.reshape(chunk.keys, width)[chunk.present]


def load_statistics(log: LogBase, on_issue: IssueSink | None = None) -> LayerPhaseCounts:
    """analyze's load statistics of ``log`` (see :class:`LayerPhaseCounts`), read from only the
    columns they need (:meth:`~moeprof.analysis.reader.LogBase.load_chunks`: layer, phase,
    expert ids) and checked as far as those columns go. Problems go to ``on_issue``; without
    it the first error raises :class:`~moeprof.analysis.reader.LogError`."""
    assert log.meta is not None
    counts = LayerPhaseCounts(log.meta.num_experts)
    for chunk in log.load_chunks(on_issue, weights=False):
        counts.add(log.layer_slot(chunk.layer), chunk.phase, chunk.ids)
    return counts
