"""``moeprof compare A B``: do two logs of the same prompts route the same?

What a user runs to check a new kernel, dtype, vLLM version or GPU against a reference log.
Routes are joined on (req_id, token_idx, layer); for every joined pair:

- *same set*: the two top-k sets of expert ids are identical (order ignored);
- *same top-1*: the first id in the router's order agrees;
- *weight difference*: where the sets agree, ``|w_A(e) - w_B(e)|`` for each expert e of the set
  (weights compared per expert, not per position, so two near-equal weights swapping places
  costs nothing), averaged over all such (route, expert) pairs, and its maximum.

Also: routes only in A / only in B (no partner with the same key), per layer; requests in both
and in one only; and per request the first token_idx where the sets differ at some layer (and the
lowest such layer), listed for the first requests of A plus a count. Once a request's generated
text diverges, its later tokens are different inputs in the two runs, so their routes differ for
that reason too: the first divergence is the number to look at.

Streaming: the smaller file (by bytes) is read whole into an index, one sorted int64 key per
route (request code, layer and token_idx packed) with its sorted ids, weights in that order and
top-1 id: 35 bytes a route at top-4 once built, about 90 at the peak while it is built (1M
routes of 4 layers, top-4: 92 MB above reading the log alone). The other log is streamed in
chunks and each chunk looked up in the index with numpy (searchsorted): memory is O(routes of
the smaller log), never of both, and nothing is kept per route of the streamed one.
A key that repeats in a log (a duplicate route, which ``validate`` reports) is joined once: the
first time it appears; the others are counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeprof.analysis.reader import Issue, LogBase, LogError, RouteChunk, RouteLog
from moeprof.analysis.sources import open_one
from moeprof.errors import UserError

SHOW = 10
"""Requests listed with their first divergence."""
REQ_BITS = 24
"""Bits of a key for the request code: up to 16.7M requests in the indexed log."""
_NONE = np.iinfo(np.int64).max


# --------------------------------------------------------------------------- results


@dataclass
class LogSide:
    path: str
    model_id: str
    vllm_version: str
    torch_version: str
    device: str
    dtype: str | None
    top_k: int
    num_experts: int | None
    routes: int
    requests: int
    duplicates: int
    """Routes whose (req_id, token_idx, layer) came earlier in the same log: not joined."""


@dataclass
class LayerAgreement:
    layer: int
    joined: int
    same_set: int
    same_top1: int
    same_set_share: float
    same_top1_share: float
    weight_mean_abs_diff: float
    """Over the (route, expert) pairs of the routes whose sets agree; NaN when none."""
    only_a: int
    only_b: int


@dataclass(frozen=True)
class Divergence:
    req_id: str
    token_idx: int
    """The first position whose top-k set differs at some layer."""
    layer: int
    """The lowest layer whose set differs at that position."""


@dataclass
class ComparisonReport:
    a: LogSide
    b: LogSide
    joined: int
    """Routes with a partner of the same (req_id, token_idx, layer) in the other log."""
    same_set: int
    same_top1: int
    same_set_share: float
    same_top1_share: float
    weight_mean_abs_diff: float
    """Mean ``|w_A(e) - w_B(e)|`` over experts of the routes whose sets agree (NaN: none)."""
    weight_max_abs_diff: float
    weight_routes: int
    """Routes whose weights were compared (those whose sets agree)."""
    only_a: int
    only_b: int
    requests_both: int
    requests_only_a: int
    requests_only_b: int
    diverged_requests: int
    """Requests in both logs whose top-k sets differ at some joined route."""
    first_divergences: list[Divergence]
    """The first divergence of the first diverging requests, in A's order (``show`` of them)."""
    layers: list[LayerAgreement]
    warnings: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        """Every route joined and every joined route the same set."""
        return self.only_a == self.only_b == 0 and self.same_set == self.joined


# --------------------------------------------------------------------------- statistics


def sort_rows(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ids in ascending order and its weights in the same order: the form in which
    two routes' sets and per-expert weights compare position by position."""
    if ids.shape != weights.shape or ids.ndim != 2:
        raise ValueError(f"ids and weights must be (n, k) alike, got {ids.shape}, {weights.shape}")
    order = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(weights, order, 1)


def route_agreement(
    ids_a: np.ndarray, w_a: np.ndarray, ids_b: np.ndarray, w_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For joined routes (row i of A with row i of B, ids and weights in the router's order):
    (same set, same top-1, per-route sum of ``|w_A(e) - w_B(e)|`` over the set's experts, NaN
    where the sets differ). Routes of different k never have the same set."""
    if ids_a.shape[0] != ids_b.shape[0]:
        raise ValueError(f"ids_a and ids_b must have as many rows: {ids_a.shape}, {ids_b.shape}")
    top1 = ids_a[:, 0] == ids_b[:, 0]
    if ids_a.shape[1] != ids_b.shape[1]:
        n = ids_a.shape[0]
        return np.zeros(n, bool), top1, np.full(n, np.nan)
    sa, wa = sort_rows(ids_a, w_a)
    sb, wb = sort_rows(ids_b, w_b)
    return _agreement(sa, wa, sb, wb, top1)


def _agreement(
    sa: np.ndarray, wa: np.ndarray, sb: np.ndarray, wb: np.ndarray, top1: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    same = (sa == sb).all(axis=1)
    diff = np.abs(wa.astype(np.float64) - wb.astype(np.float64)).sum(axis=1)
    return same, top1, np.where(same, diff, np.nan)


def _share(part: int, whole: int) -> float:
    return part / whole if whole else math.nan


# --------------------------------------------------------------------------- the index


class _Keys:
    """Packs (request code, layer slot, token_idx) into one int64: the request in the top
    :data:`REQ_BITS` bits, then the layer slot, then the token."""

    def __init__(self, layers: list[int]) -> None:
        self.layers = np.asarray(sorted(set(layers)), np.int64)
        self.layer_bits = max(1, int(self.layers.size - 1).bit_length())
        self.tok_bits = 63 - REQ_BITS - self.layer_bits

    def slot(self, layer: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.layers, layer)

    def pack(self, req: np.ndarray, slot: np.ndarray, token: np.ndarray, where: Path) -> np.ndarray:
        if req.size and int(req.max()) >> REQ_BITS:
            raise UserError(f"{where}: more than {1 << REQ_BITS:,} requests: too many to join")
        if token.size and int(token.max()) >> self.tok_bits:
            raise UserError(f"{where}: token_idx beyond {1 << self.tok_bits:,}: too large to join")
        return (req << (self.layer_bits + self.tok_bits)) | (slot << self.tok_bits) | token

    def unpack(self, key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        token = key & ((1 << self.tok_bits) - 1)
        slot = (key >> self.tok_bits) & ((1 << self.layer_bits) - 1)
        return key >> (self.layer_bits + self.tok_bits), slot, token


@dataclass
class _Index:
    keys: np.ndarray
    """Sorted, unique."""
    ids: np.ndarray
    """(n, k) each row's ids ascending (smallest integer type that holds them)."""
    weights: np.ndarray
    """(n, k) float32, in the order of ``ids``."""
    top1: np.ndarray
    routes: int
    duplicates: int


def _build_index(log: RouteLog, keys: _Keys, on_issue: Any) -> _Index:
    """Every route of ``log`` by key; column by column, so that at most one column is
    duplicated at a time while the parts are joined and sorted."""
    assert log.meta is not None
    e, k = log.meta.num_experts, log.meta.top_k
    small = np.int16 if e is not None and e <= np.iinfo(np.int16).max else np.int64
    cols: dict[str, list[np.ndarray]] = {"key": [], "ids": [], "weights": [], "top1": []}
    routes = 0
    for chunk in log.chunks(on_issue):
        routes += len(chunk)
        cols["key"].append(keys.pack(chunk.req, keys.slot(chunk.layer), chunk.token_idx, log.path))
        ids, w = sort_rows(chunk.ids, chunk.weights)
        cols["ids"].append(ids.astype(small))
        cols["weights"].append(w)
        cols["top1"].append(chunk.ids[:, 0].astype(small))
    if not routes:
        none = np.zeros(0, np.int64)
        return _Index(none, np.zeros((0, k), small), np.zeros((0, k), np.float32), none, 0, 0)
    key = _joined(cols["key"])
    order = np.argsort(key, kind="stable")  # equal keys keep file order: the first one wins
    key = key[order]
    first = np.ones(key.size, bool)
    np.not_equal(key[1:], key[:-1], out=first[1:])
    keep = order[first]
    del order
    key = key[first]
    ids, weights, top1 = (_joined(cols[c])[keep] for c in ("ids", "weights", "top1"))
    return _Index(key, ids, weights, top1, routes, int(first.size - key.size))


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """The parts as one array; the list is emptied (its memory goes as the array comes)."""
    out = np.concatenate(parts)
    parts.clear()
    return out


# --------------------------------------------------------------------------- the join


class _Tally:
    """Per-layer counts of the joined routes, and each indexed request's first divergence."""

    def __init__(self, layers: int, requests: int) -> None:
        self.joined = np.zeros(layers, np.int64)
        self.same = np.zeros(layers, np.int64)
        self.top1 = np.zeros(layers, np.int64)
        self.wsum = np.zeros(layers)
        self.wpairs = np.zeros(layers, np.int64)
        self.wmax = 0.0
        self.unmatched = np.zeros(layers, np.int64)
        """Routes of the streamed log without a partner."""
        self.first = np.full(requests, _NONE, np.int64)
        """token_idx * layers + slot of each indexed request's first differing route."""
        self.duplicates = 0
        self.routes = 0


def compare_logs(
    a: str | Path | LogBase, b: str | Path | LogBase, *, show: int = SHOW
) -> ComparisonReport:
    """Join logs ``a`` and ``b`` on (req_id, token_idx, layer) and say how far their routing
    agrees (see the module docstring). Raises :class:`UserError` (a :class:`LogError` naming
    the file and line) when either cannot be read or has an invalid line."""
    if show < 0:
        raise ValueError(f"show must be >= 0, got {show}")
    logs = [open_one(a), open_one(b)]  # each a file, a Parquet log, or one run's DP ranks
    warnings: list[str] = []
    metas = [log.meta for log in logs]
    assert metas[0] is not None and metas[1] is not None
    keys = _Keys(metas[0].layers_logged + metas[1].layers_logged)
    small = 0 if logs[0].nbytes <= logs[1].nbytes else 1
    indexed, streamed = logs[small], logs[1 - small]
    index = _build_index(indexed, keys, _strict(indexed, warnings))
    names = {name: code for code, name in enumerate(indexed.req_ids)}
    tally = _Tally(keys.layers.size, len(names))
    seen = np.zeros(index.keys.size, bool)
    trans = np.zeros(0, np.int64)
    k_index = metas[small].top_k
    for chunk in streamed.chunks(_strict(streamed, warnings)):
        if len(streamed.req_ids) > trans.size:  # codes of the streamed log's new requests
            new = [names.get(n, -1) for n in streamed.req_ids[trans.size :]]
            trans = np.concatenate([trans, np.asarray(new, np.int64)])
        _join(chunk, trans, keys, index, seen, tally, k_index, streamed.path)
    if metas[0].top_k != metas[1].top_k:
        warnings.append(
            f"the logs have different top_k ({metas[0].top_k} vs {metas[1].top_k}): no top-k "
            "set can agree; top-1 is still compared"
        )
    for field_name in ("model_id", "num_experts"):
        va, vb = getattr(metas[0], field_name), getattr(metas[1], field_name)
        if va != vb:
            warnings.append(f"the logs differ in {field_name}: {va} vs {vb}")
    return _report(logs, small, index, seen, tally, keys, show, warnings)


def _strict(log: RouteLog, warnings: list[str]) -> Any:
    def sink(issue: Issue) -> None:
        if issue.severity == "error":
            raise LogError(f"{issue.format(log.path)} (run `moeprof validate {log.path}`)")
        warnings.append(issue.format(log.path))

    return sink


def _join(
    chunk: RouteChunk,
    trans: np.ndarray,
    keys: _Keys,
    index: _Index,
    seen: np.ndarray,
    tally: _Tally,
    k_index: int,
    where: Path,
) -> None:
    """Look the chunk's routes up in the index and fold the pairs into ``tally``."""
    tally.routes += len(chunk)
    slot = keys.slot(chunk.layer)
    req = trans[chunk.req]
    known = (req >= 0) & (chunk.token_idx < (1 << keys.tok_bits))
    key = keys.pack(np.where(known, req, 0), slot, np.where(known, chunk.token_idx, 0), where)
    pos = np.searchsorted(index.keys, key)
    pos_c = np.minimum(pos, max(index.keys.size - 1, 0))
    found = known & (pos < index.keys.size)
    if index.keys.size:
        found &= index.keys[pos_c] == key
    rows = np.flatnonzero(found)
    # a key met before (earlier chunk, or earlier in this one) is a duplicate of this log
    first_in_chunk = np.zeros(rows.size, bool)
    if rows.size:
        _, at = np.unique(pos[rows], return_index=True)
        first_in_chunk[at] = True
    fresh = first_in_chunk & ~seen[pos[rows]]
    tally.duplicates += int(rows.size - np.count_nonzero(fresh))
    rows = rows[fresh]
    p = pos[rows]
    seen[p] = True
    unmatched = ~found
    tally.unmatched += np.bincount(slot[unmatched], minlength=tally.joined.size)
    if not rows.size:
        return
    ids, w = chunk.ids[rows], chunk.weights[rows]
    top1 = ids[:, 0] == index.top1[p]
    if ids.shape[1] == k_index:
        sid, sw = sort_rows(ids, w)
        same, top1, diff = _agreement(sid, sw, index.ids[p], index.weights[p], top1)
    else:
        same, diff = np.zeros(rows.size, bool), np.full(rows.size, np.nan)
    s = slot[rows]
    n_layers = tally.joined.size
    tally.joined += np.bincount(s, minlength=n_layers)
    tally.same += np.bincount(s[same], minlength=n_layers)
    tally.top1 += np.bincount(s[top1], minlength=n_layers)
    if same.any():
        d = diff[same]
        tally.wsum += np.bincount(s[same], d, minlength=n_layers)
        tally.wpairs += np.bincount(s[same], minlength=n_layers) * ids.shape[1]
        width = np.abs(
            sw[same].astype(np.float64) - index.weights[p[same]].astype(np.float64)
        ).max()
        tally.wmax = max(tally.wmax, float(width))
    differ = ~same
    if differ.any():
        r = req[rows][differ]
        np.minimum.at(tally.first, r, chunk.token_idx[rows][differ] * n_layers + s[differ])


def _report(
    logs: list[RouteLog],
    small: int,
    index: _Index,
    seen: np.ndarray,
    tally: _Tally,
    keys: _Keys,
    show: int,
    warnings: list[str],
) -> ComparisonReport:
    n_layers = keys.layers.size
    _, unseen_slot, _ = keys.unpack(index.keys[~seen])
    only = {small: np.bincount(unseen_slot, minlength=n_layers), 1 - small: tally.unmatched}
    routes = {small: index.routes, 1 - small: tally.routes}
    dups = {small: index.duplicates, 1 - small: tally.duplicates}
    layers = []
    for i, layer in enumerate(keys.layers.tolist()):
        j = int(tally.joined[i])
        layers.append(
            LayerAgreement(
                layer=layer,
                joined=j,
                same_set=int(tally.same[i]),
                same_top1=int(tally.top1[i]),
                same_set_share=_share(int(tally.same[i]), j),
                same_top1_share=_share(int(tally.top1[i]), j),
                weight_mean_abs_diff=_mean(tally.wsum[i], int(tally.wpairs[i])),
                only_a=int(only[0][i]),
                only_b=int(only[1][i]),
            )
        )
    names_a, names_b = set(logs[0].req_ids), set(logs[1].req_ids)
    indexed = logs[small].req_ids
    diverged = np.flatnonzero(tally.first != _NONE)
    order_a = {name: i for i, name in enumerate(logs[0].req_ids)}
    listed = sorted(diverged.tolist(), key=lambda c: order_a[indexed[c]])[:show]
    first = [
        Divergence(
            indexed[c],
            int(tally.first[c] // n_layers),
            int(keys.layers[tally.first[c] % n_layers]),
        )
        for c in listed
    ]
    joined, same, top1 = (int(x.sum()) for x in (tally.joined, tally.same, tally.top1))
    wpairs = int(tally.wpairs.sum())
    return ComparisonReport(
        a=_side(logs[0], routes[0], len(names_a), dups[0]),
        b=_side(logs[1], routes[1], len(names_b), dups[1]),
        joined=joined,
        same_set=same,
        same_top1=top1,
        same_set_share=_share(same, joined),
        same_top1_share=_share(top1, joined),
        weight_mean_abs_diff=_mean(float(tally.wsum.sum()), wpairs),
        weight_max_abs_diff=tally.wmax if wpairs else math.nan,
        weight_routes=same,
        only_a=int(only[0].sum()),
        only_b=int(only[1].sum()),
        requests_both=len(names_a & names_b),
        requests_only_a=len(names_a - names_b),
        requests_only_b=len(names_b - names_a),
        diverged_requests=int(diverged.size),
        first_divergences=first,
        layers=layers,
        warnings=warnings,
    )


def _mean(total: float, n: int) -> float:
    return total / n if n else math.nan


def _side(log: RouteLog, routes: int, requests: int, duplicates: int) -> LogSide:
    m = log.meta
    assert m is not None
    extra = m.model_extra or {}
    return LogSide(
        path=str(log.path),
        model_id=m.model_id,
        vllm_version=m.vllm_version,
        torch_version=m.torch_version,
        device=m.device,
        dtype=extra.get("dtype"),
        top_k=m.top_k,
        num_experts=m.num_experts,
        routes=routes,
        requests=requests,
        duplicates=duplicates,
    )


def report_json(report: ComparisonReport) -> str:
    """The report as JSON (NaN shares, where nothing was joined, are null)."""
    import json

    from moeprof.analysis.analyze import _jsonable

    return json.dumps(_jsonable(report), indent=2)
