"""Cross-layer routing (``analyze --cross-layer``): how the experts a token chooses at one
logged layer predict those it chooses at the next logged layer.

A token's routes at the different layers are joined on (request, position). The hook writes a
token's layers on adjacent lines, so almost every token is joined within one chunk; other
writers may spread them out, so a route whose token is not yet complete waits, at most
:data:`HORIZON_LINES` lines, for the token's other layers. A token still incomplete then (or at
the end of the log) is joined as far as it goes, and its routes that lack a partner at a
neighbouring logged layer are counted (``unpaired_routes``), never invented.

Statistics (pure functions below, on the ``E x E`` joint count matrix of one pair of layers):

- :func:`joint_counts`: ``J[a, b]`` = tokens that chose ``a`` at layer ``l`` and ``b`` at
  ``l'``; every token adds its ``k x k`` (expert at ``l``, expert at ``l'``) pairs.
- :func:`mutual_information`: MI of the pair distribution ``P = J / (N k^2)``, in bits.
- :func:`independence_baseline`: what the plug-in MI of ``N`` tokens averages when the two
  layers choose independently with the same loads (it is not 0: a finite sample always shows
  some dependence).
- :func:`top_transitions`: the (a -> b) pairs with the largest lift, among those seen often
  enough to be more than noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from moeprof.analysis.passes import PassOptions, Skipped, register
from moeprof.analysis.reader import RouteChunk, RouteLog

HORIZON_LINES = 1 << 18
"""How many lines a route waits for its token's other layers before it is given up as
unpaired. The hook writes a token's layers on adjacent lines; a writer that puts them further
apart than this (all of layer 0, then all of layer 1) gets most routes counted as unpaired."""
MIN_TRANSITION_TOKENS = 20
"""A transition (a -> b) is listed only when at least this many tokens made it: lifts of rarer
pairs are mostly noise."""
_FLUSH_ENTRIES = 1 << 21
"""Joint-count indices buffered before one ``bincount`` folds them in (amortises zeroing the
``pairs x E x E`` bins over many chunks)."""


# --------------------------------------------------------------------------- statistics


def joint_counts(ids_a: np.ndarray, ids_b: np.ndarray, num_experts: int) -> np.ndarray:
    """The ``E x E`` joint count matrix of the tokens whose expert sets at two layers are the
    rows of ``ids_a`` and ``ids_b`` (both ``(N, k)``, row ``i`` the same token):
    ``J[a, b]`` = number of tokens with ``a`` among their experts at the first layer and ``b``
    at the second. Each token adds ``k x k`` to the total, so ``J.sum() == N * k**2``."""
    ids_a, ids_b = np.asarray(ids_a), np.asarray(ids_b)
    if ids_a.ndim != 2 or ids_a.shape != ids_b.shape:
        raise ValueError(
            f"ids_a and ids_b must be (N, k) arrays of the same shape, got {ids_a.shape} "
            f"and {ids_b.shape}"
        )
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if ids_a.size and (
        min(ids_a.min(), ids_b.min()) < 0 or max(ids_a.max(), ids_b.max()) >= num_experts
    ):
        raise ValueError(f"ids_a and ids_b must hold expert ids in [0, {num_experts})")
    flat = (ids_a[:, :, None] * num_experts + ids_b[:, None, :]).ravel()
    e2 = num_experts * num_experts
    return np.bincount(flat, minlength=e2).reshape(num_experts, num_experts)


def _check_joint(joint: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """``joint`` as float64 and its number of tokens; ValueError naming the argument."""
    j = np.asarray(joint)
    if j.ndim != 2 or j.shape[0] != j.shape[1]:
        raise ValueError(f"joint must be a square E x E matrix, got shape {j.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if (j < 0).any():
        raise ValueError("joint must hold counts (no negative entries)")
    total = float(j.sum())
    tokens = total / (k * k)
    if tokens != round(tokens):
        raise ValueError(f"joint sums to {total:g}, not a whole number of tokens x k^2 = {k * k}")
    return j.astype(np.float64), round(tokens)


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


@dataclass(frozen=True)
class Information:
    """The mutual information of one pair of layers and the entropies it is bounded by."""

    mi_bits: float
    """``sum_ab P(a,b) log2(P(a,b) / (P_a P_b))``; NaN without tokens."""
    entropy_bits: float
    """``H_a``: entropy of the marginal ``P_a`` (the layer's selection shares)."""
    next_entropy_bits: float
    """``H_b``: the same at the next layer."""

    @property
    def normalized(self) -> float:
        """``MI / min(H_a, H_b)``, in [0, 1]; NaN when either entropy is 0."""
        low = min(self.entropy_bits, self.next_entropy_bits)
        return self.mi_bits / low if low > 0 else math.nan


def mutual_information(joint: np.ndarray, k: int) -> Information:
    """Mutual information, in bits, between the expert a token chooses at one layer and at the
    next, from ``joint`` (:func:`joint_counts`, ``N`` tokens, ``k`` experts each).

    The joint distribution is ``P(a, b) = joint[a, b] / (N k^2)``: a token routed to the sets
    ``S`` and ``S'`` is the ``k^2`` equally likely pairs ``S x S'``. Its marginals
    ``P_a = sum_b P(a, b) = count_a / (N k)`` are the layers' selection shares, and

        MI = sum_{a,b: P(a,b) > 0} P(a, b) log2(P(a, b) / (P_a P_b)).

    MI is 0 for independent layers and at most ``min(H_a, H_b)``. A router that copies its
    choice to the next layer reaches ``H_a`` only for ``k = 1``: for ``k > 1`` the pairs cannot
    tell which of the ``k`` experts maps to which, so copying ``k``-sets drawn from disjoint
    fixed groups (E/k groups, chosen uniformly) gives ``log2(E/k) = H_a - log2(k)``.
    """
    j, tokens = _check_joint(joint, k)
    if tokens == 0:
        return Information(math.nan, math.nan, math.nan)
    p = j / j.sum()
    pa, pb = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    outer = np.outer(pa, pb)
    mi = float((p[nz] * np.log2(p[nz] / outer[nz])).sum())
    return Information(max(mi, 0.0), _entropy_bits(pa), _entropy_bits(pb))


def independence_baseline(joint: np.ndarray, k: int) -> float:
    """The mutual information (bits) the plug-in estimate of :func:`mutual_information` shows,
    on average, for ``N`` tokens when the two layers choose independently with the loads seen
    in ``joint``: a generalised Miller-Madow bias,

        (E_a - k) (E_b - k) / (2 N k^2 ln 2),

    where ``E_a`` (``E_b``) is the number of experts the layer ever chose. For ``k = 1`` this is
    Miller-Madow's ``(E_a - 1)(E_b - 1) / (2 N ln 2)``. Derivation: to second order the plug-in
    MI is ``1/(2 ln 2) sum_ab (P^(a,b) - P_a P_b)^2 / (P_a P_b)``; under independence each
    cell's deviation is an average over tokens of ``(x_a - q_a)(y_b - r_b) / k^2`` (``x_a``
    whether the token chose ``a``, ``q_a = k P_a`` its mean), whose variance
    ``q_a (1 - q_a) r_b (1 - r_b) / (N k^4)`` sums, over ``P_a P_b = q_a r_b / k^2``, to the
    above (``sum_a (1 - q_a) = E_a - k``). An MI near this value says the layers' choices are
    independent as far as ``N`` tokens can tell; it is asymptotic (``N`` large against
    ``E_a E_b / k^2``) and overstates the bias of smaller samples. NaN without tokens.
    """
    j, tokens = _check_joint(joint, k)
    if tokens == 0:
        return math.nan
    used_a = int(np.count_nonzero(j.sum(axis=1)))
    used_b = int(np.count_nonzero(j.sum(axis=0)))
    return (used_a - k) * (used_b - k) / (2 * tokens * k * k * math.log(2))


@dataclass(frozen=True)
class Transition:
    """Tokens routed to ``expert`` at one layer and ``next_expert`` at the next."""

    expert: int
    next_expert: int
    tokens: int
    """Tokens that chose both (``joint[a, b]``)."""
    lift: float
    """``P(a,b) / (P_a P_b) = N joint[a,b] / (count_a count_b)``: how many times more often
    than if the layers were independent (1 = as often)."""
    conditional: float
    """``P(b | a) = joint[a, b] / count_a``: the share of the tokens that chose ``a`` at the
    first layer that chose ``b`` at the next."""


def top_transitions(
    joint: np.ndarray, k: int, top: int, min_tokens: int = MIN_TRANSITION_TOKENS
) -> list[Transition]:
    """The ``top`` transitions (a -> b) of ``joint`` with the largest lift, among those at
    least ``min_tokens`` tokens made (ties: more tokens first, then lower ids)."""
    j, tokens = _check_joint(joint, k)
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    if tokens == 0 or top == 0:
        return []
    count_a = j.sum(axis=1) / k
    count_b = j.sum(axis=0) / k
    a, b = np.nonzero(j >= min_tokens)
    if not a.size:
        return []
    n = j[a, b]
    lift = tokens * n / (count_a[a] * count_b[b])
    order = np.lexsort((b, a, -n, -lift))[:top]
    return [
        Transition(int(a[i]), int(b[i]), int(n[i]), float(lift[i]), float(n[i] / count_a[a[i]]))
        for i in order
    ]


# --------------------------------------------------------------------------- results


@dataclass
class LayerPair:
    """Routing at ``layer`` against routing at ``next_layer``, the next logged layer."""

    layer: int
    next_layer: int
    tokens: int
    """Tokens routed at both layers (joined)."""
    mi_bits: float
    baseline_bits: float
    """:func:`independence_baseline`: MI expected by chance for this many tokens."""
    normalized_mi: float
    """``MI / min(H_a, H_b)``."""
    entropy_bits: float
    next_entropy_bits: float
    top: list[Transition]
    joint: np.ndarray = field(repr=False, metadata={"json": False})
    """``E x E`` :func:`joint_counts`, for plots."""

    @property
    def adjacent(self) -> bool:
        """The layers are neighbours in the model (no unlogged layer between them)."""
        return self.next_layer == self.layer + 1

    def lift(self) -> np.ndarray:
        """``E x E`` lift ``P(a,b) / (P_a P_b)``; NaN where either expert was never chosen."""
        j = self.joint.astype(np.float64)
        ca, cb = j.sum(axis=1), j.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = j * j.sum() / np.outer(ca, cb)
        out[(ca == 0)[:, None] | (cb == 0)[None, :]] = np.nan
        return out


@dataclass
class CrossLayerResult:
    top_k: int
    num_experts: int
    routes: int
    """Routes the pass saw."""
    unpaired_routes: int
    """Routes whose token had no route at a neighbouring logged layer (within
    :data:`HORIZON_LINES` lines): left out of that pair's numbers."""
    min_tokens: int
    """Transitions made by fewer tokens are not listed."""
    pairs: list[LayerPair]


# --------------------------------------------------------------------------- the pass


class _Rows:
    """Routes waiting for their token's other layers (columns, in line order)."""

    __slots__ = ("ids", "line", "req", "slot", "tok")

    def __init__(
        self, req: np.ndarray, tok: np.ndarray, slot: np.ndarray, line: np.ndarray, ids: np.ndarray
    ) -> None:
        self.req, self.tok, self.slot, self.line, self.ids = req, tok, slot, line, ids

    def __len__(self) -> int:
        return int(self.req.size)

    def take(self, rows: np.ndarray) -> _Rows:
        return _Rows(
            self.req[rows], self.tok[rows], self.slot[rows], self.line[rows], self.ids[rows]
        )

    def __add__(self, other: _Rows) -> _Rows:
        if not len(self):
            return other
        return _Rows(
            *(
                np.concatenate([getattr(self, f), getattr(other, f)])
                for f in ("req", "tok", "slot", "line", "ids")
            )
        )


def _runs(req: np.ndarray, tok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of the runs of consecutive rows with the same (req, tok)."""
    n = req.size
    new = np.ones(n, bool)
    new[1:] = (req[1:] != req[:-1]) | (tok[1:] != tok[:-1])
    starts = np.flatnonzero(new)
    return starts, np.diff(np.append(starts, n))


def _complete(slot: np.ndarray, starts: np.ndarray, lengths: np.ndarray, layers: int) -> np.ndarray:
    """Which runs hold exactly slots 0, 1, ..., layers-1 in that order."""
    step = np.ones(slot.size, bool)
    step[1:] = slot[1:] == slot[:-1] + 1
    step[starts] = True
    bad = np.add.reduceat((~step).astype(np.int64), starts) if starts.size else starts
    return (lengths == layers) & (slot[starts] == 0) & (bad == 0)


class CrossLayerPass:
    """Joins each token's routes across the logged layers and counts, for every pair of
    neighbouring logged layers, the (expert at l, expert at l') pairs of each token."""

    def __init__(self, log: RouteLog, num_experts: int | None, options: PassOptions) -> None:
        assert log.meta is not None
        self.k = log.meta.top_k
        self.top = options.top
        self.layers = sorted(log.meta.layers_logged)
        self._sorted = np.asarray(self.layers, np.int64)
        self.experts = num_experts or 0
        self._fixed = num_experts is not None
        n_pairs = max(len(self.layers) - 1, 0)
        self.joint = np.zeros((n_pairs, self.experts, self.experts), np.int64)
        self.routes = 0
        self.unpaired = 0
        self._pending = _Rows(
            *(np.empty(0, np.int64) for _ in range(4)), np.empty((0, self.k), np.int64)
        )
        self._buf: list[np.ndarray] = []
        self._buffered = 0

    # ------------------------------------------------------------------ feeding

    def add(self, chunk: RouteChunk) -> None:
        self.routes += len(chunk)
        if len(self.layers) < 2 or not len(chunk):
            return
        if not self._fixed:
            self._widen(int(chunk.ids.max()) + 1)
        slot = np.searchsorted(self._sorted, chunk.layer)
        rows = self._pending + _Rows(chunk.req, chunk.token_idx, slot, chunk.line, chunk.ids)
        rest = self._join_adjacent(rows)
        if len(rest):
            self._pending = self._join_sorted(rest, int(chunk.line[-1]) - HORIZON_LINES)
        else:
            self._pending = rest

    def _join_adjacent(self, rows: _Rows) -> _Rows:
        """Count the tokens whose routes sit on consecutive rows, every logged layer in order
        (the hook's layout); the other rows are returned, in line order."""
        starts, lengths = _runs(rows.req, rows.tok)
        ok = _complete(rows.slot, starts, lengths, len(self.layers))
        first = starts[ok]
        self._count(rows.ids, first)
        keep = np.ones(len(rows), bool)
        keep[(first[:, None] + np.arange(len(self.layers))).ravel()] = False
        return rows.take(np.flatnonzero(keep)) if first.size < starts.size else rows.take(first[:0])

    def _join_sorted(self, rows: _Rows, expire_before: int) -> _Rows:
        """Rows grouped by token wherever they are: complete tokens are counted, incomplete
        ones whose first route is older than ``expire_before`` are counted as far as they go
        (their partnerless routes as unpaired); the rest keep waiting (returned)."""
        order = np.lexsort((rows.line, rows.slot, rows.tok, rows.req))
        s = rows.take(order)
        starts, lengths = _runs(s.req, s.tok)
        ok = _complete(s.slot, starts, lengths, len(self.layers))
        self._count(s.ids, starts[ok])
        oldest = np.minimum.reduceat(s.line, starts)
        stale = ~ok & (oldest < expire_before)
        if stale.any():
            self._flush_partial(s, starts[stale], lengths[stale])
        waiting = ~ok & ~stale
        if not waiting.any():
            return s.take(starts[:0])
        run_of_row = np.repeat(np.arange(starts.size), lengths)
        keep = np.sort(order[waiting[run_of_row]])  # back to line order
        return rows.take(keep)

    def _flush_partial(self, s: _Rows, starts: np.ndarray, lengths: np.ndarray) -> None:
        """Count the pairs that incomplete tokens (runs of sorted rows) do have, and their
        routes without a partner at a neighbouring logged layer."""
        rows = np.concatenate([np.arange(a, a + m) for a, m in zip(starts, lengths, strict=True)])
        run = np.repeat(np.arange(starts.size), lengths)
        last = len(self.layers) - 1
        nxt = np.zeros(rows.size, bool)  # the next sorted row is this token's next layer
        nxt[:-1] = (run[1:] == run[:-1]) & (s.slot[rows[1:]] == s.slot[rows[:-1]] + 1)
        prv = np.zeros(rows.size, bool)
        prv[1:] = nxt[:-1]
        sl = s.slot[rows]
        self.unpaired += int(np.count_nonzero(((sl > 0) & ~prv) | ((sl < last) & ~nxt)))
        at = rows[nxt]
        for p in range(last):
            here = at[s.slot[at] == p]
            if here.size:
                self._add_pairs(p, s.ids[here], s.ids[here + 1])

    def _count(self, ids: np.ndarray, first: np.ndarray) -> None:
        """Count the complete tokens whose layer-0 route is row ``first`` (layers follow)."""
        if not first.size:
            return
        for p in range(len(self.layers) - 1):
            self._add_pairs(p, ids[first + p], ids[first + p + 1])

    def _add_pairs(self, pair: int, a: np.ndarray, b: np.ndarray) -> None:
        e = self.experts
        flat = (a[:, :, None] * e + b[:, None, :]).ravel() + pair * e * e
        self._buf.append(flat)
        self._buffered += flat.size
        if self._buffered >= _FLUSH_ENTRIES:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        flat = np.concatenate(self._buf)
        self.joint += np.bincount(flat, minlength=self.joint.size).reshape(self.joint.shape)
        self._buf, self._buffered = [], 0

    def _widen(self, experts: int) -> None:
        """Grow the expert axis (``num_experts`` unknown: max id + 1 so far)."""
        if experts <= self.experts:
            return
        self._flush()
        grown = np.zeros((self.joint.shape[0], experts, experts), np.int64)
        grown[:, : self.experts, : self.experts] = self.joint
        self.joint, self.experts = grown, experts

    # ------------------------------------------------------------------ result

    def finish(self) -> CrossLayerResult | Skipped:
        if len(self.layers) < 2:
            return Skipped(
                f"one logged layer ({self.layers[0]}): cross-layer routing needs two or more"
            )
        if len(self._pending):
            self._pending = self._join_sorted(self._pending, np.iinfo(np.int64).max)
        self._flush()
        pairs = []
        for p in range(len(self.layers) - 1):
            j = self.joint[p]
            info = mutual_information(j, self.k)
            pairs.append(
                LayerPair(
                    layer=self.layers[p],
                    next_layer=self.layers[p + 1],
                    tokens=int(j.sum()) // (self.k * self.k),
                    mi_bits=info.mi_bits,
                    baseline_bits=independence_baseline(j, self.k),
                    normalized_mi=info.normalized,
                    entropy_bits=info.entropy_bits,
                    next_entropy_bits=info.next_entropy_bits,
                    top=top_transitions(j, self.k, self.top),
                    joint=j,
                )
            )
        return CrossLayerResult(
            top_k=self.k,
            num_experts=self.experts,
            routes=self.routes,
            unpaired_routes=self.unpaired,
            min_tokens=MIN_TRANSITION_TOKENS,
            pairs=pairs,
        )


@register("cross_layer")
def _make(log: RouteLog, num_experts: int | None, options: PassOptions) -> CrossLayerPass:
    return CrossLayerPass(log, num_experts, options)
