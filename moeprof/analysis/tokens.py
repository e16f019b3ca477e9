"""Token specialisation (``analyze --outputs F``): which tokens each expert handles.

The log has no token ids; ``generate``'s outputs.jsonl has them (``prompt_token_ids`` and
``output_token_ids`` per request). The route at ``token_idx`` p of a request is the input token
at position p of ``prompt_token_ids + output_token_ids``. A route whose request has no outputs
record, whose record has no token ids, or whose position lies beyond them is counted and left
out, never guessed.

Per logged layer, from the counts ``C[v, e]`` (selections of expert e by occurrences of token
v, each occurrence giving one to each of its k experts) and ``T[v, e]`` (occurrences of v
whose top-1 expert, the largest weight, is e):

- each expert's top tokens by count ``C[v, e]``, and by lift (:func:`token_lift`):
  ``C[v, e] * S / (C[v, :].sum() * C[:, e].sum())`` with ``S = C.sum()``, observed over
  expected when tokens and experts are independent; listed only for pairs with
  ``C[v, e] >= min_count`` (rare tokens would otherwise top every list with huge lifts).
- vocabulary specialisation as OLMoE defines it (allenai/OLMoE ``scripts/run_moe_analysis.py``,
  ``do_token_analysis_layers_experts``; the paper's figure uses top-1):
  ``spec(v) = max_e X[v, e] / n(v)``, ``n(v)`` the occurrences of v, ``X = T`` (top-1) or
  ``X = C`` (top-k: the share of v's occurrences that include its most frequent expert),
  averaged over the tokens with ``n(v) >= min_count`` (:func:`vocabulary_specialization`).
  OLMoE averages over every token id in that function; with few occurrences ``spec`` is 1 by
  construction, so the mean here keeps tokens seen at least ``min_count`` times (the filter
  OLMoE applies in ``do_token_analysis_experts``); ``min_count=1`` gives OLMoE's number.
- the same mean with no token dependence (:func:`null_specialization`): each occurrence of a
  counted token paired with a route drawn at random (fixed seed) from a uniform sample of
  :data:`NULL_SAMPLE` routes of the same layer (averaged over up to :data:`NULL_REPEATS`
  draws when the counted tokens occur fewer than :data:`NULL_DRAWS` times): the
  value the log's own load gives when routes do not depend on tokens (it is well above
  ``k / E`` when the load is skewed).

Memory does not grow with the log. The counts are kept per (layer, token, expert, top-1
flag), L logged layers, D the distinct token ids of the outputs file, E experts:

- dense (:class:`DenseTokenCounts`) when E is known and the ``L * D * E * 2`` uint32 counters
  fit in :data:`DENSE_MAX_BYTES`: fixed before the first route (4 layers x 25,000 tokens x 60
  experts: 48 MB; Qwen1.5-MoE's 24 layers x 10,000 tokens x 60: 115 MB);
- else sparse (:class:`SparseCounts`, 12-16 bytes per distinct (layer, token, expert, flag),
  about twice that while merging): bounded by the same ``2 * L * D * E`` keys and by the
  selections, so it grows with the log until the run's (token, expert) pairs have all been
  seen.

Besides: the outputs file's token ids as int32 ranks among its distinct ids (4 bytes each,
read one record at a time: :mod:`moeprof.analysis.outputs`), a route sample per layer
(:data:`NULL_SAMPLE` x k int16) and, at the end, one layer's (tokens x E) counts at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeprof.analysis.accumulate import MAX_INFERRED_EXPERTS
from moeprof.analysis.outputs import read_token_ids
from moeprof.analysis.passes import PassOptions, Skipped, register
from moeprof.analysis.reader import RouteChunk, RouteLog

MIN_COUNT = 10
"""Default ``min_count`` (``PassOptions.extra["min_token_count"]``): tokens seen fewer times do
not enter the specialisation mean, and (token, expert) pairs with fewer selections are not
ranked by lift."""
NULL_SAMPLE = 1 << 14
"""Routes per layer kept (uniformly, by random priority) to draw the no-dependence value from
(int16 ids: 16,384 x k x 2 bytes per layer)."""
NULL_REPEATS = 3
"""Draws averaged for the no-dependence value when the counted tokens occur fewer than
:data:`NULL_DRAWS` times (one draw otherwise)."""
NULL_DRAWS = 1 << 17
NULL_SEED = 0
_NULL_CHUNK = 1 << 18
"""Occurrences drawn at a time for the no-dependence value."""
_MERGE_MIN = 1 << 20
"""Pending sparse entries merged once they exceed this or the merged ones, if more."""
DENSE_MAX_BYTES = 1 << 30
"""Dense (layer, token, expert, flag) counters up to this size (:class:`DenseTokenCounts`);
beyond it, or with the number of experts unknown, sparse ones (:class:`SparseCounts`)."""


# --------------------------------------------------------------------------- statistics


def token_lift(
    pair: np.ndarray, token_total: np.ndarray, expert_total: np.ndarray, total: float
) -> np.ndarray:
    """Lift of each (token, expert) pair: ``pair[v, e] * total / (token_total[v] *
    expert_total[e])``, the count over its expectation if tokens and experts were independent
    with these margins. ``pair`` (V, E) counts, ``token_total`` (V,) and ``expert_total``
    (E,) their margins, ``total`` the grand total. NaN where a margin is 0. (One (V, E) float64
    array is made: the result.)"""
    pair = np.asarray(pair)
    token_total = np.asarray(token_total, np.float64)
    expert_total = np.asarray(expert_total, np.float64)
    if pair.ndim != 2:
        raise ValueError(f"`pair` must be a (V, E) array, got shape {pair.shape}")
    if token_total.shape != (pair.shape[0],) or expert_total.shape != (pair.shape[1],):
        raise ValueError(
            f"`token_total` and `expert_total` must have shapes ({pair.shape[0]},) and "
            f"({pair.shape[1]},), got {token_total.shape} and {expert_total.shape}"
        )
    if not total > 0:
        raise ValueError(f"`total` must be > 0, got {total}")
    out = np.outer(token_total, expert_total)
    out /= total  # the expected counts; then, in place, pair / expected where it is > 0
    ok = out > 0
    np.divide(pair, out, out=out, where=ok)
    out[~ok] = np.nan
    return out


def vocabulary_specialization(
    counts: np.ndarray, occurrences: np.ndarray, min_count: int = MIN_COUNT
) -> tuple[np.ndarray, float]:
    """OLMoE's token specialisation: ``spec[v] = counts[v].max() / occurrences[v]`` and its mean
    over the tokens with ``occurrences[v] >= min_count`` (NaN when there are none).

    ``counts`` (V, E): per token and expert, occurrences of the token routed to the expert
    (top-1 counts, or top-k membership counts: then ``spec`` is the share of the token's
    occurrences that include its most frequent expert). ``occurrences`` (V,): occurrences of
    each token. Returns (``spec`` for every token, NaN where it has no occurrence; the mean).
    """
    counts = np.asarray(counts)
    occurrences = np.asarray(occurrences)
    if counts.ndim != 2:
        raise ValueError(f"`counts` must be a (V, E) array, got shape {counts.shape}")
    if occurrences.shape != (counts.shape[0],):
        raise ValueError(
            f"`occurrences` must have shape ({counts.shape[0]},), got {occurrences.shape}"
        )
    if min_count < 1:
        raise ValueError(f"`min_count` must be >= 1, got {min_count}")
    if counts.size and (counts.max(axis=1) > occurrences).any():
        raise ValueError("`counts` has a token routed to one expert more often than it occurs")
    top = counts.max(axis=1) if counts.shape[1] else np.zeros(counts.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        spec = np.where(occurrences > 0, top / np.maximum(occurrences, 1), np.nan)
    kept = occurrences >= min_count
    mean = float(spec[kept].mean()) if kept.any() else float("nan")
    return spec, mean


def null_specialization(
    sample: np.ndarray,
    occurrences: np.ndarray,
    num_experts: int,
    *,
    top1: bool,
    repeats: int = NULL_REPEATS,
    seed: int = NULL_SEED,
) -> float:
    """The mean of :func:`vocabulary_specialization` when routes do not depend on tokens: token
    ``v`` gets ``occurrences[v]`` routes drawn uniformly with replacement from ``sample``
    ((m, k) expert ids, column 0 the top-1 expert), ``spec`` is computed from the top-1
    column (``top1``) or from all k, and the mean over tokens is averaged over ``repeats``
    draws from ``np.random.default_rng(seed)``. Every token in ``occurrences`` is counted (pass
    only those with at least ``min_count``). NaN when there is no token or no sample."""
    sample = np.asarray(sample)
    occurrences = np.asarray(occurrences, np.int64)
    if sample.ndim != 2:
        raise ValueError(f"`sample` must be an (m, k) array, got shape {sample.shape}")
    if occurrences.ndim != 1 or (occurrences < 1).any():
        raise ValueError("`occurrences` must be a 1-d array of positive counts")
    if num_experts < 1 or (sample.size and (sample.min() < 0 or sample.max() >= num_experts)):
        raise ValueError(f"`sample` must hold expert ids in [0, `num_experts`={num_experts})")
    if repeats < 1:
        raise ValueError(f"`repeats` must be >= 1, got {repeats}")
    if not occurrences.size or not sample.shape[0]:
        return float("nan")
    rng = np.random.default_rng(seed)
    cols = sample[:, :1] if top1 else sample
    v = occurrences.size
    ends = np.cumsum(occurrences)
    total = int(ends[-1])
    means = []
    for _ in range(repeats):
        # the draws go a chunk of occurrences at a time (memory follows the tokens, not the
        # occurrences); Generator.integers gives the same numbers in chunks as in one call
        counts = np.zeros(v * num_experts, np.int64)
        for a in range(0, total, _NULL_CHUNK):
            b = min(total, a + _NULL_CHUNK)
            label = np.searchsorted(ends, np.arange(a, b), side="right")
            drawn = cols[rng.integers(0, sample.shape[0], b - a)]
            flat = (label[:, None] * num_experts + drawn).ravel()
            counts += np.bincount(flat, minlength=v * num_experts)
        top = counts.reshape(v, num_experts).max(axis=1)
        means.append(float((top / occurrences).mean()))
    return float(np.mean(means))


def top_tokens(
    score: np.ndarray, eligible: np.ndarray, n: int, tiebreak: np.ndarray | None = None
) -> np.ndarray:
    """Per column of ``score`` (V, E), the rows of the ``n`` largest eligible scores, best
    first, ties by larger ``tiebreak`` then lower row; (E, n) row indices, -1 where a column
    has fewer than ``n`` eligible rows. Scores and tiebreaks compare as float64, converted a
    column at a time."""
    score = np.asarray(score)
    eligible = np.asarray(eligible, bool)
    if score.ndim != 2 or eligible.shape != score.shape:
        raise ValueError("`score` and `eligible` must be (V, E) arrays of one shape")
    if tiebreak is not None and np.shape(tiebreak) != score.shape:
        raise ValueError("`tiebreak` must be a (V, E) array of the shape of `score`")
    if n < 0:
        raise ValueError(f"`n` must be >= 0, got {n}")
    v, e = score.shape
    tb = None if tiebreak is None else np.asarray(tiebreak)
    out = np.full((e, n), -1, np.int64)
    rows = np.arange(v)
    for col in range(e):
        ok = np.flatnonzero(eligible[:, col])
        if not ok.size:
            continue
        keys = [rows[ok], -score[ok, col].astype(np.float64)]
        if tb is not None:
            keys.insert(1, -tb[ok, col].astype(np.float64))
        order = np.lexsort(keys)[:n]
        out[col, : order.size] = ok[order]
    return out


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class TokenScore:
    """One token in an expert's list."""

    token_id: int
    text: str | None
    """The token decoded on its own (None when no tokenizer could be loaded)."""
    count: int
    """Selections of the expert by this token."""
    lift: float


@dataclass
class ExpertTokens:
    expert: int
    selections: int
    share: float
    """Of the layer's selections (joined routes only)."""
    by_count: list[TokenScore]
    by_lift: list[TokenScore]
    """Among pairs selected at least ``min_count`` times."""


@dataclass
class LayerTokens:
    layer: int
    routes: int
    """Routes of this layer joined to a token."""
    distinct_tokens: int
    counted_tokens: int
    """Tokens seen at least ``min_count`` times: those the specialisation means are over."""
    top1: float
    """Mean vocabulary specialisation, top-1 expert (OLMoE's figure); NaN without tokens."""
    top1_null: float
    """The same with routes independent of tokens (the log's own load)."""
    topk: float
    """Mean vocabulary specialisation over the k experts."""
    topk_null: float
    experts: list[ExpertTokens]


@dataclass
class Unjoined:
    """Routes with no token, by why."""

    no_record: int = 0
    """Their request is not in the outputs file."""
    no_token_ids: int = 0
    """Their request's record has no prompt_token_ids."""
    beyond_ids: int = 0
    """Their position is beyond the request's prompt + output token ids."""

    @property
    def total(self) -> int:
        return self.no_record + self.no_token_ids + self.beyond_ids


@dataclass
class TokenAnalysis:
    outputs: str
    tokenizer: str | None
    """What decoded the token texts; None when none could be loaded."""
    tokenizer_note: str | None
    """Why there are no texts (one line), when ``tokenizer`` is None."""
    min_count: int
    top_k: int
    routes: int
    """Routes seen."""
    joined: int
    unjoined: Unjoined
    layers: list[LayerTokens]
    requests_unjoined: int = 0
    """Requests in the log with no usable outputs record."""


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(name: str) -> tuple[Callable[[int], str] | None, str]:
    """(decode one token id, what was loaded) or (None, why not), never over the network: a
    ``tokenizer.json`` (the file, in a model folder, or in the local Hugging Face cache of a
    hub id) through the ``tokenizers`` library; else ``transformers``' AutoTokenizer on a
    local folder or a hub id with files in the local cache (slow tokenizers, e.g.
    SentencePiece). A hub id with nothing cached is not tried (importing transformers alone
    takes seconds)."""
    path = Path(name).expanduser()
    local = path.exists()
    if local:
        file = path / "tokenizer.json" if path.is_dir() else path
        config = path if path.is_dir() else None
    else:
        file, config = _cached(name, "tokenizer.json"), None
        if file is None and _cached(name, "tokenizer_config.json") is not None:
            config = Path(name)
    why = ""
    if file is not None and file.is_file() and file.suffix == ".json":
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(file))
            return (lambda i: tok.decode([i], skip_special_tokens=False)), str(file)
        except Exception as e:  # any failure: try transformers, then say why
            why = f" ({file}: {type(e).__name__})"
    if config is None:
        where = "a file or folder without a tokenizer" if local else "not in the local cache"
        return None, f"no tokenizer for {name} on this machine ({where}; no network){why}"
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(name), local_files_only=True)
        return (lambda i: hf.decode([i])), str(name)
    except Exception as e:
        return None, f"no tokenizer for {name} on this machine ({type(e).__name__}){why}"


def _cached(repo: str, filename: str) -> Path | None:
    """``filename`` of hub repo ``repo`` in the local Hugging Face cache, or None. A repo
    without a folder in the cache is answered without importing huggingface_hub."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub"
    )
    if not os.path.isdir(os.path.join(hub, "models--" + repo.replace("/", "--"))):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        got = try_to_load_from_cache(repo, filename)
    except Exception:  # not a repo id, no huggingface_hub: not cached
        return None
    return Path(got) if isinstance(got, str) else None


# --------------------------------------------------------------------------- accumulation


class SparseCounts:
    """Counts of integer keys, folded in a chunk at a time: each chunk's keys are sorted and
    run-length counted; pending (keys, counts) are merged into the sorted total when they
    outgrow it (amortised: each entry is merged O(log) times). Memory: 12 (uint32 keys) or 16
    bytes per distinct key, about twice that while merging."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, keys: np.ndarray) -> None:
        if not keys.size:
            return
        s = np.sort(keys)
        starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
        counts = np.diff(np.append(starts, s.size))
        self._pending.append((s[starts], counts))
        self._pending_size += starts.size
        if self._pending_size > max(_MERGE_MIN, self.keys.size):
            self.merge()

    def merge(self) -> None:
        if not self._pending:
            return
        parts = [(self.keys, self.counts)] if self.keys.size else []
        parts += self._pending
        keys = np.concatenate([k for k, _ in parts])  # the keys' own dtype (uint32 or int64)
        counts = np.concatenate([c for _, c in parts])
        self._pending, self._pending_size = [], 0
        # a stable sort of sorted runs is a merge (timsort): far cheaper than a full sort
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        self.keys = keys[starts]
        self.counts = np.add.reduceat(counts, starts) if starts.size else counts[:0]


LayerCounts = tuple[np.ndarray, np.ndarray, np.ndarray]
"""One layer's counts: (the token ranks seen, ascending; ``C`` (v, E) and ``T`` (v, E) int64,
one row per token seen)."""


class DenseTokenCounts:
    """``C`` and ``T`` of every layer as one uint32 array of (layer, token rank, expert, top-1
    flag) counters, indexed by the packed key ``((slot * D + rank) * E + expert) * 2 + flag``:
    ``C`` is the sum over the flag, ``T`` the flag-1 counters. Each chunk's keys are sorted and
    run-length counted, and the counts added (a gather and a scatter per distinct key)."""

    def __init__(self, layers: int, tokens: int, experts: int) -> None:
        self.layers, self.tokens, self.experts = layers, tokens, experts
        self.counts = np.zeros(layers * tokens * experts * 2, np.uint32)
        self._room = int(np.iinfo(np.uint32).max)
        """Keys that may still come before a counter could overflow uint32."""

    @property
    def nbytes(self) -> int:
        return int(self.counts.nbytes)

    def add(self, keys: np.ndarray) -> None:
        if not keys.size:
            return
        if keys.size > self._room and self.counts.dtype == np.uint32:
            self.counts = self.counts.astype(np.uint64)  # some 4e9 routes: widen once
        self._room -= keys.size
        s = np.sort(keys)
        new = np.empty(s.size, bool)
        new[0] = True
        np.not_equal(s[1:], s[:-1], out=new[1:])
        starts = np.flatnonzero(new)
        runs = np.diff(np.append(starts, s.size)).astype(self.counts.dtype)
        self.counts[s[starts]] += runs

    def width(self) -> int:
        return self.experts

    def layer(self, slot: int, experts: int) -> LayerCounts:
        size = self.tokens * self.experts * 2
        block = self.counts[slot * size : (slot + 1) * size].reshape(self.tokens, -1)
        tokens = np.flatnonzero(block.any(axis=1))
        pairs = block[tokens].reshape(tokens.size, self.experts, 2)[:, :experts]
        top1 = pairs[:, :, 1].astype(np.int64)
        sel = pairs[:, :, 0] + top1  # C = flag 0 + flag 1
        return tokens, sel, top1


class SparseTokenCounts:
    """``C`` and ``T`` of every layer as :class:`SparseCounts` of the packed keys of
    :class:`DenseTokenCounts` (with E the widest plausible expert axis when the number of
    experts is unknown)."""

    def __init__(self, layers: int, tokens: int, experts: int) -> None:
        self.layers, self.tokens, self.experts = layers, tokens, experts
        self._counts = SparseCounts()
        self._bounds: np.ndarray | None = None

    def add(self, keys: np.ndarray) -> None:
        self._counts.add(keys)

    def _merged(self) -> np.ndarray:
        """The slot boundaries in the merged keys (merging once)."""
        if self._bounds is None:
            self._counts.merge()
            self._counts.keys = self._counts.keys.astype(np.int64)
            per_slot = 2 * self.tokens * self.experts
            slots = self._counts.keys // per_slot
            self._bounds = np.searchsorted(slots, np.arange(self.layers + 1))
        return self._bounds

    def width(self) -> int:
        """The largest expert id counted + 1 (one expert axis for every layer)."""
        self._merged()
        keys = self._counts.keys
        return int(((keys >> 1) % self.experts).max()) + 1 if keys.size else 1

    def layer(self, slot: int, experts: int) -> LayerCounts:
        bounds = self._merged()
        a, b = int(bounds[slot]), int(bounds[slot + 1])
        keys = self._counts.keys[a:b] % (2 * self.tokens * self.experts)
        counts = self._counts.counts[a:b]
        flag = keys & 1
        rest = keys >> 1
        expert = rest % self.experts
        rank = rest // self.experts
        # keys are sorted, so the layer's token ranks come in order: runs, not a sort
        new = np.concatenate(([True], rank[1:] != rank[:-1])) if rank.size else rank.astype(bool)
        tokens = rank[new]
        local = np.cumsum(new) - 1
        v = tokens.size
        flat = local * experts + expert
        sel = np.bincount(flat, weights=counts, minlength=v * experts).reshape(v, experts)
        top1 = np.bincount(flat[flag == 1], weights=counts[flag == 1], minlength=v * experts)
        return tokens, sel.astype(np.int64), top1.reshape(v, experts).astype(np.int64)


class RouteSample:
    """A uniform sample of ``size`` routes from a stream: the routes of the ``size`` lowest
    random priorities. Offers are buffered and cut back to ``size`` when twice that many
    wait, so the cut (a partition) is paid once per ``size`` offers."""

    def __init__(self, size: int, k: int, dtype: type[np.integer]) -> None:
        self.size = size
        self._prio = [np.zeros(0)]
        self._routes = [np.zeros((0, k), dtype)]
        self._held = 0
        self.threshold = np.inf
        """Offers with a priority at or above this can no longer enter the sample."""

    def offer(self, prio: np.ndarray, routes: np.ndarray) -> float:
        """Offer routes with their priorities; returns the new threshold."""
        keep = prio < self.threshold
        if not keep.all():
            prio, routes = prio[keep], routes[keep]
        self._prio.append(prio)
        self._routes.append(routes)
        self._held += prio.size
        if self._held > 2 * self.size:
            self._cut()
        return self.threshold

    def _cut(self) -> None:
        prio, routes = np.concatenate(self._prio), np.concatenate(self._routes)
        if prio.size > self.size:
            keep = np.argpartition(prio, self.size - 1)[: self.size]
            prio, routes = prio[keep], routes[keep]
            self.threshold = float(prio.max())
        self._prio, self._routes, self._held = [prio], [routes], prio.size

    def routes(self) -> np.ndarray:
        """The sample: (min(size, offered), k) routes."""
        self._cut()
        return self._routes[0]


_NO_RECORD, _NO_IDS = -1, -2


class TokenPass:
    """Joins routes to their tokens and counts (layer, token, expert) selections."""

    def __init__(
        self, log: RouteLog, num_experts: int | None, options: PassOptions, path: Path
    ) -> None:
        assert log.meta is not None
        self.log = log
        self.path = path
        self.options = options
        self.top_k = log.meta.top_k
        self.num_experts = num_experts
        self.key_experts = num_experts or MAX_INFERRED_EXPERTS
        self.min_count = int(options.extra.get("min_token_count", MIN_COUNT))
        if self.min_count < 1:
            raise ValueError(f"min_token_count must be >= 1, got {self.min_count}")
        self._tokens = read_token_ids(path)
        self.usable = self._tokens.usable
        self.vocab = self._tokens.vocab
        layers = len(log.layers)
        d = max(self.vocab.size, 1)
        key_space = 2 * layers * d * self.key_experts
        self._key_dtype = np.uint32 if key_space <= np.iinfo(np.uint32).max else np.int64
        """uint32 keys where they fit: they sort ~40% faster than int64."""
        dense = num_experts is not None and 4 * key_space <= DENSE_MAX_BYTES
        self._counts: DenseTokenCounts | SparseTokenCounts = (
            DenseTokenCounts if dense else SparseTokenCounts
        )(layers, self.vocab.size, self.key_experts)
        self._offset = np.zeros(0, np.int64)
        self._length = np.zeros(0, np.int64)
        self._rng = np.random.default_rng(NULL_SEED)
        self._id_dtype = np.int16 if self.key_experts <= np.iinfo(np.int16).max else np.int32
        self._samples = [
            RouteSample(NULL_SAMPLE, self.top_k, self._id_dtype) for _ in range(layers)
        ]
        self._threshold = np.full(layers, np.inf)
        self.routes = 0
        self.joined = 0
        self.unjoined = Unjoined()
        self._layer_routes = np.zeros(layers, np.int64)

    def _tables(self, upto: int) -> None:
        """Offsets and lengths of request codes below ``upto`` in the flat token ids."""
        have = self._offset.size
        if upto <= have:
            return
        names = self.log.req_ids[have:upto]
        t = self._tokens
        row = np.array([t.rows.get(name, -1) for name in names], np.int64)
        known = row >= 0
        off = np.full(len(names), _NO_RECORD, np.int64)
        length = np.zeros(len(names), np.int64)
        off[known] = np.where(t.offset[row[known]] >= 0, t.offset[row[known]], _NO_IDS)
        length[known] = t.length[row[known]]
        self._offset = np.concatenate([self._offset, off])
        self._length = np.concatenate([self._length, length])

    def add(self, chunk: RouteChunk) -> None:
        n = len(chunk)
        if not n:
            return
        self.routes += n
        req, pos = chunk.req, chunk.token_idx
        self._tables(int(req.max()) + 1)
        off, length = self._offset[req], self._length[req]
        ok = (off >= 0) & (pos < length)
        joined = int(np.count_nonzero(ok))
        if joined < n:
            u = self.unjoined
            u.no_record += int(np.count_nonzero(off == _NO_RECORD))
            u.no_token_ids += int(np.count_nonzero(off == _NO_IDS))
            u.beyond_ids += int(np.count_nonzero((off >= 0) & ~ok))
            if not joined:
                return
            rows = np.flatnonzero(ok)
            off, pos, ids, w, layer = (
                off[rows],
                pos[rows],
                chunk.ids[rows],
                chunk.weights[rows],
                chunk.layer[rows],
            )
        else:
            ids, w, layer = chunk.ids, chunk.weights, chunk.layer
        self.joined += joined
        rank = self._tokens.ranks[off + pos].astype(np.int64)
        slot = self.log.layer_slot(layer)
        self._layer_routes += np.bincount(slot, minlength=self._layer_routes.size)
        top1 = np.argmax(w, axis=1)
        e = self.key_experts
        base = (slot * self.vocab.size + rank) * e
        keys = (base[:, None] + ids) * 2
        keys[np.arange(keys.shape[0]), top1] += 1
        self._counts.add(keys.ravel().astype(self._key_dtype, copy=False))
        self._sample_routes(slot, ids, top1)

    def _sample_routes(self, slot: np.ndarray, ids: np.ndarray, top1: np.ndarray) -> None:
        """Offer each row to its layer's :class:`RouteSample`, top-1 expert first."""
        prio = self._rng.random(slot.size)
        cand = np.flatnonzero(prio < self._threshold[slot])
        if not cand.size:
            return
        slots = slot[cand]
        for s in np.unique(slots) if len(self._samples) > 1 else [0]:
            rows = cand if len(self._samples) == 1 else cand[slots == s]
            routes = ids[rows].astype(self._id_dtype)
            t = top1[rows]
            at = np.arange(rows.size)
            first = routes[at, t]
            routes[at, t] = routes[:, 0]
            routes[:, 0] = first
            self._threshold[s] = self._samples[s].offer(prio[rows], routes)

    def finish(self) -> TokenAnalysis | Skipped:
        if not self.usable:
            return Skipped(
                f"{self.path}: its records have no prompt_token_ids (written before moeprof "
                "recorded token ids?), so no route can be joined to its token"
            )
        if not self.joined:
            return Skipped(
                f"no route could be joined to a token of {self.path} "
                f"({unjoined_text(self.unjoined)})"
            )
        decode, tokenizer, note = self._tokenizer()
        # one expert axis for every layer: the meta's, else the largest id seen + 1
        experts = self.num_experts or self._counts.width()
        layers = [
            self._layer(s, layer, *self._counts.layer(s, experts), decode)
            for s, layer in enumerate(self.log.layers)
        ]
        self._counts = SparseTokenCounts(0, 0, 1)  # free the counts
        requests_unjoined = int(np.count_nonzero(self._offset < 0))
        return TokenAnalysis(
            outputs=str(self.path),
            tokenizer=tokenizer,
            tokenizer_note=note,
            min_count=self.min_count,
            top_k=self.top_k,
            routes=self.routes,
            joined=self.joined,
            unjoined=self.unjoined,
            layers=layers,
            requests_unjoined=requests_unjoined,
        )

    def _tokenizer(self) -> tuple[Callable[[int], str] | None, str | None, str | None]:
        name = self.options.tokenizer or (self.log.meta.model_id if self.log.meta else None)
        if not name:
            return None, None, "no tokenizer given and no model in the meta: token ids shown"
        decode, what = load_tokenizer(name)
        if decode is None:
            return None, None, what + ": token ids shown"
        return decode, what, None

    def _layer(
        self,
        slot: int,
        layer: int,
        tokens: np.ndarray,
        sel: np.ndarray,
        top1: np.ndarray,
        decode: Callable[[int], str] | None,
    ) -> LayerTokens:
        """One layer's result from its counts (:data:`LayerCounts`)."""
        v, experts = sel.shape
        occ = top1.sum(axis=1)
        _, spec1 = vocabulary_specialization(top1, occ, self.min_count)
        _, speck = vocabulary_specialization(sel, occ, self.min_count)
        counted = occ[occ >= self.min_count]
        sample = self._samples[slot].routes()
        # repeat the draw while few occurrences are drawn (the mean of one draw over many
        # tokens already varies little)
        repeats = int(np.clip(-(-NULL_DRAWS // max(int(counted.sum()), 1)), 1, NULL_REPEATS))
        null1, nullk = (
            null_specialization(sample, counted, experts, top1=first, repeats=repeats)
            for first in (True, False)
        )
        return LayerTokens(
            layer=layer,
            routes=int(self._layer_routes[slot]),
            distinct_tokens=int(v),
            counted_tokens=int(counted.size),
            top1=spec1,
            top1_null=null1,
            topk=speck,
            topk_null=nullk,
            experts=self._expert_lists(sel, self.vocab[tokens], decode),
        )

    def _expert_lists(
        self, sel: np.ndarray, token_ids: np.ndarray, decode: Callable[[int], str] | None
    ) -> list[ExpertTokens]:
        n = self.options.top
        total = float(sel.sum())
        expert_total = sel.sum(axis=0)
        if not total:
            return []
        lift = token_lift(sel, sel.sum(axis=1), expert_total, total)
        by_count = top_tokens(sel, sel > 0, n)
        # lifts equal on paper differ in their last bits: rank them rounded, ties by count
        by_lift = top_tokens(np.round(lift, 9), sel >= self.min_count, n, tiebreak=sel)
        texts: dict[int, str | None] = {}

        def score(row: int, col: int) -> TokenScore:
            tid = int(token_ids[row])
            if tid not in texts:
                texts[tid] = _safe_decode(decode, tid)
            return TokenScore(tid, texts[tid], int(sel[row, col]), float(lift[row, col]))

        return [
            ExpertTokens(
                expert=col,
                selections=int(expert_total[col]),
                share=float(expert_total[col] / total),
                by_count=[score(r, col) for r in by_count[col].tolist() if r >= 0],
                by_lift=[score(r, col) for r in by_lift[col].tolist() if r >= 0],
            )
            for col in range(sel.shape[1])
        ]


def _safe_decode(decode: Callable[[int], str] | None, token_id: int) -> str | None:
    if decode is None:
        return None
    try:
        return decode(token_id)
    except Exception:  # an id outside the tokenizer's vocabulary
        return None


def unjoined_text(u: Unjoined) -> str:
    """'40 of requests without an outputs record, 15 beyond their request's token ids'."""
    parts = [
        f"{n:,} {why}"
        for n, why in (
            (u.no_record, "of requests without an outputs record"),
            (u.no_token_ids, "of requests whose record has no token ids"),
            (u.beyond_ids, "beyond their request's token ids"),
        )
        if n
    ]
    return ", ".join(parts) or "no routes"


class _SkippedPass:
    def __init__(self, reason: str) -> None:
        self.reason = reason

    def add(self, chunk: RouteChunk) -> None:
        pass

    def finish(self) -> Skipped:
        return Skipped(self.reason)


@register("tokens")
def make_token_pass(log: RouteLog, num_experts: int | None, options: PassOptions) -> Any:
    """The token pass, or one that says why there is none (no ``--outputs``)."""
    if options.outputs is None:
        return _SkippedPass("no --outputs file given")
    return TokenPass(log, num_experts, options, Path(options.outputs))
