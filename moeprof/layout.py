"""The hook's route line, byte for byte: the one place that spells a route record.

The hook writes every route line from one %-format, :func:`route_template`, filled many rows at
a time by :func:`format_routes` (column by column, :mod:`moeprof.route_text`; the plain
%-format, :func:`format_routes_reference`, is the definition it reproduces byte for byte)::

    {"type":"route","req_id":"0","token_idx":7,"layer":12,"topk_ids":[40,48,22,4],
     "topk_weights":[0.1149279,0.1104169,0.08656031,6.181274e-05],"phase":"prefill","step":17}

(one line, no spaces). The vectorised parser (:mod:`moeprof.analysis.fastparse`) reads exactly
this layout; it takes the literal bytes it expects from :func:`route_layout`, the same template
cut at its values, so the writer and the parser cannot drift apart. Tests and benchmarks write
"hook-layout" lines with these functions too.

The keys come in :class:`moeprof.schema.RouteRecord`'s field order; :data:`SPELLING` says how
each value is written. A new route field is declared in ``RouteRecord`` (where it stands there
is where it stands in the line), spelled in :data:`SPELLING`, and given its column in
:func:`format_routes_reference` and in :mod:`moeprof.route_text` (which hands a template with a
field it does not know to the reference, so the new field is slow but right until then).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from moeprof.schema import PHASES, RouteRecord

FIELDS: tuple[str, ...] = tuple(RouteRecord.model_fields)
"""The keys of a route line, in the order the hook writes them."""

WEIGHT_FORMAT = "%.9g"
"""A router weight: 9 significant digits, float32's round-trip precision (``max_digits10``), so
every weight reads back bit for bit as the float32 the router produced. (Logs written before
this used ``%.7g``, which is close but not exact for about half of all float32 values.)"""

SPELLING: dict[str, str] = {
    "type": '"route"',
    "req_id": "%s",  # the id as JSON text (json.dumps): its quotes and escapes included
    "token_idx": "%d",
    "layer": "%d",  # a column, or a constant written in by route_template
    "topk_ids": "[%d]",  # "[...]": a list of top_k values, comma-separated
    "topk_weights": f"[{WEIGHT_FORMAT}]",
    "phase": '"%s"',  # a name from schema.PHASES
    "step": "%d",  # the engine step (forward pass) number
}
"""How the hook writes each field's value: JSON text, with a %-spec where each line has its own
value (:func:`format_routes` fills it from the field's column)."""

if set(SPELLING) != set(FIELDS):
    raise RuntimeError(f"moeprof.layout: SPELLING must cover exactly the route fields {FIELDS}")

_PREFILL, _DECODE = PHASES  # the phases a formatted row can be in, by its prefill flag
_PHASE_BY_FLAG = np.array([_DECODE, _PREFILL], dtype=object)
"""A row's phase name by its prefill flag: the same two str objects for every row (cheaper
than a fresh str per row from a numpy string array)."""
_KEY_OR_SPEC = re.compile(r'"(\w+)":|%[.\d]*[dgs]')


def _value(field: str, top_k: int) -> str:
    text = SPELLING[field]
    if text.startswith("["):
        return "[" + ",".join([text[1:-1]] * top_k) + "]"
    return text


def route_template(layer: int | None, top_k: int, *, omit: Collection[str] = ()) -> str:
    """One route line as a %-format: ids as ints, weights in round-trip float32 (9 digits).

    ``layer`` None leaves a ``%d`` in its place, filled per row from :func:`format_routes`'s
    ``layer`` column (the hook logs several layers through one template); an int is written in
    as a constant. ``omit`` leaves out optional fields (older logs, lines of other writers).
    """
    parts = []
    for field in FIELDS:
        if field in omit:
            if RouteRecord.model_fields[field].is_required():
                raise ValueError(f"{field} is a required route field")
            continue
        value = f"{layer:d}" if field == "layer" and layer is not None else _value(field, top_k)
        parts.append(f'"{field}":{value}')
    return "{" + ",".join(parts) + "}\n"


@functools.lru_cache(maxsize=64)
def _slots(template: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The field of each %-spec of a route template (the key before it), and the literal text
    before each spec and after the last."""
    fields: list[str] = []
    texts: list[str] = []
    key = ""
    at = 0
    for m in _KEY_OR_SPEC.finditer(template):
        if m.group(1) is not None:
            key = m.group(1)
        else:
            fields.append(key)
            texts.append(template[at : m.start()])
            at = m.end()
    texts.append(template[at:])
    return tuple(fields), tuple(texts)


@functools.lru_cache(maxsize=64)
def _cells(template: str) -> tuple[int, tuple[tuple[str, int, int], ...]]:
    """(cells per line, (field, first cell, end cell) for each field with values)."""
    fields = _slots(template)[0]
    runs: list[tuple[str, int, int]] = []
    for i, field in enumerate(fields):
        if runs and runs[-1][0] == field:
            runs[-1] = (field, runs[-1][1], i + 1)
        else:
            runs.append((field, i, i + 1))
    return len(fields), tuple(runs)


def format_routes_reference(
    template: str,
    req_json: Sequence[str] | np.ndarray,
    token_idx: np.ndarray,
    ids: np.ndarray,
    weights: np.ndarray,
    prefill: np.ndarray | None,
    *,
    layer: np.ndarray | None = None,
    step: np.ndarray | None = None,
) -> str:
    """:func:`format_routes` as one %-format call (about 1.5 us a route): the definition of the
    route text, which :func:`moeprof.route_text.route_bytes` reproduces byte for byte, and what
    it falls back to for input it does not handle."""
    n = ids.shape[0]
    if n == 0:
        return ""
    w64 = weights.astype(np.float64)
    finite = bool(np.isfinite(w64).all())
    if not finite:
        # Spell non-finite weights as Python's json does, so readers name the problem: each
        # weight as text, so that nothing else in the line (a request id "info") is touched.
        template = template.replace(WEIGHT_FORMAT, "%s")
        w64 = np.array([weight_text(v) for v in w64.ravel().tolist()], dtype=object)
        w64 = w64.reshape(weights.shape)
    phase = None if prefill is None else _PHASE_BY_FLAG[np.asarray(prefill, bool).view(np.uint8)]
    columns = {
        "req_id": req_json,
        "token_idx": token_idx,
        "layer": layer,
        "topk_ids": ids,
        "topk_weights": w64,
        "phase": phase,
        "step": step,
    }
    width, runs = _cells(template)
    cells = np.empty((n, width), dtype=object)
    for field, a, b in runs:
        column = columns[field]
        if column is None:
            name = "prefill" if field == "phase" else field
            raise ValueError(f"format_routes: the template has a {field} per row; pass {name}")
        if b - a == 1 and np.ndim(column) == 1:
            cells[:, a] = column
        else:
            cells[:, a:b] = column
    return (template * n) % tuple(cells.ravel().tolist())


_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def weight_text(value: float) -> str:
    """One weight as the hook writes it: ``WEIGHT_FORMAT``, and a non-finite value as Python's
    json spells it (``NaN``, ``Infinity``, ``-Infinity``)."""
    text = WEIGHT_FORMAT % value
    return _NON_FINITE.get(text, text)


def format_routes(
    template: str,
    req_json: Sequence[str] | np.ndarray,
    token_idx: np.ndarray,
    ids: np.ndarray,
    weights: np.ndarray,
    prefill: np.ndarray | None,
    *,
    layer: np.ndarray | None = None,
    step: np.ndarray | None = None,
) -> str:
    """Many rows of a :func:`route_template`, filled column by column
    (:func:`moeprof.route_text.route_bytes`; the same text as :func:`format_routes_reference`).
    ``req_json`` holds each row's request id as JSON text; ``prefill`` each row's phase (True:
    prefill), None for a template without a phase; ``layer`` and ``step`` each row's layer and
    engine step (ints), required where the template has a ``%d`` for them (ValueError names the
    missing column) and ignored where it has none."""
    from moeprof.route_text import route_bytes

    args = (template, req_json, token_idx, ids, weights, prefill)
    try:
        return route_bytes(*args, layer=layer, step=step).decode()
    except UnicodeEncodeError:  # an id that is not valid Unicode (a lone surrogate)
        return format_routes_reference(*args, layer=layer, step=step)


@dataclass(frozen=True)
class RouteLayout:
    """A route line as literal text around its values: what a parser of the layout expects."""

    fields: tuple[str, ...]
    """The field of each value, in line order (a list field once per value)."""
    texts: tuple[str, ...]
    """The literal text before each value, then the text after the last one."""

    def between(self, a: str | None, b: str | None) -> str:
        """The literal text from the end of a value of field ``a`` (None: the line's start) to
        the next value, of field ``b`` (None: the line's end, newline included). ValueError
        when no value of ``b`` directly follows one of ``a`` (the layout changed)."""
        for i in range(-1, len(self.fields)):
            here = self.fields[i] if i >= 0 else None
            after = self.fields[i + 1] if i + 1 < len(self.fields) else None
            if here == a and after == b:
                return self.texts[i + 1]
        raise ValueError(f"in the hook's route line, {b or 'the end'} does not follow {a}")


def route_layout(top_k: int, *, omit: Collection[str] = ()) -> RouteLayout:
    """:func:`route_template` (without a fixed layer) cut at its values."""
    fields, texts = _slots(route_template(None, top_k, omit=omit))
    return RouteLayout(fields, texts)
