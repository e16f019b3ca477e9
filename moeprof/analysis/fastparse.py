"""Vectorized parsing of route lines in the hook's exact byte layout, with no Python object per
record.

Why: msgspec decodes a route in ~300 ns, but turning its records into numpy columns (one Python
int or float per id and weight, then freeing them) costs as much again, which kept ``validate``
and ``analyze`` under a million routes a second. The hook writes every line from one template
(:mod:`moeprof.layout`: one line, no spaces; ``phase`` and ``step`` may be absent, as in older
logs), so a block of such lines is parsed field by field for all lines at once. The literal
bytes expected between the values are taken from that same layout. Each step reads the 8 bytes
at every line's cursor as one uint64 (or a 48-byte row where a literal part of the template
starts) and reads them with SIMD-within-a-register arithmetic: the length of a digit run, its
value, the byte that ends it. Every byte of an accepted line is checked: literal bytes against
the template, numbers against JSON's number grammar, the request id as printable ASCII without
quotes or backslashes, and the line must end exactly at its newline.

The rule that keeps this honest: a line is accepted only if it is valid JSON that the pydantic
schema accepts, and every value equals what msgspec (and pydantic) produce. Integers have at
most 7 digits (a step at most 15), so they need no overflow care. A weight is read as an integer
V that a double holds exactly (its digits without the dot: below 10**15, or, padded with zeros
to 16 digits, an even number below 2**54) times 10**E with E in [-22, 22], also exact; so
``V * 10**E`` or ``V / 10**-E`` is one IEEE operation and gives the correctly rounded double
(Clinger's fast path), which is what any correct parser returns. The reader narrows it to
float32 exactly as it narrows msgspec's double. Anything else (other key orders, spaces, escapes
or non-ASCII in the request id, NaN, long or tiny numbers, ids out of range or repeated, layers
not logged) only marks the line as not parsed here; the caller hands those lines to the msgspec
path, and pydantic below it.

Cursors only ever move forward by bounded steps (a digit run reads at most 16 bytes), so with
:meth:`BlockParser.pad` readable bytes after a block no read leaves the buffer, even on lines of
garbage.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from moeprof import layout, schema

ROW = 48
"""Bytes read at once where a literal part of the template starts."""
MAX_RID_WORDS = 16
"""Request ids of more than 8 * this bytes are left to the fallback."""
MAX_LAYER_VARIANTS = 8
"""Up to this many logged layers, ``"layer":N`` is matched as part of a literal."""

_U = np.uint64
_HIGH = _U(0x8080808080808080)
_LOW7 = _U(0x7F7F7F7F7F7F7F7F)
_ZEROS = _U(0x3030303030303030)  # b"00000000"
_ADD9 = _U(0x7676767676767676)  # (b & 0x7f) + 0x76 has the high bit iff b & 0x7f > 9
_ONES = _U(0x0101010101010101)
_ADD20 = _U(0x6060606060606060)  # (b & 0x7f) + 0x60 has the high bit iff b & 0x7f >= 0x20
_QUOTES = _U(0x2222222222222222)
_BACKSLASHES = _U(0x5C5C5C5C5C5C5C5C)
_PAIRS = _U(0x000000FF000000FF)
_MUL1 = _U(100 + (1000000 << 32))
_MUL2 = _U(1 + (10000 << 32))
_LOW_BYTE = _U(0xFF)
_TOP_BYTE = _U(0xFF << 56)

_POW10_INT = np.array([10**i for i in range(17)], np.uint64)
_POW10_FLOAT = np.array([10.0**i for i in range(23)], np.float64)  # all exact
_MAX_MANTISSA_DIGITS = 15  # 10**15 < 2**53
_MAX_EXP10 = 22  # 10**22 is the largest exact power of ten


def _layout_literals() -> tuple[bytes, bytes, bytes, bytes, bytes, tuple[tuple[bytes, int], ...]]:
    """The literal bytes of the hook's route line between the values this parser reads, in the
    order it reads them: (head, token, layer, ids, weights, phases). A request id is a JSON
    string, so its quotes end the literals around it. The phases follow a line's weights: one
    per phase, with the phase's code, and one without a phase (``NO_PHASE``), shortest first;
    each ends where the line's step (:data:`_STEP`) or its end (:data:`_END`) starts. A
    ValueError (or RuntimeError) here means the layout gained or moved a field: teach
    :meth:`BlockParser.parse` to read it."""
    line = layout.route_layout(1)
    return (
        (line.between(None, "req_id") + '"').encode(),
        ('"' + line.between("req_id", "token_idx")).encode(),
        line.between("token_idx", "layer").encode(),
        line.between("layer", "topk_ids").encode(),
        line.between("topk_ids", "topk_weights").encode(),
        tuple((text.encode(), code) for text, code in sorted(_phase_texts(), key=_length)),
    )


def _phase_texts() -> list[tuple[str, int]]:
    """Each phase's text after a line's weights, with its code (``NO_PHASE``: no phase): up to
    where lines with a step and lines without one part. The rest of a line must then be
    :data:`_STEP`, the step's digits and :data:`_END`, or :data:`_END` alone, whatever the
    phase."""
    out = []
    for code, name in [*enumerate(schema.PHASES), (schema.NO_PHASE, None)]:
        omit = () if name is not None else ("phase",)
        with_step = _after_weights(layout.route_layout(1, omit=omit), name, "step")
        without = _after_weights(layout.route_layout(1, omit=(*omit, "step")), name, None)
        i = 0
        while with_step[i : i + 1] == without[i : i + 1] != "":
            i += 1
        rest = (with_step[i:], without[i:], layout.route_layout(1).between("step", None))
        if rest != (_STEP.decode(), _END.decode(), _END.decode()):
            raise RuntimeError(f"moeprof.analysis.fastparse: unexpected route line end {rest}")
        out.append((with_step[:i], code))
    return out


def _length(text_code: tuple[str, int]) -> int:
    return len(text_code[0])


def _after_weights(line: layout.RouteLayout, phase: str | None, then: str | None) -> str:
    """The literal text of ``line`` from its last weight to field ``then`` (None: the end),
    with the value ``phase`` in between when not None."""
    if phase is None:
        return line.between("topk_weights", then)
    return line.between("topk_weights", "phase") + phase + line.between("phase", then)


_STEP = b',"step":'
"""The literal before a line's step, after its phase (or weights): read as one word."""
_END = b"}\n"
"""The literal after a line's last value."""
_HEAD, _TOKEN, _LAYER, _IDS, _WEIGHTS, _PHASES = _layout_literals()
RID_OFFSET = len(_HEAD)
"""Where a line's request id starts."""

_COMMA, _QUOTE, _DOT, _MINUS, _PLUS = (_U(c) for c in b',".-+')  # JSON's punctuation
_TOKEN_END = _U(_LAYER[0])  # the byte after token_idx
_IDS_END = _U(_WEIGHTS[0])  # the byte after the last id
_WEIGHTS_END = _U(_PHASES[0][0][0])  # the byte after the last weight
_STEP_END = _U(_END[0])  # the byte after the step
if any(text[0] != _PHASES[0][0][0] for text, _ in _PHASES):
    raise RuntimeError("moeprof.analysis.fastparse: route line tails must start alike")
if len(_STEP) != 8 or len(_END) != 2:
    raise RuntimeError("moeprof.analysis.fastparse: the step part is read as one word")


# --------------------------------------------------------------------------- SWAR helpers


def _flags_nondigit(x: np.ndarray) -> np.ndarray:
    """High bit of each byte of ``x`` (bytes already XOR b"0") set where it is not a digit."""
    return (((x & _LOW7) + _ADD9) | x) & _HIGH


def _flags_zero(x: np.ndarray) -> np.ndarray:
    """High bit of each byte set exactly where the byte is zero (no false positives)."""
    return ~(((x & _LOW7) + _LOW7) | x) & _HIGH


def _count_below(flags: np.ndarray) -> np.ndarray:
    """Bytes below the lowest flagged one (8 when none is flagged), as uint64."""
    below = (flags - _U(1)) & ~flags
    return (((below & _HIGH) >> _U(7)) * _ONES) >> _U(56)


def _digits_value(x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The decimal value of the low ``n`` bytes of ``x`` (digit values 0-9, first digit lowest):
    right-align them (zeros in front are leading zeros), then Lemire's 8-digit SWAR sum."""
    y = x << ((_U(8) - n) << _U(3))
    y = y * _U(10) + (y >> _U(8))
    return (((y & _PAIRS) * _MUL1) + (((y >> _U(16)) & _PAIRS) * _MUL2)) >> _U(32)


def _byte_at(w: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Byte ``n`` (0-7; 8 gives 0) of each word."""
    return (w >> (n << _U(3))) & _LOW_BYTE


@functools.cache
def _word(lit: bytes) -> tuple[np.uint64, np.uint64]:
    """(little-endian value, mask) of up to 8 literal bytes."""
    return _U(int.from_bytes(lit.ljust(8, b"\0"), "little")), _U((1 << (8 * len(lit))) - 1)


def _int(x: np.ndarray) -> np.ndarray:
    return x.view(np.int64)


# --------------------------------------------------------------------------- buffers


def word_view(buf: bytearray | np.ndarray) -> np.ndarray:
    """``out[i]`` is bytes ``i..i+7`` of ``buf`` as a little-endian uint64 (an unaligned view)."""
    return np.ndarray((len(buf) - 7,), np.dtype("<u8"), buffer=buf, strides=(1,))


def row_view(buf: bytearray | np.ndarray) -> np.ndarray:
    """``out[i]`` is bytes ``i..i+ROW-1`` of ``buf`` as one ``ROW``-byte item (a strided view,
    copied when indexed: numpy copies such items a third faster than rows of a 2-d uint8
    view)."""
    return np.ndarray((len(buf) - ROW + 1,), _ROW_ITEM, buffer=buf, strides=(1,))


_ROW_ITEM = np.dtype((np.void, ROW))


def line_bounds(a: np.ndarray, start: int, end: int, scratch: np.ndarray) -> np.ndarray:
    """Offsets of the newlines in ``a[start:end]`` (relative to ``a``). ``scratch`` is a bool
    buffer of at least ``end - start + 64`` bytes.

    ``flatnonzero`` over megabytes costs more than finding the newlines: packing the comparison
    to one bit a byte and looking at 64 bytes at a time first is cheaper (lines are longer than
    64 bytes; when two newlines share a word, the plain way is taken).
    """
    m = end - start
    m64 = (m + 63) & ~63
    eq = scratch[:m64]
    np.equal(a[start:end], 10, out=eq[:m])
    eq[m:m64] = False
    bits = np.packbits(eq, bitorder="little").view(np.uint64)
    at = np.flatnonzero(bits)
    w = bits[at]
    if ((w & (w - _U(1))) != _U(0)).any():
        return np.flatnonzero(eq[:m]) + start
    bit = (w.astype(np.float64).view(np.int64) >> 52) - 1023  # single bits: exact powers of 2
    return (at << 6) + bit + start


class _Rows:
    """A block of ``ROW``-byte rows as uint64 words, read at constant byte offsets."""

    def __init__(self, rows: np.ndarray, pos: np.ndarray) -> None:
        self.w = rows[pos].view(np.uint64).reshape(pos.size, ROW // 8)

    def word(self, off: int) -> np.ndarray:
        """Bytes ``off..off+7`` of every row."""
        c, s = divmod(off, 8)
        if s == 0:
            return self.w[:, c]
        return (self.w[:, c] >> _U(8 * s)) | (self.w[:, c + 1] << _U(64 - 8 * s))

    def literal(self, lit: bytes, off: int = 0) -> np.ndarray:
        """Rows holding ``lit`` at byte ``off``."""
        ok: np.ndarray | None = None
        for i in range(0, len(lit), 8):
            expect, mask = _word(lit[i : i + 8])
            w = self.word(off + i)
            eq = (w if len(lit) - i >= 8 else w & mask) == expect
            ok = eq if ok is None else ok & eq
        assert ok is not None
        return ok


# --------------------------------------------------------------------------- parsing


@dataclass
class Parsed:
    """Columns of a block of lines; rows where ``ok`` is False hold garbage."""

    ok: np.ndarray
    ids: np.ndarray
    """(k, n) int64."""
    weights: np.ndarray
    """(k, n) float64, as a correct parser reads them (the caller narrows to float32)."""
    token_idx: np.ndarray
    layer: np.ndarray
    phase: np.ndarray
    step: np.ndarray
    """int64, ``schema.NO_STEP`` where a line has no step."""
    rid_first: np.ndarray
    """Row of the first line of each distinct request id, in order of first appearance."""
    rid_inverse: np.ndarray
    """Index into ``rid_first`` for each row."""
    rid_len: np.ndarray
    """Request id length in bytes for each row (its text starts at line start + RID_OFFSET)."""


class BlockParser:
    """Parses blocks of route lines for one log's ``top_k``, ``layers_logged``, ``num_experts``.

    :meth:`parse` returns None when the block is not worth it (most lines are not in the
    template, or a request id hash collided), so the caller falls back for the whole block.
    It reads the fields of every line in the layout's order, one step per field: each step
    starts at the lines' cursors, returns the values and the cursors after them, and clears
    ``ok`` for the lines where the field is not as the hook writes it (their values are garbage).
    """

    def __init__(self, top_k: int, layers: list[int], num_experts: int | None) -> None:
        self.k = top_k
        self.layers = np.asarray(sorted(layers), np.int64)
        self.num_experts = num_experts
        self._id_ends = np.full((top_k, 1), _COMMA ^ _U(0x30), np.uint64)
        self._id_ends[-1] = _IDS_END ^ _U(0x30)
        self.pad = 512 + 64 * top_k + 8 * MAX_RID_WORDS
        """Readable bytes needed after a block's end (see the module docstring)."""
        self._layer_lits: list[tuple[int, bytes]] | None = None
        """Per logged layer, the literal from the comma before ``layer`` to the first id."""
        if len(layers) <= MAX_LAYER_VARIANTS and max(layers) < 10**9:
            self._layer_lits = [(lay, _LAYER + b"%d" % lay + _IDS) for lay in sorted(layers)]

    def parse(
        self,
        words: np.ndarray,
        rows: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
    ) -> Parsed | None:
        """The lines at ``starts`` ending with a newline at ``ends``, read through
        :func:`word_view` and :func:`row_view` of one buffer."""
        head = _Rows(rows, starts)
        ok = head.literal(_HEAD)
        if np.count_nonzero(ok) < starts.size // 2:
            return None
        rid_len, cur, rid_words = self._request_ids(words, head, starts, ok)
        token_idx, cur = self._token_idx(rows, cur, ok)
        layer, cur, first_id = self._layer(rows, cur, ok)
        ids, cur = self._ids(words, cur, first_id, ok)
        weights, cur = self._weights(words, rows, cur, ok)
        phase, step = self._tail(words, rows, cur, ends, ok)
        ok &= schema.ids_valid(ids.T, self.num_experts)
        rid = _group_rids(rid_words, ok)
        if rid is None:
            return None
        return Parsed(
            ok=ok,
            ids=ids,
            weights=weights,
            token_idx=token_idx,
            layer=layer,
            phase=phase,
            step=step,
            rid_first=rid[0],
            rid_inverse=rid[1],
            rid_len=rid_len,
        )

    def _request_ids(
        self, words: np.ndarray, head: _Rows, starts: np.ndarray, ok: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Each line's request id: its length, the position of its closing quote, and its
        bytes as words with zeros past the end."""
        rid_at = starts + RID_OFFSET
        n = starts.size
        length = np.zeros(n, np.int64)
        open_ = np.ones(n, bool)
        parts: list[np.ndarray] = []
        for j in range(MAX_RID_WORDS):
            off = RID_OFFSET + 8 * j
            w = head.word(off) if off + 8 <= ROW else words[rid_at + 8 * j]
            stop = (
                (w & _HIGH)  # not ASCII
                | (~((w & _LOW7) + _ADD20) & _HIGH)  # control character
                | (((w & _LOW7) + _ONES) & _HIGH)  # DEL
                | _flags_zero(w ^ _QUOTES)
                | _flags_zero(w ^ _BACKSLASHES)
            )
            c = _count_below(stop)
            ended = open_ & (c != _U(8))
            keep = (_U(1) << (c << _U(3))) - _U(1)  # the low c bytes (c == 8: all)
            parts.append(np.where(open_, w & keep, _U(0)))
            ok &= ~ended | (_byte_at(w, c) == _QUOTE)
            length += np.where(open_, _int(c), 0)
            open_ &= ~ended
            if not open_.any():
                break
        ok &= ~open_
        ok &= length != 0
        return length, rid_at + length, parts

    def _token_idx(
        self, rows: np.ndarray, quote: np.ndarray, ok: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """From the request id's closing quote: token_idx, and the position of the byte after
        it."""
        r = _Rows(rows, quote)
        ok &= r.literal(_TOKEN)
        token_idx, cur, good = _int_run(r.word(len(_TOKEN)), quote + len(_TOKEN), _TOKEN_END)
        ok &= good
        return token_idx, cur

    def _layer(
        self, rows: np.ndarray, cur: np.ndarray, ok: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """From the byte before ``layer`` to the first id: (layer, position of the first id, the
        first id's word if the row read here holds it)."""
        r = _Rows(rows, cur)
        if self._layer_lits is not None:
            return self._layer_as_literal(r, cur, ok)
        layer, cur = self._layer_as_number(rows, r, cur, ok)
        return layer, cur, None

    def _layer_as_literal(
        self, r: _Rows, cur: np.ndarray, ok: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """A few logged layers: each layer's whole literal up to the first id, compared."""
        assert self._layer_lits is not None
        n = cur.size
        layer = np.zeros(n, np.int64)
        at = np.zeros(n, np.int64)
        found = np.zeros(n, bool)
        sizes = set()
        for lay, lit in self._layer_lits:
            hit = r.literal(lit)
            layer[hit] = lay
            at[hit] = len(lit)
            found |= hit
            sizes.add(len(lit))
        ok &= found
        first = r.word(sizes.pop()) if len(sizes) == 1 else None
        return layer, cur + at, first

    def _layer_as_number(
        self, rows: np.ndarray, r: _Rows, cur: np.ndarray, ok: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Many logged layers: the number read, then looked up among them."""
        ok &= r.literal(_LAYER)
        layer, cur, good = _int_run(r.word(len(_LAYER)), cur + len(_LAYER), _U(_IDS[0]))
        ok &= good
        slot = np.minimum(np.searchsorted(self.layers, layer), self.layers.size - 1)
        ok &= self.layers[slot] == layer
        ok &= _Rows(rows, cur).literal(_IDS)
        return layer, cur + len(_IDS)

    def _ids(
        self, words: np.ndarray, cur: np.ndarray, first: np.ndarray | None, ok: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """top_k expert ids from ``cur`` (the first one's word ``first`` when already read):
        (k, n) int64 values, and the position of the byte after the last."""
        k, n = self.k, cur.size
        digits = np.empty((k, n), np.uint64)  # XOR b"0": digit values, then the end byte
        count = np.empty((k, n), np.uint64)
        for j in range(k):  # find each id's end; read their values below, all at once
            x = (first if j == 0 and first is not None else words[cur]) ^ _ZEROS
            digits[j] = x
            count[j] = c = _count_below(_flags_nondigit(x))
            cur = cur + _int(c) + 1
        ok &= np.logical_and.reduce(_int_checks(digits, count, self._id_ends), axis=0)
        return _int(_digits_value(digits, count)), cur - 1

    def _weights(
        self, words: np.ndarray, rows: np.ndarray, cur: np.ndarray, ok: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """From the byte after the last id: (k, n) float64 weights, and the position of the
        byte after the last."""
        k = self.k
        r = _Rows(rows, cur)
        ok &= r.literal(_WEIGHTS)
        cur = cur + len(_WEIGHTS)
        weights = np.empty((k, cur.size), np.float64)
        for j in range(k):
            if j == 0:
                lo, hi = r.word(len(_WEIGHTS)), r.word(len(_WEIGHTS) + 8)
            else:
                lo, hi = words[cur], words[cur + 8]
            end = _COMMA if j < k - 1 else _WEIGHTS_END
            weights[j], cur, good = _weight(words, lo, hi, cur, end)
            ok &= good
            cur = cur + 1
        return weights, cur - 1

    def _tail(
        self,
        words: np.ndarray,
        rows: np.ndarray,
        cur: np.ndarray,
        ends: np.ndarray,
        ok: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """From the byte after the last weight to the newline at ``ends``: the phase code and
        the step (``NO_STEP`` where the line has none)."""
        r = _Rows(rows, cur)
        n = cur.size
        phase = np.zeros(n, np.int8)
        at = np.zeros(n, np.int64)
        found = np.zeros(n, bool)
        for lit, code in _PHASES:  # shortest first: a longer one that matches wins
            hit = r.literal(lit)
            phase[hit] = code
            at[hit] = len(lit)
            found |= hit
        cur = cur + at
        w = words[cur]
        end_word, end_mask = _word(_END)
        ended = ((w & end_mask) == end_word) & (cur + (len(_END) - 1) == ends)
        stepped = w == _word(_STEP)[0]
        step = np.full(n, schema.NO_STEP, np.int64)
        if stepped.any():
            rows_ = None if stepped.all() else np.flatnonzero(stepped)
            at_step = cur + len(_STEP) if rows_ is None else cur[rows_] + len(_STEP)
            value, stop, good = _long_int_run(words, at_step, _STEP_END)
            good &= stop + (len(_END) - 1) == (ends if rows_ is None else ends[rows_])
            if rows_ is None:
                step, ended = value, good
            else:
                step[rows_] = value
                ended[rows_] = good
        ok &= found & ended
        return phase, step


def _int_run(
    w: np.ndarray, pos: np.ndarray, end: np.uint64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A JSON non-negative integer of 1-7 digits, whose bytes at ``pos`` are ``w``, followed
    by byte ``end``: (value as int64, position of the end byte, ok)."""
    x = w ^ _ZEROS
    n = _count_below(_flags_nondigit(x))
    return _int(_digits_value(x, n)), pos + _int(n), _int_checks(x, n, end ^ _U(0x30))


def _long_int_run(
    words: np.ndarray, pos: np.ndarray, end: np.uint64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_int_run` for 1-15 digits at ``pos``: a second word where the first is all
    digits (rare: a step number of 8 digits or more)."""
    x = words[pos] ^ _ZEROS
    n = _count_below(_flags_nondigit(x))
    value, cur = _int(_digits_value(x, n)), pos + _int(n)
    ok = _int_checks(x, n, end ^ _U(0x30))  # rejects n == 8: handled below
    long = np.flatnonzero(n == _U(8))
    if long.size:
        x1 = x[long]
        x2 = words[pos[long] + 8] ^ _ZEROS
        n2 = _count_below(_flags_nondigit(x2))
        v = _digits_value(x1, _U(8)) * _POW10_INT[_int(n2)] + _digits_value(x2, n2)
        value[long] = _int(v)
        cur[long] = pos[long] + 8 + _int(n2)
        # n2 == 8 reads 0, which is no end byte: at most 15 digits. No leading zero either.
        ok[long] = (_byte_at(x2, n2) == (end ^ _U(0x30))) & ((x1 & _U(0xF0FF)) != _U(0))
    return value, cur, ok


def _int_checks(x: np.ndarray, n: np.ndarray, end: np.ndarray | np.uint64) -> np.ndarray:
    """Whether the words ``x`` (XOR b"0") hold a JSON non-negative integer of ``n`` digits
    followed by ``end`` (XOR b"0")."""
    ok = _byte_at(x, n) == end  # n == 8 reads 0, which is no end byte: at most 7 digits
    ok &= n != _U(0)
    # A leading zero: "0" then a digit. (Then bytes ":" to "?" also count, but they are
    # never the end byte, so such a number is rejected anyway.)
    ok &= (x & _U(0xF0FF)) != _U(0)
    return ok


def _weight(
    words: np.ndarray, lo: np.ndarray, hi: np.ndarray, pos: np.ndarray, end: np.uint64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A JSON number at ``pos`` (whose 16 bytes are ``lo``, ``hi``) followed by byte ``end``:
    (float64 value, position of the end byte, ok).

    The common form is one digit, a dot and up to 14 more digits (the hook's weights below 10,
    in ``layout.WEIGHT_FORMAT``, or the mantissa of their exponent form). Dropping the dot
    leaves n <= 15 digits; read as 16 digits, zeros appended, they are V = M * 10**(16 - n)
    for the mantissa M, an even number below 10**16 < 2**54 and so an exact double, and the
    number is V / 10**15 (one rounding). That needs neither the digit count nor a shift per
    value. Other numbers (and exponents beyond the exact range) go to :func:`_weight_general`."""
    x, xh = lo ^ _ZEROS, hi ^ _ZEROS
    common = (x & _U(0xFF00)) == _U(0x1E00)  # byte 1 is "."
    m_lo = (x & _LOW_BYTE) | ((x >> _U(8)) & ~_LOW_BYTE) | (xh << _U(56))
    m_hi = (xh >> _U(8)) | _TOP_BYTE
    flags = _flags_nondigit(m_lo)
    below = (((flags - _U(1)) & ~flags & _HIGH) >> _U(7)) * _LOW_BYTE  # 0xff per digit byte
    n_lo = below & _ONES
    n_lo = (n_lo * _ONES) >> _U(56)
    full = _U(0) - (n_lo >> _U(3))  # all ones where the 8 bytes are all digits
    flags_hi = _flags_nondigit(m_hi)
    below_hi = (((flags_hi - _U(1)) & ~flags_hi & _HIGH) >> _U(7)) * _LOW_BYTE & full
    n_hi = ((below_hi & _ONES) * _ONES) >> _U(56)
    v = _lemire(m_lo & below) * _U(10**8) + _lemire(m_hi & below_hi)
    digits = _int(n_lo + n_hi)
    nxt = np.where(full != _U(0), _byte_at(m_hi, n_hi), _byte_at(m_lo, n_lo)) ^ _U(0x30)
    ok = common & (n_lo >= _U(2))  # a digit before and after the dot
    cur = pos + digits + 1
    value = v.astype(np.float64)
    has_exp = (nxt | _U(0x20)) == _U(ord("e"))
    if has_exp.any():
        rows = np.flatnonzero(has_exp)
        exp10, at, nxt[rows], e_ok = _exponent(words, cur[rows])
        cur[rows] = at
        exp10 -= 15
        e_ok &= (exp10 >= -_MAX_EXP10) & (exp10 <= _MAX_EXP10)
        common[rows] &= e_ok  # the rest are read again by _weight_general
        e = np.clip(exp10, -_MAX_EXP10, _MAX_EXP10)
        value[rows] = np.where(
            e < 0,
            value[rows] / _POW10_FLOAT[-np.minimum(e, 0)],
            value[rows] * _POW10_FLOAT[np.maximum(e, 0)],
        )
        value[np.flatnonzero(~has_exp)] /= _POW10_FLOAT[15]
    else:
        value /= _POW10_FLOAT[15]
    ok &= nxt == end
    if not common.all():
        rows = np.flatnonzero(~common)
        value[rows], cur[rows], ok[rows] = _weight_general(words, pos[rows], end)
    return value, cur, ok


def _lemire(y: np.ndarray) -> np.ndarray:
    """The value of 8 digit bytes (values 0-9, first digit lowest)."""
    y = y * _U(10) + (y >> _U(8))
    return (((y & _PAIRS) * _MUL1) + (((y >> _U(16)) & _PAIRS) * _MUL2)) >> _U(32)


def _exponent(
    words: np.ndarray, at: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``[eE][+-]?[0-9]{1,3}`` at ``at`` (the e): (exponent, position after it, the byte there,
    ok)."""
    at = at + 1
    w = words[at]
    sign = w & _LOW_BYTE
    signed = (sign == _PLUS) | (sign == _MINUS)
    w = np.where(signed, w >> _U(8), w)
    x = w ^ _ZEROS
    n = _count_below(_flags_nondigit(x))
    ok = (n != _U(0)) & (n <= _U(3))  # leading zeros are fine in exponents
    e = _int(_digits_value(x, n))
    return np.where(sign == _MINUS, -e, e), at + signed + _int(n), _byte_at(w, n), ok


def _scale(
    words: np.ndarray,
    mantissa: np.ndarray,
    exp10: np.ndarray,
    cur: np.ndarray,
    nxt: np.ndarray,
    ok: np.ndarray,
) -> np.ndarray:
    """``mantissa * 10**exp10`` after reading an optional exponent part at ``cur`` (which,
    with ``nxt``, the byte there, moves past it; ``ok`` is cleared where the number is bad or
    outside the exact range)."""
    has_exp = (nxt | _U(0x20)) == _U(ord("e"))
    if has_exp.any():
        rows = np.flatnonzero(has_exp)
        e, cur[rows], nxt[rows], e_ok = _exponent(words, cur[rows])
        exp10[rows] += e
        ok[rows] &= e_ok
    ok &= (exp10 >= -_MAX_EXP10) & (exp10 <= _MAX_EXP10)
    m = mantissa.astype(np.float64)
    e = np.clip(exp10, -_MAX_EXP10, _MAX_EXP10)
    return np.where(e < 0, m / _POW10_FLOAT[-np.minimum(e, 0)], m * _POW10_FLOAT[np.maximum(e, 0)])


def _weight_general(
    words: np.ndarray, pos: np.ndarray, end: np.uint64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Any JSON number: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? at ``pos``."""
    lo = words[pos]
    neg = (lo & _LOW_BYTE) == _MINUS
    w = np.where(neg, lo >> _U(8), lo)
    x = w ^ _ZEROS
    n_int = _count_below(_flags_nondigit(x))
    ok = (n_int != _U(0)) & (n_int != _U(8))
    ok &= ((w & _LOW_BYTE) != _U(0x30)) | (n_int == _U(1))
    mantissa = _digits_value(x, n_int)
    after_int = _byte_at(w, n_int)
    cur = pos + neg + _int(n_int)  # the byte after the integer part

    has_dot = after_int == _DOT
    f_lo, f_hi = words[cur + 1], words[cur + 9]
    xl, xh = f_lo ^ _ZEROS, f_hi ^ _ZEROS
    n_lo = _count_below(_flags_nondigit(xl))
    full = n_lo >> _U(3)  # 1 where all 8 bytes of f_lo are digits
    n_hi = _count_below(_flags_nondigit(xh)) * full
    n_frac = (n_lo + n_hi) * has_dot
    frac = _digits_value(xl, n_lo) * _POW10_INT[_int(n_hi)] + _digits_value(xh, n_hi)
    after_frac = np.where(full.astype(bool), _byte_at(f_hi, n_hi), _byte_at(f_lo, n_lo))
    ok &= ~has_dot | (n_frac != _U(0))
    ok &= n_int + n_frac <= _U(_MAX_MANTISSA_DIGITS)
    mantissa = np.where(has_dot, mantissa * _POW10_INT[_int(n_frac & _U(15))] + frac, mantissa)
    cur = cur + has_dot * (_int(n_frac) + 1)
    nxt = np.where(has_dot, after_frac, after_int)
    exp10 = -_int(n_frac)
    has_exp = (nxt | _U(0x20)) == _U(ord("e"))
    value = _scale(words, mantissa, exp10, cur, nxt, ok)
    ok &= nxt == end
    # "-0" is the integer 0 to a JSON parser, so it reads as +0.0: leave it to them.
    ok &= ~(neg & ~has_dot & ~has_exp & (mantissa == _U(0)))
    return np.where(neg, -value, value), cur, ok


def _group_rids(parts: list[np.ndarray], ok: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Distinct request ids among ``ok`` rows, keyed by their masked words: the first row of
    each in order of appearance, and each row's index into them (0 for bad rows). Ids longer
    than a word are hashed, and every row is then checked against its id's first row."""
    key = parts[0]
    for p in parts[1:]:
        key = key * _U(0x9E3779B97F4A7C15) + (p ^ (p >> _U(29)))
    rows = None if ok.all() else np.flatnonzero(ok)
    sub = key if rows is None else key[rows]
    if sub.size == 0:
        return np.zeros(0, np.int64), np.zeros(ok.size, np.int64)
    _, first, inverse = np.unique(sub, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    inverse = rank[inverse]
    first = first[order]
    if rows is not None:
        first = rows[first]
        full = np.zeros(ok.size, np.int64)
        full[rows] = inverse
        inverse = full
    if len(parts) > 1:
        for p in parts:
            if not ((p == p[first][inverse]) | ~ok).all():
                return None
    return first, inverse
