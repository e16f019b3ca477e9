"""Route lines as bytes, many rows at a time, with numpy instead of a %-format per value.

:func:`route_bytes` returns exactly the bytes of :func:`moeprof.layout.format_routes_reference`
(the %-format of :func:`moeprof.layout.route_template`, encoded as UTF-8) for every input, a few
times cheaper per route on chunks of a few hundred routes or more. How:

- The lines are laid out in a ``(n, W)`` matrix of 4-byte words: the template's literal text
  at fixed words, each value in a fixed number of words, unused bytes 0. The lines are the
  matrix's nonzero bytes in order (``bytes.translate`` drops the zeros). JSON text never holds a
  raw NUL byte (``json.dumps`` escapes it); a request id that holds one is written by the
  reference.
- An integer (``%d``, not negative) is written as groups of four digits, each group a word
  from a table (leading zeros of the number left 0).
- A weight (``%.9g`` of the float32 value) with magnitude in ``[FAST_MIN, FAST_MAX)``: its
  decimal exponent ``e`` from ``log10``, then ``y = |w| * 10**(8 - e)`` in float64. The float32
  value times an exact power of ten is rounded once, so ``y`` (below ``2**30``) is within
  ``2**-24`` of the exact product; where ``y`` is at least ``TIE_MARGIN`` away from a rounding
  tie, ``rint(y)`` is the correctly rounded 9-digit mantissa that ``%.9g`` prints. (An exponent
  one off, next to a power of ten, is corrected first; there both exponents give the same
  text.) The mantissa's digits come from tables (trailing zeros dropped) between a prefix
  (``-``, ``0.000``) and a suffix (``e-05``) chosen by sign and exponent. Every other weight
  (zeros, near-ties, outside the range, float64 values that are not float32 values, and
  non-finite ones, spelled ``NaN``/``Infinity``/``-Infinity``) is formatted by Python one by
  one (:func:`moeprof.layout.weight_text`).
- A chunk with a negative integer, a template this module does not know, or columns of
  unexpected types is written by the reference as a whole.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Sequence

import numpy as np

from moeprof.layout import (
    _PHASE_BY_FLAG,
    WEIGHT_FORMAT,
    _slots,
    format_routes_reference,
    weight_text,
)

_SPEC_RE = re.compile(r'"(\w+)":|(%[.\d]*[dgs])')
_INT_FIELDS = frozenset(("token_idx", "layer", "topk_ids", "step"))
_SPEC_OF = {
    "req_id": "%s",
    "phase": "%s",
    "token_idx": "%d",
    "layer": "%d",
    "topk_ids": "%d",
    "step": "%d",
    "topk_weights": WEIGHT_FORMAT,
}

FAST_MIN, FAST_MAX = np.float32(1.1e-9), np.float32(9.99)
"""Weights with magnitude in this range are formatted by numpy (decimal exponents -9 to 0)."""
TIE_MARGIN = 1e-6
"""How far from a rounding tie the float64 ``y`` must be for ``rint`` to be trusted; its error
is at most ``2**-24``."""
WEIGHT_WORDS = 6
"""Words of a weight's slot: prefix (2), first digit and dot (1), 4 + 4 digits (2), suffix (1).
Python's spelling of any float (at most 15 bytes) fits too."""
_P10 = np.array([10.0**k for k in range(20)])  # exact in float64 up to 10**22


def _words(texts: list[bytes]) -> np.ndarray:
    """Texts of at most 4 bytes as little-endian uint32 words (byte 0 first), NUL-padded."""
    return np.array(texts, dtype="S4").view("<u4").astype(np.uint32)


_DIGITS4 = [f"{v:04d}" for v in range(10_000)]
_INT_WORD = np.concatenate(
    [
        _words([s.lstrip("0").encode() for s in _DIGITS4]),  # a leading group: 0 is empty
        _words([(s.lstrip("0") or "0").encode() for s in _DIGITS4]),  # the only group
        _words([s.encode() for s in _DIGITS4]),  # a group below a nonzero one
    ]
)
"""Four decimal digits of an integer, by ``group + 10_000 * kind`` (see :func:`_int_words`)."""
_FRACTION_WORD = np.concatenate(
    [_words([s.encode() for s in _DIGITS4]), _words([s.rstrip("0").encode() for s in _DIGITS4])]
)
"""Four digits of a mantissa, by ``group + 10_000 * (nothing nonzero follows)``: trailing
zeros dropped in the second half."""


def _prefix_words() -> np.ndarray:
    """A weight's first 8 bytes by ``sign * 10 + e + 9``: ``-`` or nothing, then ``0.`` and the
    zeros before the first digit in fixed form (-4 <= e < 0)."""
    out = []
    for sign in ("", "-"):
        for e in range(-9, 1):
            text = sign + ("0." + "0" * (-e - 1) if -4 <= e < 0 else "")
            out.append(text.encode().ljust(8, b"\0"))
    return np.array(out, dtype="S8").view("<u8").astype(np.uint64)


_PREFIX = _prefix_words()
_SUFFIX = _words([(f"e-0{-e}" if e < -4 else "").encode() for e in range(-9, 1)])
"""A weight's last word by ``e + 9``: the exponent in exponential form."""
_PHASE_WORDS = np.array([s.encode() for s in _PHASE_BY_FLAG.tolist()], dtype="S8")
_PHASE_WORDS = _PHASE_WORDS.view("<u8").astype(np.uint64)
"""A phase's name (2 words) by prefill flag."""
_DOT = np.uint32(ord(".") << 8)
_INT64_MAX = np.iinfo(np.int64).max
BLOCK_ROUTES = 4096
"""Routes formatted together at most (more are formatted block by block): bounds the memory of
the temporaries (about 1.5 KiB a route)."""


@functools.lru_cache(maxsize=64)
def _plan(template: str) -> tuple[tuple[str, ...], tuple[bytes, ...]] | None:
    """The field of each value slot and the literal bytes around them, or None when the
    template holds a spec this module does not write (the reference writes it then)."""
    if sys.byteorder != "little":  # the word tables and the arithmetic on them assume it
        return None
    fields, texts = _slots(template)
    specs = [m.group(2) for m in _SPEC_RE.finditer(template) if m.group(2) is not None]
    if len(specs) != len(fields):
        return None
    if any(_SPEC_OF.get(f) != s for f, s in zip(fields, specs, strict=True)):
        return None
    raw = tuple(t.encode() for t in texts)
    if "%" in "".join(texts) or any(b"\0" in t for t in raw):
        return None
    return fields, raw


def _int_words(values: np.ndarray) -> np.ndarray:
    """Non-negative int64 ``(n, c)`` as ``(n, c, groups)`` words of four digits each, most
    significant first; a number's leading zeros (and groups) are 0 bytes."""
    top = int(values.max())
    u = values.astype(np.uint32) if top < 1 << 32 else values.view(np.uint64)
    groups = (len(str(top)) + 3) // 4
    out = np.empty((*u.shape, groups), np.uint32)
    ten4 = u.dtype.type(10_000)
    rest = u
    for j in range(groups):  # j: the group from the right
        q = rest // ten4
        index = (rest - q * ten4).astype(np.uint32)
        if j == 0:
            index += 10_000
        if j + 1 < groups:
            # digits to the left: this group keeps its leading zeros
            index += (q != 0).astype(np.uint32) * np.uint32(20_000 - 10_000 * (j == 0))
        out[..., groups - 1 - j] = _INT_WORD[index]
        rest = q
    return out


def _weight_words(flat: np.ndarray) -> np.ndarray:
    """Finite weights (1-d, float32 or float64) as ``(m, WEIGHT_WORDS)`` words of
    ``'%.9g' % float(w)``, unused bytes 0."""
    m = flat.size
    if flat.dtype == np.float32:
        w32 = flat
        fast = np.abs(w32) >= FAST_MIN
        x = np.abs(w32.astype(np.float64))
    else:
        with np.errstate(over="ignore"):
            w32 = flat.astype(np.float32)
        x = np.abs(flat)
        fast = (w32.astype(np.float64) == flat) & (x >= FAST_MIN)  # float32 values only
    fast &= x < FAST_MAX
    if not fast.all():
        x[~fast] = 1.0  # a harmless stand-in, formatted by Python below
    e = np.floor(np.log10(x)).astype(np.intp)
    y = x * _P10[8 - e]
    off = np.flatnonzero((y < 1e8) | (y >= 1e9))  # log10 one off, next to a power of ten
    if off.size:
        e[off] += np.where(y[off] >= 1e9, 1, -1)
        y[off] = x[off] * _P10[8 - e[off]]
    d = np.rint(y)
    fast &= np.abs(y - np.floor(y) - 0.5) >= TIE_MARGIN  # near a tie: Python decides
    carry = d == 1e9  # rounded up to the next power of ten
    if carry.any():
        d[carry] = 1e8
        e += carry
    du = d.astype(np.uint32)
    first = du // np.uint32(100_000_000)
    low8 = du - first * np.uint32(100_000_000)
    mid = low8 // np.uint32(10_000)
    low = low8 - mid * np.uint32(10_000)
    out = np.empty((m, WEIGHT_WORDS), np.uint32)
    at = e + 9
    sign = (w32.view(np.uint32) >> np.uint32(31)).astype(np.intp)
    out.view(np.uint64)[:, 0] = _PREFIX[sign * 10 + at]
    # the dot after the first digit: in exponential form and for e = 0, when digits follow
    dot = ((e == 0) | (e < -4)) & (low8 != 0)
    out[:, 2] = first + np.uint32(ord("0")) + dot * _DOT
    out[:, 3] = _FRACTION_WORD[mid + (low == 0) * np.uint32(10_000)]
    out[:, 4] = _FRACTION_WORD[low + np.uint32(10_000)]
    out[:, 5] = _SUFFIX[at]
    slow = np.flatnonzero(~fast)
    if slow.size:
        texts = [weight_text(v).encode() for v in flat[slow].astype(np.float64).tolist()]
        spelled = np.array(texts, dtype=f"S{4 * WEIGHT_WORDS}").view("<u4")
        out[slow] = spelled.reshape(slow.size, WEIGHT_WORDS)
    return out


def _req_words(req_json: Sequence[str] | np.ndarray, n: int) -> np.ndarray | None:
    """Request ids as ``(n, words)`` (UTF-8, NUL-padded), or None when one holds a NUL (a
    bytes array is taken as it is: NUL-free JSON text)."""
    if isinstance(req_json, np.ndarray) and req_json.dtype.kind == "S":
        arr = req_json
    else:
        items = req_json.tolist() if isinstance(req_json, np.ndarray) else list(req_json)
        if len(items) != n or not all(type(s) is str for s in items) or "\0" in "".join(items):
            return None
        try:
            arr = np.array(items, dtype="S")
        except UnicodeEncodeError:
            try:
                arr = np.array([s.encode() for s in items], dtype="S")
            except UnicodeEncodeError:  # a lone surrogate: the reference raises too
                return None
    if arr.shape != (n,):
        return None
    size = -(-max(arr.dtype.itemsize, 1) // 4) * 4
    return arr.astype(f"S{size}").view("<u4").reshape(n, size // 4)


def route_bytes(
    template: str,
    req_json: Sequence[str] | np.ndarray,
    token_idx: np.ndarray,
    ids: np.ndarray,
    weights: np.ndarray,
    prefill: np.ndarray | None,
    *,
    layer: np.ndarray | None = None,
    step: np.ndarray | None = None,
) -> bytes:
    """The bytes of :func:`moeprof.layout.format_routes_reference` (same arguments, UTF-8),
    computed column-wise. ``req_json`` may also be a numpy bytes (``S``) array of the ids'
    JSON text, the sink's form (no per-row encoding)."""
    n = ids.shape[0]
    if n == 0:
        return b""
    if n > BLOCK_ROUTES:
        blocks = []
        for a in range(0, n, BLOCK_ROUTES):
            rows = slice(a, a + BLOCK_ROUTES)
            flag, lay, st = (None if c is None else c[rows] for c in (prefill, layer, step))
            cols = (req_json[rows], token_idx[rows], ids[rows], weights[rows])
            blocks.append(route_bytes(template, *cols, flag, layer=lay, step=st))
        return b"".join(blocks)
    columns = {
        "req_id": req_json,
        "token_idx": token_idx,
        "layer": layer,
        "topk_ids": ids,
        "topk_weights": weights,
        "phase": prefill,
        "step": step,
    }
    plan = _plan(template)
    words = None
    if plan is not None:
        for field in dict.fromkeys(plan[0]):
            if columns[field] is None:
                name = "prefill" if field == "phase" else field
                raise ValueError(f"format_routes: the template has a {field} per row; pass {name}")
        words = _line_words(plan, columns, n)
    if words is None:
        if isinstance(req_json, np.ndarray) and req_json.dtype.kind == "S":
            req_json = [s.decode() for s in req_json.tolist()]  # the reference's form: str
        text = format_routes_reference(
            template, req_json, token_idx, ids, weights, prefill, layer=layer, step=step
        )
        return text.encode()
    raw = words.tobytes()
    return raw.translate(None, b"\0")


def _line_words(
    plan: tuple[tuple[str, ...], tuple[bytes, ...]], columns: dict[str, object], n: int
) -> np.ndarray | None:
    """The ``(n, W)`` words of the lines, or None where the reference must write them."""
    fields = plan[0]
    values: dict[str, np.ndarray] = {}  # per field: (n, slots of the field, words of a slot)
    int_fields = [f for f in dict.fromkeys(fields) if f in _INT_FIELDS]
    if int_fields:
        ints, groups = [], []
        for field in int_fields:
            col = np.asarray(columns[field]).reshape(n, -1)
            if col.dtype.kind not in "iu":
                return None
            top = int(col.max())
            if top > _INT64_MAX or (col.dtype.kind == "i" and col.min() < 0):
                return None  # a negative number: the reference writes the chunk
            ints.append(col.astype(np.int64, copy=False))
            groups.append((len(str(top)) + 3) // 4)
        words = _int_words(np.concatenate(ints, axis=1))
        at = 0
        for field, col, g in zip(int_fields, ints, groups, strict=True):
            # a field's own groups: those to the left are 0 for all its values
            values[field] = words[:, at : at + col.shape[1], words.shape[2] - g :]
            at += col.shape[1]
    for field in dict.fromkeys(fields):
        column = columns[field]
        if field in _INT_FIELDS:
            continue
        if field == "topk_weights":
            col = np.asarray(column)
            if col.dtype.kind != "f":
                return None
            flat = col.reshape(-1)
            if flat.dtype != np.float32:
                flat = flat.astype(np.float64)
            words = _weight_words(flat).reshape(n, -1, WEIGHT_WORDS)
        elif field == "req_id":
            req = _req_words(column, n)  # type: ignore[arg-type]
            words = None if req is None else req[:, None, :]
        else:  # phase
            flag = np.asarray(column, bool).reshape(n).view(np.uint8)
            words = _PHASE_WORDS[flag].view(np.uint32).reshape(n, 1, 2)
        if words is None:
            return None
        values[field] = words
    row, runs = _row(plan, tuple(values[f].shape[2] for f in fields))
    out = np.empty((n, row.size), np.uint32)
    out[:] = row
    for field, start, count, stride in runs:
        view = out[:, start : start + count * stride].reshape(n, count, stride)
        view[:, :, : values[field].shape[2]] = values[field]
    return out


@functools.lru_cache(maxsize=256)
def _row(
    plan: tuple[tuple[str, ...], tuple[bytes, ...]], widths: tuple[int, ...]
) -> tuple[np.ndarray, tuple[tuple[str, int, int, int], ...]]:
    """One line's words with the values' slots left 0 (slot ``i`` ``widths[i]`` words wide),
    the literal texts NUL-padded to whole words; and per run of a field's slots: (field, first
    word, slots, words from slot to slot)."""
    fields, texts = plan

    def padded(text: bytes) -> bytes:
        return text.ljust(-(-len(text) // 4) * 4, b"\0")

    row = bytearray(padded(texts[0]))
    starts = []
    for i, width in enumerate(widths):
        starts.append(len(row) // 4)
        row += bytes(4 * width) + padded(texts[i + 1])
    runs: list[tuple[str, int, int, int]] = []
    i = 0
    while i < len(fields):
        j = i + 1  # a run: slots of one field with the same text between each two
        while j < len(fields) and fields[j] == fields[i] and texts[j] == texts[i + 1]:
            j += 1
        stride = starts[i + 1] - starts[i] if j > i + 1 else widths[i]
        runs.append((fields[i], starts[i], j - i, stride))
        i = j
    words = np.frombuffer(bytes(row), "<u4").astype(np.uint32)
    return words, tuple(runs)
