"""Signs that a log holds more than real tokens, kept apart by what causes them.

Why contamination is checked on every ``analyze`` run: a log polluted by warm-up/dummy batches
produces confident, wrong numbers ("top-3 experts carry 51% of the load"). The detector costs
little, so every analysis says what looks suspect, and ``--exclude-suspect`` re-reads the log
without it (:class:`SuspectFilter`).

Each record falls in exactly one class (:class:`Contamination`):

- **dummy batch**: it sits in a run of at least ``min_run`` consecutive records of one layer
  with identical routes (all k ids in order and all k weights, bit for bit). vLLM's memory
  profiling, sampler warm-up and CUDA-graph capture feed batches of identical dummy tokens, and
  a hook that logs them writes thousands of identical routes in a row; real consecutive tokens
  practically never share every id and every float weight. Such runs usually have one of
  vLLM's dummy batch sizes (:func:`vllm_batch_size`: 8,192, 2,048, 512, 256, ...).
- **double-logged**: outside dummy runs, its (req_id, token_idx, layer) key was logged before
  with the *same* route: the same token written twice (a hook installed twice, two ranks
  writing, a block written again). Only when the log's keys identify tokens (below).
- **kept**: everything else, including records that repeat a key with a *different* route.
  Those are not double logging; they are counted, by what the key's previous record was:
  a dummy-batch record (real tokens reusing keys a dummy batch used first: a naive hook gives
  dummy batches the ids of real requests) or a real record (a key collision).

**Degenerate key scheme**: some writers give every record one req_id and a ``token_idx``
counter that restarts with each batch, so keys repeat all the time with different routes.
When key collisions (different route, previous record not a dummy) reach
:data:`DEGENERATE_SHARE` of the records outside dummy runs (and at least
:data:`DEGENERATE_MIN`), the key scheme is reported as degenerate: repeated keys then mean
nothing, and nothing is called double logging (a real token repeating a key with the same
route, e.g. a shared prompt prefix at the same position, is not told apart from a second
copy). Only dummy runs are then excluded.

"Same route" compares a 32-bit fingerprint of the route (:func:`route_fingerprints`): two
different routes are taken for the same with probability 2**-32 per comparison.

Memory: the detector (:class:`ContaminationDetector`) keeps 1 bit per (request, layer,
position) key (:class:`~moeprof.analysis.positions.PositionSet`, about 2.5 MB per 10M routes)
to find the keys that repeat, and those keys (8 bytes each). Only when keys repeat outside
dummy runs (a hook's logs have none, unless written twice) is the log read a second time
(:meth:`ContaminationDetector.reread`), keeping the route fingerprint last logged under each
repeated key (:class:`KeyedRoutes`, 12 bytes per repeated key) to tell double logging from key
collisions. Besides: 8 bytes per (request, layer) for ``token_idx`` restarts and one small
record per run found. The exclusion pass of ``--exclude-suspect`` keeps fingerprints for the
repeated keys only when double logging was found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from moeprof.analysis.positions import PositionSet

DEGENERATE_SHARE = 0.05
"""Key collisions (a key repeated with a different route, its previous record not a dummy)
in at least this share of the records outside dummy runs make the key scheme degenerate."""
DEGENERATE_MIN = 64
"""... and at least this many of them (a handful of collisions in a small log is not a
scheme)."""

VLLM_CAPTURE_SIZES = frozenset([1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)])
"""vLLM's default CUDA-graph capture sizes (``[1, 2, 4] + range(8, 256, 8) + range(256, 513,
16)``, vllm/config/vllm.py): each is captured with a dummy batch of that many tokens."""

KeyScheme = Literal["distinct", "degenerate"]


def vllm_batch_size(n: int) -> bool:
    """Whether ``n`` tokens is a batch size vLLM runs dummy batches at: a default CUDA-graph
    capture size (:data:`VLLM_CAPTURE_SIZES`), or a power of two from 64 up, the sizes of
    ``max_num_batched_tokens`` (memory profiling: 2,048, 8,192, 16,384 by default, by usage)
    and of ``max_num_seqs`` (sampler warm-up: 256, 1,024)."""
    if n < 1:
        raise ValueError(f"`n` must be a positive batch size, got {n}")
    return n in VLLM_CAPTURE_SIZES or (n >= 64 and n & (n - 1) == 0)


def degenerate_keys(
    collisions: int,
    real_records: int,
    *,
    share: float = DEGENERATE_SHARE,
    minimum: int = DEGENERATE_MIN,
) -> bool:
    """Whether (req_id, token_idx, layer) keys fail to identify tokens: ``collisions``, the
    records outside dummy runs whose key's previous record is a real one with a different
    route, are at least ``minimum`` and at least ``share`` of ``real_records`` (the records
    outside dummy runs)."""
    if collisions < 0 or real_records < 0:
        raise ValueError("`collisions` and `real_records` must be >= 0")
    if collisions > real_records:
        raise ValueError(f"`collisions` ({collisions}) exceeds `real_records` ({real_records})")
    if not 0 < share <= 1:
        raise ValueError(f"`share` must be in (0, 1], got {share}")
    return collisions >= minimum and collisions >= share * real_records


# --------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class Run:
    """Consecutive records of one layer with identical ids and weights (lines inclusive)."""

    layer: int
    first_line: int
    last_line: int
    length: int


@dataclass(frozen=True)
class RepeatedKeys:
    """Records outside dummy runs whose (req_id, token_idx, layer) key an earlier record had,
    by how their route compares with the key's previous record."""

    same_route: int = 0
    """The same route: double logging (unless the key scheme is degenerate)."""
    after_dummy: int = 0
    """A different route, the previous record a dummy-batch one: a real token reusing a key
    that a dummy batch used first."""
    different_route: int = 0
    """A different route, the previous record a real one: a key collision."""

    @property
    def total(self) -> int:
        return self.same_route + self.after_dummy + self.different_route


@dataclass
class Contamination:
    """Each record in one class: dummy batch, double-logged, or kept (see the module doc).
    ``dummy_records + double_logged_records + kept_records == records``."""

    records: int = 0
    dummy_records: int = 0
    """Records in runs of >= ``min_run`` consecutive identical routes of one layer."""
    dummy_runs: int = 0
    run_lengths: dict[int, int] = field(default_factory=dict)
    """Length -> number of dummy runs that long (runs are per layer)."""
    vllm_sized_runs: int = 0
    """Dummy runs whose length is one of vLLM's dummy batch sizes (:func:`vllm_batch_size`)."""
    longest_run: Run | None = None
    double_logged_records: int = 0
    """Outside dummy runs, records whose key's previous record has the same route; 0 when the
    key scheme is degenerate."""
    kept_records: int = 0
    repeated_keys: RepeatedKeys = field(default_factory=RepeatedKeys)
    """The kept and double-logged records that repeat a key, by kind."""
    key_scheme: KeyScheme = "distinct"
    """'degenerate' when keys repeat with different routes too often to identify tokens."""
    req_ids: int = 0
    """Distinct req_ids in the log."""
    token_idx_restarts: int = 0
    """Records whose token_idx is not above the previous one of the same (req_id, layer)."""
    suspect_records: int = 0
    """``dummy_records + double_logged_records``: what ``--exclude-suspect`` leaves out."""
    min_run: int = 64

    @property
    def suspect_share(self) -> float:
        return self.suspect_records / self.records if self.records else 0.0

    @property
    def suspicious(self) -> bool:
        return self.suspect_records > 0

    @property
    def degenerate(self) -> bool:
        return self.key_scheme == "degenerate"

    def describe(self) -> str:
        """What looks suspect, one sentence per class (dummy batches, double logging), then
        what the keys say (degenerate, or reused with other routes); '' for a clean log."""
        out = []
        if self.suspicious:
            out.append(
                f"{self.suspect_records:,} of {self.records:,} records "
                f"({self.suspect_share:.1%}) look suspect."
            )
        if self.dummy_records:
            out.append(
                f"Dummy batches: {self.dummy_records:,} records in "
                f"{_plural(self.dummy_runs, 'run')} of >= {self.min_run} identical routes "
                f"({self._lengths()})."
            )
        rk = self.repeated_keys
        if self.degenerate:
            out.append(
                "Double logging: not detectable, keys do not identify tokens in this log "
                f"({_plural(self.req_ids, 'req_id')} for {self.records:,} records, token_idx "
                f"restarts {self.token_idx_restarts:,} times, {rk.different_route:,} records "
                "repeat a real record's key with a different route), so repeated keys are not "
                "taken as double logging."
            )
        elif self.double_logged_records:
            out.append(
                f"Double logging: {self.double_logged_records:,} records repeat an earlier "
                "record's req_id, token_idx, layer and route."
            )
        if not self.degenerate and (rk.after_dummy or rk.different_route):
            parts = []
            if rk.after_dummy:
                parts.append(f"{rk.after_dummy:,} reuse a key a dummy batch used first")
            if rk.different_route:
                parts.append(f"{rk.different_route:,} repeat an earlier key with a different route")
            out.append(f"Kept, not double logging: {' and '.join(parts)}.")
        return " ".join(out)

    def _lengths(self) -> str:
        """'8,192 and 256 long, vLLM's dummy batch sizes' (or counts and a range)."""
        lengths = sorted(self.run_lengths, reverse=True)
        if len(lengths) <= 3:
            shown = [
                f"{n:,}" + (f" (x{self.run_lengths[n]})" if self.run_lengths[n] > 1 else "")
                for n in lengths
            ]
            text = (", ".join(shown[:-1]) + " and " if len(shown) > 1 else "") + shown[-1]
            text += " long"
        else:
            text = f"{lengths[-1]:,} to {lengths[0]:,} long"
        if self.vllm_sized_runs == self.dummy_runs:
            sizes = "vLLM's profiling/CUDA-graph batch size" + ("s" if len(lengths) > 1 else "")
            text += f", {sizes}"
        elif self.vllm_sized_runs:
            text += f", {self.vllm_sized_runs} of them at vLLM's dummy batch sizes"
        longest = self.longest_run
        if longest is not None:
            text += f"; longest at lines {longest.first_line:,}-{longest.last_line:,}"
        return text


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


# --------------------------------------------------------------------------- fingerprints

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def route_fingerprints(ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A 32-bit fingerprint of each route (row): of its ids in order and its weights' float32
    bits (so ``0.0`` and ``-0.0`` differ, as bit-for-bit run detection has them). Equal routes
    get equal fingerprints; different ones collide with probability about 2**-32. Never 0 (0
    means "no route yet" in :class:`KeyedRoutes`). ``ids`` (n, k) integers, ``weights``
    (n, k)."""
    if ids.ndim != 2 or weights.shape != ids.shape:
        raise ValueError(
            f"`ids` and `weights` must be (n, k) arrays of one shape, got {ids.shape} and "
            f"{weights.shape}"
        )
    n, k = ids.shape
    idw = np.ascontiguousarray(ids, np.int64).view(np.uint64)
    wbits = np.ascontiguousarray(weights, np.float32).view(np.uint32).astype(np.uint64)
    h = np.full(n, np.uint64(k), np.uint64)
    for j in range(k):
        h = (h ^ idw[:, j]) * _M1
        h = (h ^ wbits[:, j]) * _M1
    h ^= h >> np.uint64(30)
    h *= _M2
    h ^= h >> np.uint64(27)
    h *= _M3
    h ^= h >> np.uint64(31)
    fp = (h >> np.uint64(32)).astype(np.uint32)
    fp[fp == 0] = 1
    return fp


def _exchange_slots(buf: np.ndarray, slot: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Write fingerprints ``fp`` (rows in file order) to ``buf[slot]``; returns what each row's
    slot held before it (an earlier call's value or an earlier row's of this one)."""
    order = np.argsort(slot, kind="stable")
    s = slot[order]
    f = fp[order]
    first = np.ones(s.size, bool)
    first[1:] = s[1:] != s[:-1]
    prev_sorted = np.empty(s.size, np.uint32)
    prev_sorted[first] = buf[s[first]]
    later = np.flatnonzero(~first)
    prev_sorted[later] = f[later - 1]
    last = np.ones(s.size, bool)
    last[:-1] = first[1:]
    buf[s[last]] = f[last]
    prev = np.empty(s.size, np.uint32)
    prev[order] = prev_sorted
    return prev


_FAR = PositionSet.FAR
"""Positions from here on are kept as (group, position) tuples; below, a key is one int64,
``group * _FAR + position``."""


class _KeySet:
    """A growing set of (group, position) keys: a sorted int64 array, new keys pending in a
    list and merged when they outnumber it (so its memory follows the distinct keys added)."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_size = 0
        self.far: set[tuple[int, int]] = set()

    def add(self, group: np.ndarray, pos: np.ndarray) -> None:
        if group.size == 0:
            return
        group = group.astype(np.int64, copy=False)
        pos = pos.astype(np.int64, copy=False)
        near = pos < _FAR
        if not near.all():
            for i in np.flatnonzero(~near).tolist():
                self.far.add((int(group[i]), int(pos[i])))
            group, pos = group[near], pos[near]
        keys = group * _FAR + pos
        self._pending.append(keys)
        self._pending_size += keys.size
        if self._pending_size > max(self._keys.size, 1 << 16):
            self._merge()

    def _merge(self) -> None:
        if self._pending:
            self._keys = np.unique(np.concatenate([self._keys, *self._pending]))
            self._pending, self._pending_size = [], 0

    @property
    def keys(self) -> np.ndarray:
        """The near keys, sorted, each once."""
        self._merge()
        return self._keys

    def __len__(self) -> int:
        return int(self.keys.size) + len(self.far)


class KeyedRoutes:
    """The fingerprint of the route last logged under each of a fixed set of (group, position)
    keys (those :class:`_KeySet` found repeated): 4 bytes and an 8-byte key per key in the set;
    rows with other keys are passed over."""

    def __init__(self, keys: _KeySet) -> None:
        self._keys = keys.keys
        self._fp = np.zeros(self._keys.size, np.uint32)
        self._far = dict.fromkeys(keys.far, 0)

    @property
    def nbytes(self) -> int:
        return int(self._keys.nbytes + self._fp.nbytes)

    def exchange(
        self, group: np.ndarray, pos: np.ndarray, ids: np.ndarray, weights: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log the routes of the rows (in file order) whose key is in the set: (those rows,
        their route fingerprints, the fingerprint their key held before each, 0 for a key's
        first record)."""
        n = group.size
        empty = np.zeros(0, np.int64), np.zeros(0, np.uint32), np.zeros(0, np.uint32)
        if n == 0 or (self._keys.size == 0 and not self._far):
            return empty
        group = group.astype(np.int64, copy=False)
        pos = pos.astype(np.int64, copy=False)
        near = pos < _FAR
        keys = group * _FAR + np.where(near, pos, 0)
        idx = np.searchsorted(self._keys, keys)
        np.minimum(idx, self._keys.size - 1, out=idx)
        member = near & (self._keys[idx] == keys) if self._keys.size else np.zeros(n, bool)
        if self._far and not near.all():
            for i in np.flatnonzero(~near).tolist():
                member[i] = (int(group[i]), int(pos[i])) in self._far
        rows = np.flatnonzero(member)
        if rows.size == 0:
            return empty
        fp = route_fingerprints(ids[rows], weights[rows])
        prev = np.zeros(rows.size, np.uint32)
        is_near = near[rows]
        if is_near.all():
            prev = _exchange_slots(self._fp, idx[rows], fp)
        else:
            nr = np.flatnonzero(is_near)
            if nr.size:
                prev[nr] = _exchange_slots(self._fp, idx[rows[nr]], fp[nr])
            for j in np.flatnonzero(~is_near).tolist():
                key = (int(group[rows[j]]), int(pos[rows[j]]))
                prev[j] = self._far[key]
                self._far[key] = int(fp[j])
        return rows, fp, prev


class _Restarts:
    """Counts records whose token_idx is not above the previous one of their group."""

    def __init__(self) -> None:
        self._last = np.zeros(0, np.int64)
        self.count = 0

    def add(self, group: np.ndarray, pos: np.ndarray) -> None:
        if group.size == 0:
            return
        size = int(group.max()) + 1
        if size > self._last.size:
            self._last = np.concatenate([self._last, np.full(size - self._last.size, -1, np.int64)])
        order = np.argsort(group, kind="stable")
        g, p = group[order], pos[order]
        first = np.ones(g.size, bool)
        first[1:] = g[1:] != g[:-1]
        prev = np.empty(g.size, np.int64)
        prev[first] = self._last[g[first]]
        later = np.flatnonzero(~first)
        prev[later] = p[later - 1]
        self.count += int(np.count_nonzero((prev >= 0) & (p <= prev)))
        last = np.ones(g.size, bool)
        last[:-1] = first[1:]
        self._last[g[last]] = p[last]


# --------------------------------------------------------------------------- detection

_SAME, _AFTER_DUMMY, _OTHER = 0, 1, 2
"""Entries of the second pass's counts: same route, different after a dummy, different."""


@dataclass
class _OpenRun:
    ids: np.ndarray
    weights: np.ndarray
    fp: int
    length: int
    first_line: int
    last_line: int
    repeats: int = 0
    """Its records whose key an earlier record had."""


@dataclass
class _Plan:
    """One layer's rows of a chunk, split into runs before their repeated keys are counted."""

    rows: np.ndarray | None
    bounds: np.ndarray
    head: int
    continued: _OpenRun | None
    """The run open before the chunk, which its first ``head`` rows continue."""
    closed: bool
    """Whether that run ends in this chunk."""
    long_segments: list[int]
    opened: _OpenRun | None


class ContaminationDetector:
    """Streams over routes and sorts every record into dummy batch, double-logged or kept, in
    one pass and, only when keys repeat outside dummy runs, a second one.

    ``layers`` is the number of logged layers (group codes are ``req * layers + slot``, as
    :meth:`RouteLog.groups` makes them), so that distinct req_ids can be counted.

    Show every chunk to :meth:`add`, in file order. The pass keeps one bit per key
    (:class:`~moeprof.analysis.positions.PositionSet`) and the keys that repeat. Then, when
    :attr:`needs_reread` says that keys repeat outside dummy runs, show the same log again to
    :meth:`reread`, chunk by chunk in file order (route fingerprints are kept for the repeated
    keys only), and finally call :meth:`finish` for the verdict.
    """

    def __init__(self, min_run: int = 64, layers: int = 1) -> None:
        if min_run < 2:
            raise ValueError(f"`min_run` must be >= 2, got {min_run}")
        if layers < 1:
            raise ValueError(f"`layers` must be >= 1, got {layers}")
        self.min_run = min_run
        self.layers = layers
        self._seen: PositionSet | None = PositionSet()
        self._repeated = _KeySet()
        """Keys an earlier record had (for the second pass and for :class:`SuspectFilter`)."""
        self._restarts = _Restarts()
        self._records = 0
        self._groups = 0
        self._repeats = 0
        """Records so far, dummy or not, whose key an earlier record had."""
        self._run_repeats = 0
        """... of them, those in dummy runs."""
        self._open: dict[int, _OpenRun] = {}
        self._runs: list[Run] = []
        self._run_records = 0
        self._lengths: dict[int, int] = {}
        self._longest: Run | None = None
        self._dummy_fps: dict[int, dict[int, int]] = {}
        """Layer -> dummy route fingerprint -> the first line of the chunk it was found in
        (from there on a repeated key whose previous route is that one counts as after a
        dummy)."""
        self._first_pass_done = False
        self._reread: _Reread | None = None
        self._reread_counts = np.zeros(3, np.int64)
        """The second pass's repeated keys outside dummy runs: same route, different after a
        dummy, different (all 0 when there was no second pass: no key repeated outside)."""
        self.verdict: Contamination | None = None

    def add(
        self,
        group: np.ndarray,
        token_idx: np.ndarray,
        layer: np.ndarray,
        ids: np.ndarray,
        weights: np.ndarray,
        line: np.ndarray,
    ) -> None:
        """Fold in one chunk (rows in file order)."""
        n = group.size
        if n == 0:
            return
        if self._first_pass_done:
            raise RuntimeError("add() after the pass ended (needs_reread, reread() or finish())")
        self._records += n
        self._groups = max(self._groups, int(group.max()) + 1)
        self._restarts.add(group, token_idx)
        chunk_start = int(line[0])
        layers = np.unique(layer)
        assert self._seen is not None
        dup = self._seen.add(group, token_idx)
        repeat = np.flatnonzero(dup)
        if repeat.size:
            self._repeats += repeat.size
            self._repeated.add(group[repeat], token_idx[repeat])
        for lay in layers.tolist():
            rows = None if layers.size == 1 else np.flatnonzero(layer == lay)
            plan = self._split(int(lay), rows, ids, weights, line, chunk_start)
            self._settle(int(lay), plan, dup if repeat.size else None, line)

    def _split(
        self,
        layer: int,
        rows: np.ndarray | None,
        ids: np.ndarray,
        w: np.ndarray,
        line: np.ndarray,
        chunk_start: int,
    ) -> _Plan:
        """Find where one layer's rows of the chunk change route; note the runs that end here
        (their routes are dummy routes from now on) and open the chunk's last run."""
        if rows is not None:
            ids, w, line = ids[rows], w[rows], line[rows]

        def fp_at(i: int) -> int:
            return int(route_fingerprints(ids[i : i + 1], w[i : i + 1])[0])

        n = ids.shape[0]
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
        head = int(bounds[0])
        if cur is not None and head:
            cur.length += head
            cur.last_line = int(line[head - 1])
        closed = cur is not None and starts.size > 0
        if closed and cur is not None and cur.length >= self.min_run:
            self._note_dummy_route(layer, cur.fp, chunk_start)
        seg_len = np.diff(bounds)
        long_segments = np.flatnonzero(seg_len[:-1] >= self.min_run).tolist() if starts.size else []
        for s in long_segments:
            self._note_dummy_route(layer, fp_at(int(bounds[s])), chunk_start)
        opened = None
        if starts.size:
            a = int(starts[-1])
            opened = _OpenRun(
                ids[a].copy(),
                w[a].copy(),
                fp_at(a),
                n - a,
                int(line[a]),
                int(line[n - 1]),
            )
            self._open[layer] = opened
        return _Plan(rows, bounds, head, cur, closed, long_segments, opened)

    def _note_dummy_route(self, layer: int, fp: int, chunk_start: int) -> None:
        fps = self._dummy_fps.setdefault(layer, {})
        if fp not in fps:
            fps[fp] = chunk_start

    def _settle(self, layer: int, plan: _Plan, dup: np.ndarray | None, line: np.ndarray) -> None:
        """Count the chunk's repeated keys (``dup``: per row, whether its key was seen before;
        None when none was) in the runs :meth:`_split` found, and record the runs that ended
        and are long enough."""
        bounds, head = plan.bounds, plan.head
        if dup is None:
            cum = None
        else:
            d = dup if plan.rows is None else dup[plan.rows]
            cum = np.zeros(d.size + 1, np.int64)
            np.cumsum(d, out=cum[1:])

        def between(a: int, b: int) -> int:
            return 0 if cum is None else int(cum[b] - cum[a])

        cur = plan.continued
        if cur is not None and head:
            cur.repeats += between(0, head)
        if plan.closed and cur is not None:
            self._close(layer, cur)
        ln = line if plan.rows is None else line[plan.rows]
        for s in plan.long_segments:
            a, b = int(bounds[s]), int(bounds[s + 1])
            self._record(Run(layer, int(ln[a]), int(ln[b - 1]), b - a), between(a, b))
        if plan.opened is not None:
            a = int(bounds[-2])
            plan.opened.repeats = between(a, int(bounds[-1]))

    def _close(self, layer: int, run: _OpenRun) -> None:
        if run.length >= self.min_run:
            self._record(Run(layer, run.first_line, run.last_line, run.length), run.repeats)

    def _record(self, run: Run, repeats: int) -> None:
        self._run_records += run.length
        self._run_repeats += repeats
        self._runs.append(run)
        self._lengths[run.length] = self._lengths.get(run.length, 0) + 1
        if self._longest is None or run.length > self._longest.length:
            self._longest = run

    def _end_first_pass(self) -> None:
        """Close the open runs and free the per-key memory of the pass (once)."""
        if self._first_pass_done:
            return
        self._first_pass_done = True
        for layer, run in self._open.items():
            self._close(layer, run)
        self._open.clear()
        self._seen = None  # the key bits are not needed any more: free them

    @property
    def needs_reread(self) -> bool:
        """After the pass (it ends it: no more :meth:`add`): whether repeated keys outside
        dummy runs need the log shown again to :meth:`reread` before :meth:`finish`; never for
        a log whose keys do not repeat."""
        self._end_first_pass()
        if self.verdict is not None:
            return False
        outside = self._repeats - self._run_repeats
        return outside > 0 and (self._reread is None or not self._reread.complete)

    def reread(
        self,
        group: np.ndarray,
        token_idx: np.ndarray,
        layer: np.ndarray,
        ids: np.ndarray,
        weights: np.ndarray,
        line: np.ndarray,
    ) -> None:
        """The second pass (when :attr:`needs_reread`): the same log, every chunk in file
        order. Sorts the records outside dummy runs that repeat a key by how their route
        compares with the key's previous record's."""
        self._end_first_pass()
        if self.verdict is not None:
            raise RuntimeError("reread() after finish()")
        if self._reread is None:
            self._reread = _Reread(
                KeyedRoutes(self._repeated),
                _runs_by_layer(self._runs),
                {
                    lay: (np.fromiter(fps, np.uint32), np.fromiter(fps.values(), np.int64))
                    for lay, fps in self._dummy_fps.items()
                },
                self._records,
            )
        if group.size:
            self._reread_counts += self._reread.add(group, token_idx, layer, ids, weights, line)

    def finish(self) -> Contamination:
        """Close open runs and return the verdict (also kept as ``verdict``); call once, after
        the last chunk (of the second pass when :attr:`needs_reread` asked for one)."""
        if self.verdict is not None:
            return self.verdict
        if self.needs_reread:
            raise RuntimeError(
                "finish() before reread(): keys repeat outside dummy runs, so the log must be "
                "shown to reread() first"
            )
        if self._reread is not None and self._reread.seen != self._records:
            raise RuntimeError(
                f"reread() saw {self._reread.seen:,} records, the pass {self._records:,}"
            )
        self._reread = None
        same, after, other = (int(x) for x in self._reread_counts)
        real = self._records - self._run_records
        degenerate = degenerate_keys(other, real)
        double = 0 if degenerate else same
        self.verdict = Contamination(
            records=self._records,
            dummy_records=self._run_records,
            dummy_runs=len(self._runs),
            run_lengths=dict(sorted(self._lengths.items(), reverse=True)),
            vllm_sized_runs=sum(c for n, c in self._lengths.items() if vllm_batch_size(n)),
            longest_run=self._longest,
            double_logged_records=double,
            kept_records=self._records - self._run_records - double,
            repeated_keys=RepeatedKeys(same, after, other),
            key_scheme="degenerate" if degenerate else "distinct",
            req_ids=(self._groups - 1) // self.layers + 1 if self._groups else 0,
            token_idx_restarts=self._restarts.count,
            suspect_records=self._run_records + double,
            min_run=self.min_run,
        )
        return self.verdict

    @property
    def runs(self) -> list[Run]:
        return self._runs

    @property
    def repeated_keys(self) -> _KeySet:
        """The keys some record repeated (dummy or not)."""
        return self._repeated


_RunsByLayer = dict[int, tuple[np.ndarray, np.ndarray]]


def _runs_by_layer(runs: list[Run]) -> _RunsByLayer:
    """Layer -> (first lines, last lines) of its runs, in line order."""
    by_layer: dict[int, list[Run]] = {}
    for run in runs:
        by_layer.setdefault(run.layer, []).append(run)
    out = {}
    for layer, rs in by_layer.items():
        rs.sort(key=lambda r: r.first_line)
        first = np.array([r.first_line for r in rs], np.int64)
        last = np.array([r.last_line for r in rs], np.int64)
        out[layer] = (first, last)
    return out


def _in_runs(runs: _RunsByLayer, layer: np.ndarray, line: np.ndarray) -> np.ndarray:
    """True for the rows inside a run of their layer."""
    inside = np.zeros(line.size, bool)
    for lay, (first, last) in runs.items():
        rows = np.flatnonzero(layer == lay)
        if not rows.size:
            continue
        ln = line[rows]
        k = np.searchsorted(first, ln, side="right") - 1
        inside[rows[(k >= 0) & (ln <= last[np.maximum(k, 0)])]] = True
    return inside


class _Reread:
    """The detector's second pass: route fingerprints of the repeated keys
    only, the pass's dummy runs, and when each dummy route was found."""

    def __init__(
        self,
        last: KeyedRoutes,
        runs: _RunsByLayer,
        dummy_fps: dict[int, tuple[np.ndarray, np.ndarray]],
        records: int,
    ) -> None:
        self._last = last
        self._runs = runs
        self._dummy = {}
        for lay, (fps, since) in dummy_fps.items():
            order = np.argsort(fps)
            self._dummy[lay] = (fps[order], since[order])
        self.records = records
        self.seen = 0

    @property
    def complete(self) -> bool:
        return self.seen >= self.records

    def add(
        self,
        group: np.ndarray,
        pos: np.ndarray,
        layer: np.ndarray,
        ids: np.ndarray,
        weights: np.ndarray,
        line: np.ndarray,
    ) -> np.ndarray:
        """The chunk's (same route, different after a dummy, different) counts outside runs."""
        self.seen += group.size
        counts = np.zeros(3, np.int64)
        rows, fp, prev = self._last.exchange(group, pos, ids, weights)
        repeat = prev != 0
        if not repeat.any():
            return counts
        rows, fp, prev = rows[repeat], fp[repeat], prev[repeat]
        lay, ln = layer[rows], line[rows]
        outside = ~_in_runs(self._runs, lay, ln)
        fp, prev, lay, ln = fp[outside], prev[outside], lay[outside], ln[outside]
        same = prev == fp
        counts[_SAME] = int(np.count_nonzero(same))
        diff = np.flatnonzero(~same)
        after = np.zeros(diff.size, bool)
        lay_d, prev_d, ln_d = lay[diff], prev[diff], ln[diff]
        for dl, (fps, since) in self._dummy.items():
            sel = np.flatnonzero(lay_d == dl)
            if not sel.size:
                continue
            i = np.minimum(np.searchsorted(fps, prev_d[sel]), fps.size - 1)
            after[sel] = (fps[i] == prev_d[sel]) & (since[i] <= ln_d[sel])
        counts[_AFTER_DUMMY] = int(np.count_nonzero(after))
        counts[_OTHER] = diff.size - counts[_AFTER_DUMMY]
        return counts


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


# --------------------------------------------------------------------------- exclusion


class SuspectFilter:
    """After a :class:`ContaminationDetector` pass, tells which rows of a chunk to drop, in a
    second pass over the same log: every row inside a dummy run, and (when the verdict found
    double logging) every row outside them whose key's previous record had the same route, so
    double logging keeps its first copy. Real tokens reusing keys that a dummy batch or
    another token used first are kept; so is everything else."""

    def __init__(self, detector: ContaminationDetector) -> None:
        verdict = detector.finish()
        self._runs = _runs_by_layer(detector.runs)
        self._last = KeyedRoutes(detector.repeated_keys) if verdict.double_logged_records else None

    def mask(
        self,
        group: np.ndarray,
        token_idx: np.ndarray,
        layer: np.ndarray,
        ids: np.ndarray,
        weights: np.ndarray,
        line: np.ndarray,
    ) -> np.ndarray:
        """True for rows to drop; call once per chunk, with every chunk, in file order."""
        drop = _in_runs(self._runs, layer, line)
        if self._last is not None and group.size:
            rows, fp, prev = self._last.exchange(group, token_idx, ids, weights)
            drop[rows[prev == fp]] = True
        return drop
