"""The records of a moeprof log and of a generate run's outputs, shared by every part of moeprof.

A log is JSON Lines: line 1 a :class:`MetaRecord`, every later line a :class:`RouteRecord`,
and, when the hook closed the log cleanly, a last line :class:`EndRecord`. The same records as
Parquet columns are laid out in :mod:`moeprof.columns`.
The hook writes these records, ``validate``/``analyze``/``plot`` read them; nothing else
defines the format. Only the fields DESIGN.md calls the minimum are required, so logs written
by other tools parse; extra fields are kept (``extra="allow"``).

Types are strict (a ``"3"`` is not a token index) because a log whose writer got the types
wrong is a log whose numbers cannot be trusted either.

Besides the records, this module holds the rules every reader of routes shares: the phase names
and their codes, what a reader's columns can hold (:data:`INT64_MAX`, :data:`FLOAT32_MAX`), and
the expert-id rules in vectorised form (:func:`ids_valid`). How the hook spells a route line,
byte for byte, is in :mod:`moeprof.layout`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1
"""Bumped when a field changes meaning; readers accept logs without it (other tools)."""

Phase = Literal["prefill", "decode"]
PHASES: tuple[Phase, ...] = get_args(Phase)
"""The phases a route can be in. A phase's code (in readers' columns) is its index here."""
NO_PHASE = -1
"""The phase code of a route without a phase."""
NO_STEP = -1
"""What a reader's step column holds for a route without a step (steps are never negative)."""

INT64_MAX = (1 << 63) - 1
"""The largest integer a reader holds: token_idx, layer, step and expert ids are int64 columns."""
FLOAT32_MAX = float(np.finfo(np.float32).max)
"""The largest weight magnitude a reader holds: weights are float32 columns."""

NonNegInt = Annotated[int, Field(ge=0)]


class _Record(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class MetaRecord(_Record):
    """The header line: what produced the log and how to read its routes."""

    type: Literal["meta"]
    model_id: str
    vllm_version: str
    torch_version: str
    device: str
    seed: int | None = None
    layers_logged: Annotated[list[NonNegInt], Field(min_length=1)]
    top_k: Annotated[int, Field(ge=1)]
    num_experts: Annotated[int, Field(ge=1)] | None = None
    schema_version: int | None = None
    prefix_caching: bool | None = None
    """Cached prompt tokens skip the router; with caching on, prompts can lack routes."""
    routing: dict[str, Any] | None = None
    """What ``topk_weights`` mean for the lowest logged layer: scoring, renormalisation,
    grouped top-k, correction bias, routed scaling factor and whether the router or the MoE
    runner applies it (keys in :mod:`moeprof.routing_facts`). None: not known (other tools)."""
    routing_differs_in_layers: list[NonNegInt] | None = None
    """Logged layers whose router has other ``routing`` semantics than the lowest one's
    (empty: all the same)."""

    @model_validator(mode="after")
    def _check(self) -> MetaRecord:
        if len(set(self.layers_logged)) != len(self.layers_logged):
            raise ValueError(f"layers_logged has repeated layers: {self.layers_logged}")
        if self.num_experts is not None and self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        return self


class RouteRecord(_Record):
    """One real token's routing decision at one layer.

    The fields are declared in the order the hook writes them (:mod:`moeprof.layout`).
    """

    type: Literal["route"]
    req_id: Annotated[str, Field(min_length=1)]
    token_idx: NonNegInt
    """Position of the token in its request, prompt tokens first."""
    layer: NonNegInt
    topk_ids: list[int]
    topk_weights: list[float]
    phase: Phase | None = None
    step: NonNegInt | None = None
    """The engine step (forward pass) that routed the token: the same for every route of one
    forward pass, increasing through the log. Optional: older logs and other tools' lack it."""

    @model_validator(mode="after")
    def _check(self, info: Any) -> RouteRecord:
        meta: MetaRecord | None = (info.context or {}).get("meta") if info else None
        problem = route_problem(self.topk_ids, self.topk_weights, self.layer, meta)
        if problem:
            raise ValueError(problem)
        return self


class EndRecord(_Record):
    """The closing line, written by the hook when logging ends cleanly (engine shutdown).

    A log without it was cut short: the engine was killed, crashed, or is still running.
    Readers of logs written by other tools must not require it. In a JSONL log it is the last
    line; in a Parquet log it is the key-value metadata ``moeprof.end`` of the last part
    (:mod:`moeprof.columns`).
    """

    type: Literal["end"]
    routes: NonNegInt
    """Routes written to the log (what a reader finds in it)."""
    dropped: NonNegInt = 0
    """Routes captured but not written (logging stopped early: see ``stopped``)."""
    stopped: str | None = None
    """Why logging stopped before the engine did (disk full, log removed, ...); None when it
    ran to the end."""
    requests: NonNegInt | None = None
    """Requests that had at least one route logged."""
    requests_unfinished: NonNegInt | None = None
    """Of those, requests the worker had not been told were finished when logging ended: the
    ones the shutdown cut short, and ones that finished in the engine's last step (vLLM tells a
    worker that a request finished only with the next step's batch). So an upper bound on the
    requests cut short, not a count of aborted ones: compare with the outputs you hold."""
    steps: NonNegInt | None = None
    """Engine steps (forward passes) logged."""
    closed: str | None = None
    """When the log was closed, ISO 8601 UTC."""


def route_problem(
    ids: list[int], weights: list[float], layer: int, meta: MetaRecord | None
) -> str | None:
    """The first thing wrong with a route's lists against its meta, or None."""
    if len(ids) != len(weights):
        return f"topk_ids has {len(ids)} entries but topk_weights has {len(weights)}"
    if meta is not None:
        if len(ids) != meta.top_k:
            return f"topk_ids has {len(ids)} entries, expected top_k={meta.top_k}"
        if layer not in meta.layers_logged:
            return f"layer {layer} is not in layers_logged {meta.layers_logged}"
    if not ids:
        return "topk_ids is empty"
    if len(set(ids)) != len(ids):
        return f"topk_ids repeats an expert: {ids}"
    if min(ids) < 0:
        return f"topk_ids has a negative expert id: {ids}"
    if meta is not None and meta.num_experts is not None and max(ids) >= meta.num_experts:
        return f"expert id {max(ids)} is out of range for num_experts={meta.num_experts}"
    for w in weights:
        if not math.isfinite(w):
            return f"topk_weights has a non-finite value: {w}"
    return None


def ids_valid(ids: np.ndarray, num_experts: int | None) -> np.ndarray:
    """Rows of ``ids`` (n, k) whose expert ids pass :func:`route_problem`'s id rules: at least
    one, none negative, none repeated, all below ``num_experts`` (when known). A bool mask."""
    n, k = ids.shape
    if k == 0:
        return np.zeros(n, bool)
    ok = ids.min(axis=1) >= 0
    if num_experts is not None:
        ok &= ids.max(axis=1) < num_experts
    if k <= 8:  # k(k-1)/2 column comparisons beat a sort for the usual top-k
        for a in range(k):
            for b in range(a + 1, k):
                ok &= ids[:, a] != ids[:, b]
    else:
        s = np.sort(ids, axis=1)
        ok &= ~(s[:, 1:] == s[:, :-1]).any(axis=1)
    return ok


def weights_valid(weights: np.ndarray) -> np.ndarray:
    """Elementwise: finite (the schema's rule) and within :data:`FLOAT32_MAX` (a reader's)."""
    return np.isfinite(weights) & (np.abs(weights) <= FLOAT32_MAX)


def range_problem(
    token_idx: int,
    layer: int,
    ids: Sequence[int],
    weights: Sequence[float],
    step: int | None = None,
) -> str | None:
    """What a valid record holds that a reader's columns cannot (int64, float32), or None.

    Not part of :class:`RouteRecord`'s validation: readers report it after the schema's own
    rules, and a record beyond these ranges is still well-formed JSON of the right types.
    """
    if max(token_idx, layer, step or 0, *ids) > INT64_MAX:
        return "an integer field exceeds 64 bits"
    if any(abs(w) > FLOAT32_MAX for w in weights):
        return "topk_weights has a value beyond float32 range"
    return None


class OutputRecord(_Record):
    """One request of a ``generate`` run, so that a log's token accounting can be checked."""

    req_id: Annotated[str, Field(min_length=1)]
    prompt_tokens: NonNegInt
    generated_tokens: NonNegInt
    prompt_idx: NonNegInt | None = None
    num_cached_tokens: NonNegInt | None = None
    """Prompt tokens served from the prefix cache (vLLM's ``RequestOutput.num_cached_tokens``):
    they skip the router, so the request's routes start at this position. None: not recorded
    (outputs files written before moeprof recorded it)."""
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] | None = None
    text: str | None = None
    finish_reason: str | None = None

    @model_validator(mode="after")
    def _check(self) -> OutputRecord:
        if self.num_cached_tokens is not None and self.num_cached_tokens > self.prompt_tokens:
            raise ValueError(
                f"num_cached_tokens={self.num_cached_tokens} exceeds "
                f"prompt_tokens={self.prompt_tokens}"
            )
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) != self.prompt_tokens:
            raise ValueError(
                f"prompt_token_ids has {len(self.prompt_token_ids)} ids but "
                f"prompt_tokens={self.prompt_tokens}"
            )
        return self

    @property
    def first_routed(self) -> int:
        """Position of the first routed token: cached prompt tokens are not routed."""
        return self.num_cached_tokens or 0

    @property
    def expected_routes(self) -> int:
        """Every token the model was fed: the last sampled token is never fed back, and cached
        prompt tokens (when recorded) are not fed at all."""
        return max(self.prompt_tokens + max(self.generated_tokens - 1, 0) - self.first_routed, 0)


def parse_meta(line: str | bytes) -> MetaRecord:
    return MetaRecord.model_validate_json(line)


def parse_end(line: str | bytes) -> EndRecord:
    return EndRecord.model_validate_json(line)


def parse_route(line: str | bytes, meta: MetaRecord | None = None) -> RouteRecord:
    return RouteRecord.model_validate_json(line, context={"meta": meta})


def explain(exc: ValidationError) -> str:
    """One line a person can act on, from pydantic's error list (the first error wins)."""
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "json_invalid":
        return f"not valid JSON ({err.get('ctx', {}).get('error', msg)})"
    if err["type"] == "missing":
        return f"missing field '{loc}'"
    if loc:
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r:.60})"
        return f"{loc}: {msg}{shown}"
    return msg


def meta_dict(**fields: Any) -> dict[str, Any]:
    """A validated meta header as a plain dict, for writers that serialise it themselves."""
    meta = MetaRecord(type="meta", schema_version=SCHEMA_VERSION, **fields)
    return meta.model_dump(mode="json")
