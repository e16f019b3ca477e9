"""Streaming reader for moeprof logs: constant memory, numpy chunks out, pydantic as the judge.

Why three decoders: pydantic (``schema.parse_route``) is the definition of a valid route but
costs microseconds a record, too slow for logs of tens of millions of routes. So the file is read
in big byte blocks, and each block goes to the first decoder that takes it:

1. the vectorised byte parser, :mod:`moeprof.analysis.fastparse`, parses lines in the hook's
   exact byte layout with numpy, all lines of a block at once and no Python object per record.
   Lines it does not recognise (another key order, spaces, escapes, unusual numbers) are decoded
   by msgspec below and put back in place; if msgspec cannot take them either, the whole block
   goes to msgspec.
2. msgspec decodes the block in one call into structs shaped from the meta (fixed-length
   id/weight tuples and the logged layers as literals, so a wrong ``top_k`` or layer fails at
   decode time), and the remaining rules (distinct ids, id range, finite weights) are checked
   with numpy on the whole block. A block is accepted only if every one of its lines holds
   exactly one record and every check passed; otherwise it is halved and retried, and
3. small remainders are parsed line by line with pydantic, so problems carry exact line numbers
   and pydantic's own reasons while a few bad lines do not slow down the rest of the file.

Decoders 1 and 2 are written to be at most as permissive as the schema, and to yield
bit-identical values: anything they are unsure of goes one decoder down. ``open_log(path,
decoder=...)`` (see :data:`Decoder`) limits which decoders a log may use; tests and benchmarks
compare them, and ``chunks(on_decoded=...)`` tells which decoder read which lines.
"""

from __future__ import annotations

import codecs
import gc
import json
import operator
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Annotated, BinaryIO, Literal, get_args

import msgspec
import numpy as np
from pydantic import ValidationError

from moeprof import schema
from moeprof.analysis import fastparse
from moeprof.errors import UserError
from moeprof.schema import NO_PHASE, NO_STEP, PHASES

BLOCK_BYTES = 4 << 20
"""Bytes read per block; also the longest line accepted (a route line is ~200 bytes)."""
MAX_FAST_TOP_K = 256
"""Beyond this the byte parser's and msgspec's fixed-length types get silly; such logs go to
pydantic, line by line."""
PYDANTIC_LINES = 64
"""Blocks msgspec rejects are halved down to this many lines, then parsed by pydantic."""
SLOW_LINES = PYDANTIC_LINES
"""Old name of :data:`PYDANTIC_LINES` (tests/test_validate.py still imports it)."""
SUB_BLOCK_LINES = 8192
"""Lines the vectorized parser takes at once: its temporaries then stay in the CPU caches."""
MAX_ODD_SHARE = 0.25
"""A block with more lines than this outside the hook's layout goes to msgspec whole."""
SKIP_BLOCKS = 8
"""After such a block, the next this many go straight to msgspec (a log by another writer)."""

Decoder = Literal["auto", "msgspec", "pydantic"]
"""Which decoders a :class:`RouteLog` may use: ``"auto"`` (the default) the vectorised byte
parser, then msgspec, then pydantic; ``"msgspec"`` msgspec, then pydantic; ``"pydantic"``
pydantic alone. All give the same chunks and issues, only at different speeds."""
DECODERS: tuple[Decoder, ...] = get_args(Decoder)

_PHASE_CODE: dict[str | None, int] = {None: NO_PHASE, **{p: i for i, p in enumerate(PHASES)}}
_LONG_LINE = f"line longer than {BLOCK_BYTES >> 20} MiB: binary data or not a JSON Lines log"
_PIPE = "cannot read from a pipe; save the log to a file first"
_FIELD_KEYS = tuple(f'"{name}"'.encode() for name in schema.RouteRecord.model_fields)
"""The route fields as JSON keys: a line may name each at most once (see :func:`_repeated_key`)."""

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Issue:
    """One problem found in a log. ``line`` is 1-based (a line of a JSON Lines log, a row of
    a Parquet log counted across its parts: :attr:`RouteChunk.line`); None for problems of the
    whole log."""

    line: int | None
    message: str
    severity: Severity = "error"
    file: str | None = None
    """The file the problem is in, when it is not the log's own path: a part of a Parquet log
    directory, or one rank's file of a log read from several (:mod:`moeprof.analysis.sources`;
    ``line`` then counts in that file)."""
    row: int | None = None
    """Parquet only: the 1-based row in ``file`` (or in the log's single file)."""

    def format(self, path: str | Path) -> str:
        """``file:line: message``, ``file: row N: message`` (Parquet) or ``file: message``."""
        where = self.file if self.file is not None else str(path)
        if self.row is not None:
            return f"{where}: row {self.row}: {self.message}"
        if self.line is not None:
            return f"{where}:{self.line}: {self.message}"
        return f"{where}: {self.message}"


IssueSink = Callable[[Issue], None]
DecodedSink = Callable[[str, int, int], None]
"""``(decoder, first, count)``: ``decoder`` (``"vector"``, ``"msgspec"`` or ``"pydantic"``) read
``count`` lines from line ``first`` on. For the lines of a vector block that the byte parser
handed to msgspec, ``first`` is the first of them and they need not be consecutive."""


class LogError(UserError):
    """A log that cannot be read as a moeprof log; the message names file, line and reason."""


@dataclass(frozen=True)
class RouteChunk:
    """A run of consecutive valid route records, column by column. Rows are in file order."""

    ids: np.ndarray
    """(n, k) int64 expert ids."""
    weights: np.ndarray
    """(n, k) float32 router weights, in the log's order."""
    layer: np.ndarray
    """(n,) int64 decoder layer index."""
    token_idx: np.ndarray
    """(n,) int64 position of the token in its request."""
    phase: np.ndarray
    """(n,) int8: index into :data:`moeprof.schema.PHASES`, or ``NO_PHASE``."""
    step: np.ndarray
    """(n,) int64 engine step (forward pass) number, or ``NO_STEP`` (-1) where the line has no
    step (logs written before the hook logged it, other tools' logs)."""
    req: np.ndarray
    """(n,) int64 request codes: ``RouteLog.req_ids[code]`` is the req_id string."""
    line: np.ndarray
    """(n,) int64 1-based line numbers; in a Parquet log, row numbers counted across its
    parts; in several files read as one, numbers counted on from one file to the next."""

    def __len__(self) -> int:
        return int(self.token_idx.size)

    def take(self, rows: np.ndarray) -> RouteChunk:
        """The chunk restricted to ``rows`` (a boolean mask or indices)."""
        fields = [getattr(self, f) for f in self.__dataclass_fields__]
        if rows.dtype == bool:  # compress and take: both far cheaper than [rows] on 2-d arrays
            return RouteChunk(*(np.compress(rows, a, axis=0) for a in fields))
        return RouteChunk(*(np.take(a, rows, axis=0) for a in fields))


@dataclass(frozen=True)
class LoadChunk:
    """The columns of a run of valid routes that load statistics need
    (:meth:`LogBase.load_chunks`); rows in file order."""

    layer: np.ndarray
    """(n,) decoder layer index (any int type)."""
    phase: np.ndarray
    """(n,) int8 phase code, as :attr:`RouteChunk.phase`."""
    ids: np.ndarray
    """(n, k) expert ids: non-negative, of a signed int type (int64 or narrower)."""
    weights: np.ndarray | None
    """(n, k) float32 router weights; None when not asked for."""

    def __len__(self) -> int:
        return int(self.layer.size)


class _Codes(dict[str, int]):
    """req_id -> dense code, assigned on first sight; lookups of known ids stay in C."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __missing__(self, key: str) -> int:
        code = self[key] = len(self.names)
        self.names.append(key)
        return code


class _Views:
    """A read buffer seen as bytes, as unaligned 8-byte words and as rows (for fastparse)."""

    def __init__(self, buf: bytearray) -> None:
        self.bytes = np.frombuffer(buf, np.uint8)
        self.words = fastparse.word_view(buf)
        self.rows = fastparse.row_view(buf)


class _Reject(Exception):
    """msgspec declines a block: it is halved, or handed to pydantic."""


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Decoding allocates ~10 container objects a record; letting the cyclic GC rescan them
    every few hundred allocations doubles the decode time, and none of them form cycles."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _route_struct(k: int, layers: list[int]) -> type[msgspec.Struct]:
    """A msgspec type that decodes only routes with exactly ``k`` ids and weights at one of
    ``layers`` (checking both in C is cheaper than checking them afterwards)."""
    return msgspec.defstruct(
        "FastRoute",
        [
            ("type", Literal["route"]),
            ("req_id", Annotated[str, msgspec.Meta(min_length=1)]),
            ("token_idx", Annotated[int, msgspec.Meta(ge=0)]),
            ("layer", Literal[tuple(layers)]),  # type: ignore[valid-type]
            ("topk_ids", tuple[(int,) * k]),  # type: ignore[misc]
            ("topk_weights", tuple[(float,) * k]),  # type: ignore[misc]
            ("phase", schema.Phase | None, None),
            ("step", Annotated[int, msgspec.Meta(ge=0)] | None, None),
        ],
        gc=False,
    )


_get = operator.attrgetter


def _steps(steps: list[int | None]) -> np.ndarray:
    """The step column of decoded records (``NO_STEP`` for None): the common cases, every
    record with a step or none with one, without a Python step per record."""
    n = len(steps)
    try:
        return np.fromiter(steps, np.int64, n)
    except TypeError:  # a None among them
        if steps.count(None) == n:
            return np.full(n, NO_STEP, np.int64)
        return np.fromiter([NO_STEP if s is None else s for s in steps], np.int64, n)


def _one_object_per_line(data: memoryview, scratch: np.ndarray) -> int | None:
    """The number of lines in ``data`` (which ends with a newline) if every line starts with
    ``{`` and ends with ``}``, else None. ``scratch`` is a reusable bool buffer at least
    ``len(data)`` long (fresh multi-megabyte temporaries cost more in page faults than the
    comparisons themselves).

    msgspec's ``decode_lines`` reads a stream of whitespace-separated values, so it would skip a
    blank line and read an object spread over two lines. With every newline sitting between a
    ``}`` and a ``{`` no newline can fall inside a value (JSON would need a comma there, and
    strings cannot hold raw newlines), so "as many records as lines" then means exactly one
    record per line. Lines with trailing spaces or CRLF endings fail this test and go to the
    line-by-line path, which accepts them.
    """
    a = np.frombuffer(data, np.uint8)
    m = a.size
    if m < 3 or a[0] != 0x7B:
        return None
    n = int(np.count_nonzero(np.equal(a, 0x0A, out=scratch[:m])))
    closes = opens = 0
    for offset in (0, 1):  # byte pairs at even, then odd offsets: one compare finds "}\n"
        pairs = np.frombuffer(data[offset : offset + ((m - offset) & ~1)], "<u2")
        out = scratch[: pairs.size]
        closes += int(np.count_nonzero(np.equal(pairs, 0x0A7D, out=out)))  # "}\n"
        opens += int(np.count_nonzero(np.equal(pairs, 0x7B0A, out=out)))  # "\n{"
    return n if closes == n and opens == n - 1 else None


def _read_ahead(f: BinaryIO) -> None:
    """Ask the kernel to start reading the next blocks while this one is parsed: a log that is
    not (or no longer) in the page cache then costs disk time only once, not on top of the
    parsing. Only a hint; files that cannot take it are read as before."""
    if _FADV_WILLNEED is None:
        return
    with suppress(OSError, ValueError):
        os.posix_fadvise(f.fileno(), f.tell(), 2 * BLOCK_BYTES, _FADV_WILLNEED)


_FADV_WILLNEED: int | None = getattr(os, "POSIX_FADV_WILLNEED", None)


def _utf8(data: memoryview) -> bool:
    """Whether ``data`` is valid UTF-8. msgspec checks the strings it decodes but not the ones
    it skips (unknown keys and their values), where pydantic rejects invalid UTF-8 too. The
    ASCII test is the cheap common case."""
    if int(np.frombuffer(data, np.uint8).max(initial=0)) < 0x80:
        return True
    try:
        codecs.utf_8_decode(data, "strict", True)
    except UnicodeDecodeError:
        return False
    return True


def _looks_binary(line: bytes) -> bool:
    if b"\x00" in line:
        return True
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _route_reason(line: bytes, exc: ValidationError) -> str:
    """pydantic's reason, with the two cases it cannot name itself spelled out."""
    if _looks_binary(line):
        return "binary data, not a JSON text line"
    for err in exc.errors(include_url=False):
        if tuple(err["loc"]) == ("type",) and err.get("input") == "meta":
            return "a second meta record: only line 1 may be one (logs concatenated?)"
        if tuple(err["loc"]) == ("type",) and err.get("input") == "end":
            return _END_NOT_LAST
    return schema.explain(exc)


def _meta_reason(line: bytes, exc: ValidationError) -> str:
    if line[:2] == b"\x1f\x8b":
        return "gzip-compressed data: decompress the log first"
    if _looks_binary(line):
        return "binary data, not a JSON text line"
    if not line.strip():
        return "blank line: expected the meta record"
    if _json_type(line) == "route":
        return _MISSING_META
    return f"not a meta record: {schema.explain(exc)}"


_MISSING_META = "a route record where the meta record should be (log written without its header?)"
_END_NOT_LAST = (
    "a closing record before the last line: only the last line may be one "
    "(written to after it was closed, or logs concatenated?)"
)


def _closing_line_start(buf: bytearray, start: int, end: int) -> int:
    """Where the last line of ``buf[start:end]`` (ending in a newline) starts if it is a
    closing record (``"type": "end"``), else ``end``. One look at one line per block, so the
    byte parser never sees it: a route line only names ``"end"`` as a request id, and a
    ``type`` spelled with escapes is decoded to be sure."""
    ls = max(buf.rfind(b"\n", start, end - 1) + 1, start)
    if buf.find(b'"end"', ls, end) < 0 and buf.find(b"\\u", ls, end) < 0:
        return end
    return ls if _json_type(bytes(buf[ls : end - 1])) == "end" else end


def _json_type(line: bytes) -> object:
    """The ``type`` field of a JSON object line, or None (only used to word messages)."""
    try:
        obj = msgspec.json.decode(line)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None
    return obj.get("type") if isinstance(obj, dict) else None


def _repeated_key(line: bytes) -> str | None:
    """A route field named twice in the object of ``line`` (JSON parsers keep the last value,
    so the line would silently read as something the writer may not have meant), else None.
    The byte counts are the cheap test; only a line that may repeat one is parsed again."""
    if b"\\u" not in line and not any(line.count(key) > 1 for key in _FIELD_KEYS):
        return None
    last: list[list[str]] = [[]]

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        last[0] = [k for k, _ in items]  # the outermost object is the last one closed
        return dict(items)

    try:
        json.loads(line, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return None
    keys = last[0]
    fields = schema.RouteRecord.model_fields
    return next((k for k in fields if keys.count(k) > 1), None)


LogForm = Literal["jsonl", "parquet", "several"]


class LogBase(ABC):
    """What every form of log offers its readers: a JSON Lines file (:class:`RouteLog`), a
    Parquet log (:class:`~moeprof.analysis.parquet_log.ParquetLog`), or the files of one run's
    data-parallel ranks read as one (:class:`~moeprof.analysis.sources.MultiLog`).

    Each has ``path``, ``meta``, ``meta_issue``, ``chunks(on_issue, on_decoded=)`` yielding
    :class:`RouteChunk` (request codes stable across passes, first-seen order), ``req_ids``,
    ``layers``, ``layer_slot``, ``groups``, ``group_name``, ``with_num_experts``, and after a
    complete pass ``lines_read``, ``routes_read`` and ``end``.
    """

    form: LogForm = "jsonl"
    path: Path
    meta: schema.MetaRecord | None
    meta_issue: Issue | None
    lines_read: int = 0
    """Lines (Parquet: rows) seen so far, meta and closing record included; final after a
    complete pass."""
    end: schema.EndRecord | None = None
    """The closing record, known after a complete pass; None when the log has none (cut
    short, still being written, or written by a tool that does not close its logs)."""
    cut_mid_line: bool = False
    """After a complete pass: the last line had no trailing newline (a write cut off)."""
    _codes: _Codes
    _sorted_layers: np.ndarray
    _slot_of_sorted: np.ndarray
    _slot_table: np.ndarray | None = None
    """slot of layer L at [L] when the layers are small non-negative ints (a lookup, not a
    binary search, per row)."""

    def _index_layers(self) -> None:
        if self.meta is not None:
            order = np.argsort(self.meta.layers_logged)
            self._sorted_layers = np.asarray(self.meta.layers_logged, np.int64)[order]
            self._slot_of_sorted = order
            layers = self._sorted_layers
            if layers.size and layers[0] >= 0 and layers[-1] < 1 << 16:
                self._slot_table = np.zeros(int(layers[-1]) + 1, np.int64)
                self._slot_table[layers] = order

    @abstractmethod
    def chunks(
        self, on_issue: IssueSink | None = None, *, on_decoded: DecodedSink | None = None
    ) -> Iterator[RouteChunk]: ...

    def load_chunks(
        self, on_issue: IssueSink | None = None, *, weights: bool = True
    ) -> Iterator[LoadChunk]:
        """The routes' layer, phase, expert ids (and with ``weights`` their weights) for
        statistics that need nothing else. A form that can read columns on their own (Parquet)
        reads only these and checks only these (the rules on ``req_id``, ``token_idx`` and
        ``step`` are :meth:`chunks`' and ``validate``'s), with the same messages; otherwise
        they come from :meth:`chunks` with every check."""
        for c in self.chunks(on_issue):
            yield LoadChunk(c.layer, c.phase, c.ids, c.weights if weights else None)

    @abstractmethod
    def with_num_experts(self, num_experts: int) -> LogBase: ...

    @property
    @abstractmethod
    def routes_read(self) -> int:
        """Route records (valid or not) seen in the last complete pass: what a closing
        record's ``routes`` counts."""

    @property
    def members(self) -> list[LogBase]:
        """The logs this one reads: itself, or each rank's file of a :class:`MultiLog`."""
        return [self]

    @property
    def moeprof_written(self) -> bool:
        """Whether the meta says moeprof's hook wrote the log (it has ``moeprof_version``):
        only such logs are expected to end with a closing record."""
        return self.meta is not None and "moeprof_version" in (self.meta.model_extra or {})

    @property
    def nbytes(self) -> int:
        """Size on disk (0 when unknown)."""
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def issue(self, line: int | None, message: str, severity: Severity = "error") -> Issue:
        """An issue at ``line`` (a :attr:`RouteChunk.line` of this log), located as this form
        of log locates them (a Parquet part and row, a rank's file)."""
        return Issue(line, message, severity)

    def _raise_errors(self, issue: Issue) -> None:
        if issue.severity == "error":
            raise LogError(issue.format(self.path))

    # ------------------------------------------------------------------ keys and names

    @property
    def req_ids(self) -> list[str]:
        """req_id strings by code (grows while reading)."""
        return self._codes.names

    @property
    def layers(self) -> list[int]:
        return list(self.meta.layers_logged) if self.meta else []

    def layer_slot(self, layer: np.ndarray) -> np.ndarray:
        """Index of each layer in ``meta.layers_logged`` (rows in chunks are always logged)."""
        if self._slot_table is not None:
            return self._slot_table[layer]
        return self._slot_of_sorted[np.searchsorted(self._sorted_layers, layer)]

    def groups(self, chunk: RouteChunk) -> np.ndarray:
        """One code per (request, layer) pair: ``req * len(layers_logged) + slot``."""
        return chunk.req * len(self.layers) + self.layer_slot(chunk.layer)

    def group_name(self, group: int) -> tuple[str, int]:
        """(req_id, layer) of a group code."""
        req, slot = divmod(int(group), len(self.layers))
        return self.req_ids[req], self.layers[slot]


class RouteLog(LogBase):
    """An open JSON Lines log: its meta, and a fresh pass over its routes each time
    :meth:`chunks` runs.

    Request codes are stable across passes (first-seen order), so a second pass can use sets
    built in the first. A cleanly closed log ends with a closing record
    (:class:`~moeprof.schema.EndRecord`), found after a pass in :attr:`end`; a closing record
    anywhere but on the last line is an error on its line.
    """

    def __init__(
        self,
        path: Path,
        meta: schema.MetaRecord | None,
        meta_issue: Issue | None,
        routes_offset: int | None,
        routes_first_line: int,
        decoder: Decoder = "auto",
    ) -> None:
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
        self.path = path
        self.meta = meta
        self.meta_issue = meta_issue
        """Why line 1 is not a usable meta (None when it is)."""
        self.decoder: Decoder = decoder
        self._offset = routes_offset
        self._first_line = routes_first_line
        self._codes = _Codes()
        self._scratch = np.empty(0, bool)
        self.lines_read = routes_first_line - 1
        """Lines seen so far (meta included); final after a complete pass."""
        self._msgspec: msgspec.json.Decoder | None = None
        self._parser: fastparse.BlockParser | None = None
        self._skip_vector = 0
        """Blocks left before the vectorized parser is tried again."""
        self._on_decoded: DecodedSink | None = None
        if meta is not None:
            if meta.top_k <= MAX_FAST_TOP_K and decoder != "pydantic":
                struct = _route_struct(meta.top_k, meta.layers_logged)
                self._msgspec = msgspec.json.Decoder(struct)
            if meta.top_k <= MAX_FAST_TOP_K and decoder == "auto":
                self._parser = fastparse.BlockParser(
                    meta.top_k, meta.layers_logged, meta.num_experts
                )
        self._index_layers()

    @property
    def routes_read(self) -> int:
        return max(self.lines_read - (self._first_line - 1) - (self.end is not None), 0)

    def with_num_experts(self, num_experts: int) -> RouteLog:
        """The same log read as if its meta declared ``num_experts`` (ids beyond are errors)."""
        if self.meta is None:
            raise ValueError("log has no meta")
        meta = self.meta.model_copy(update={"num_experts": num_experts})
        return RouteLog(
            self.path, meta, self.meta_issue, self._offset, self._first_line, self.decoder
        )

    # ------------------------------------------------------------------ reading

    def chunks(
        self, on_issue: IssueSink | None = None, *, on_decoded: DecodedSink | None = None
    ) -> Iterator[RouteChunk]:
        """Yield the valid routes chunk by chunk; report every bad line to ``on_issue``.

        Without ``on_issue`` the first error raises :class:`LogError` (warnings are dropped).
        Without a meta, lines are only checked (pydantic, no meta rules) and nothing is yielded.
        ``on_decoded`` hears which decoder read which lines (see :data:`DecodedSink`).
        """
        sink = on_issue or self._raise_errors
        line = self._first_line
        self._skip_vector = 0
        self._on_decoded = on_decoded
        self.end = None
        self.cut_mid_line = False
        if self._offset is None:  # line 1 was over the limit on a device: nothing more read
            self.lines_read = line - 1
            return
        try:
            f = self.path.open("rb")
        except OSError as e:
            raise LogError(f"{self.path}: cannot read: {e.strerror or e}") from e
        with f:
            mode = os.fstat(f.fileno()).st_mode
            if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                raise LogError(f"{self.path}: {_PIPE}")
            regular = stat.S_ISREG(mode)
            f.seek(self._offset)
            pad = self._parser.pad if self._parser is not None else 0
            buf = bytearray(BLOCK_BYTES + pad)  # the parser reads past a block's last line
            if self._scratch.size < BLOCK_BYTES + 64:
                self._scratch = np.empty(BLOCK_BYTES + 64, bool)
            views = _Views(buf)
            fill = 0
            skipping = False
            while True:
                if fill == BLOCK_BYTES:
                    if not skipping:
                        sink(Issue(line, _LONG_LINE if regular else _LONG_LINE + "; stopped"))
                    fill, skipping = 0, True
                    if not regular:  # a device may never end the line (/dev/zero)
                        break
                got = f.readinto(memoryview(buf)[fill:BLOCK_BYTES])
                if not got:
                    break
                _read_ahead(f)
                fill += got
                end = buf.rfind(b"\n", 0, fill) + 1
                if end == 0:
                    continue
                start = 0
                if skipping:
                    start = buf.find(b"\n", 0, end) + 1
                    line += 1
                    skipping = False
                held = _closing_line_start(buf, start, end)  # kept back until the file ends
                if start < held:
                    line += yield from self._decode_span(buf, views, start, held, line, sink)
                end = held
                tail = fill - end
                buf[:tail] = buf[end:fill]
                fill = tail
            if skipping:
                line += 1
            elif fill:
                line += yield from self._final_lines(bytes(buf[:fill]), line, sink)
        self.lines_read = line - 1

    def _final_lines(
        self, rest: bytes, line: int, sink: IssueSink
    ) -> Generator[RouteChunk, None, int]:
        """What is left when the file ends: a closing record held back (complete, with its
        newline), a last line without a newline, or both. Returns the lines consumed."""
        nl = rest.find(b"\n")
        if nl >= 0:
            closing, after = rest[:nl], rest[nl + 1 :]
            if not after:
                self._read_end(closing, line, sink)
                return 1
            sink(Issue(line, _END_NOT_LAST))
            yield from self._last_line(after, line + 1, sink)
            return 2
        self.cut_mid_line = True
        if _json_type(rest) == "end":
            self._read_end(rest, line, sink, newline=False)
        else:
            yield from self._last_line(rest, line, sink)
        return 1

    def _read_end(self, raw: bytes, lineno: int, sink: IssueSink, *, newline: bool = True) -> None:
        """The last line, a closing record: kept in :attr:`end` when well-formed."""
        self._decoded("pydantic", lineno, 1)
        try:
            rec = schema.parse_end(raw)
        except ValidationError as e:
            what = "closing record" if newline else "truncated last line (no trailing newline)"
            sink(Issue(lineno, f"{what}: {schema.explain(e)}"))
            return
        if not newline:
            sink(Issue(lineno, "last line has no trailing newline (writer cut off?)", "warning"))
        self.end = rec

    def _decoded(self, decoder: str, first: int, count: int) -> None:
        if self._on_decoded is not None and count:
            self._on_decoded(decoder, first, count)

    def _decode_span(
        self, buf: bytearray, views: _Views, start: int, end: int, first: int, sink: IssueSink
    ) -> Generator[RouteChunk, None, int]:
        """Lines ``buf[start:end]`` (ending in a newline): the vectorized parser, else msgspec.
        Returns the number of lines consumed."""
        if self._parser is not None:
            if self._skip_vector:
                self._skip_vector -= 1
            else:
                chunk = self._decode_vector(buf, views, start, end, first)
                if chunk is not None:
                    if len(chunk):
                        yield chunk
                    return len(chunk)
        return (yield from self._decode_span_msgspec(buf, start, end, first, sink))

    def _decode_span_msgspec(
        self, buf: bytearray, start: int, end: int, first: int, sink: IssueSink
    ) -> Generator[RouteChunk, None, int]:
        """Lines ``buf[start:end]`` (ending in a newline): msgspec, else halve, else pydantic.
        Returns the number of lines consumed."""
        if self._msgspec is not None:
            data = memoryview(buf)[start:end]
            nlines = _one_object_per_line(data, self._scratch)
            if nlines is not None:
                try:
                    chunk = self._decode_msgspec(data, first, nlines)
                except _Reject:
                    pass
                else:
                    self._decoded("msgspec", first, nlines)
                    if len(chunk):
                        yield chunk
                    return nlines
        nlines = buf.count(b"\n", start, end)
        if nlines > PYDANTIC_LINES and self._msgspec is not None:
            mid = buf.find(b"\n", start + (end - start) // 2, end) + 1
            if mid == end:
                mid = buf.rfind(b"\n", start, end - 1) + 1
            if start < mid < end:
                left = yield from self._decode_span_msgspec(buf, start, mid, first, sink)
                right = yield from self._decode_span_msgspec(buf, mid, end, first + left, sink)
                return left + right
        lines = bytes(buf[start:end]).split(b"\n")[:-1]
        chunk = self._decode_pydantic(lines, first, sink)
        if chunk is not None and len(chunk):
            yield chunk
        return nlines

    # ------------------------------------------------------------------ the byte parser

    def _decode_vector(
        self, buf: bytearray, views: _Views, start: int, end: int, first: int
    ) -> RouteChunk | None:
        """All lines of ``buf[start:end]`` as one chunk, parsed by :mod:`fastparse`; lines it
        does not recognise are decoded by msgspec and put in their place. None when either
        declines (the caller then takes the msgspec path for the whole block)."""
        ends = fastparse.line_bounds(views.bytes, start, end, self._scratch)
        starts = np.empty(ends.size, np.int64)
        starts[0] = start
        starts[1:] = ends[:-1] + 1
        parts = self._parse_sub_blocks(views, starts, ends)
        if parts is None:
            return None
        ok = np.concatenate([p.ok for _, p in parts]) if len(parts) > 1 else parts[0][1].ok
        odd = np.flatnonzero(~ok)
        base = len(self._codes.names)
        other: RouteChunk | None = None
        if odd.size:
            other = self._decode_odd_lines(buf, starts, ends, odd, first)
            if other is None:
                return None
        cols = self._parsed_columns(buf, starts, parts)
        if other is not None:
            for name, col in cols.items():
                col[odd] = getattr(other, name)
            cols["req"] = self._first_seen(cols["req"], base)
            self._decoded("msgspec", int(other.line[0]), len(other))
        n = starts.size
        self._decoded("vector", first, n)
        return RouteChunk(**cols, line=np.arange(first, first + n, dtype=np.int64))

    def _parse_sub_blocks(
        self, views: _Views, starts: np.ndarray, ends: np.ndarray
    ) -> list[tuple[int, fastparse.Parsed]] | None:
        """The byte parser over the lines ``SUB_BLOCK_LINES`` at a time: (first row, result)
        each. None when a sub-block is not in the hook's layout, or too many lines are not (the
        parser then rests for ``SKIP_BLOCKS`` blocks)."""
        parser = self._parser
        assert parser is not None
        n = starts.size
        parts: list[tuple[int, fastparse.Parsed]] = []
        odd_lines = 0
        try:
            for s in range(0, n, SUB_BLOCK_LINES):
                e = s + SUB_BLOCK_LINES
                p = parser.parse(views.words, views.rows, starts[s:e], ends[s:e])
                if p is not None:
                    odd_lines += p.ok.size - int(np.count_nonzero(p.ok))
                if p is None or odd_lines > MAX_ODD_SHARE * n:
                    self._skip_vector = SKIP_BLOCKS  # not the hook's layout: stop trying a while
                    return None
                parts.append((s, p))
        except IndexError:  # the buffer is padded so that this cannot happen; never fail a read
            return None
        return parts

    def _decode_odd_lines(
        self, buf: bytearray, starts: np.ndarray, ends: np.ndarray, odd: np.ndarray, first: int
    ) -> RouteChunk | None:
        """The rows ``odd`` of a block (its first line numbered ``first``) that the byte parser
        did not recognise, decoded by msgspec; None when msgspec declines them."""
        if self._msgspec is None:
            return None
        data = memoryview(b"".join([buf[starts[i] : ends[i] + 1] for i in odd.tolist()]))
        if _one_object_per_line(data, self._scratch) != odd.size:
            return None
        try:
            return self._decode_msgspec(data, first, odd.size, odd + first)
        except _Reject:
            return None

    def _parsed_columns(
        self, buf: bytearray, starts: np.ndarray, parts: list[tuple[int, fastparse.Parsed]]
    ) -> dict[str, np.ndarray]:
        """The byte parser's results as chunk columns (rows it did not recognise: garbage)."""
        n, k = starts.size, parts[0][1].ids.shape[0]
        cols = {
            "ids": np.empty((n, k), np.int64),
            "weights": np.empty((n, k), np.float32),
            "token_idx": np.empty(n, np.int64),
            "layer": np.empty(n, np.int64),
            "phase": np.empty(n, np.int8),
            "step": np.empty(n, np.int64),
            "req": np.zeros(n, np.int64),
        }
        for s, p in parts:
            e = s + p.ok.size
            cols["ids"][s:e] = p.ids.T
            cols["weights"][s:e] = p.weights.T  # float64 -> float32, rounded as astype does
            for name in ("token_idx", "layer", "phase", "step"):
                cols[name][s:e] = getattr(p, name)
            if p.rid_first.size:
                codes = self._request_codes(buf, starts[s + p.rid_first], p.rid_len[p.rid_first])
                cols["req"][s:e] = codes[p.rid_inverse]
        return cols

    def _request_codes(self, buf: bytearray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """The codes of the request ids of the lines at ``starts`` (ids ``sizes`` bytes long)."""
        at = (starts + fastparse.RID_OFFSET).tolist()
        codes = [
            self._codes[buf[i : i + m].decode("ascii")]
            for i, m in zip(at, sizes.tolist(), strict=True)
        ]
        return np.asarray(codes, np.int64)

    def _first_seen(self, req: np.ndarray, base: int) -> np.ndarray:
        """Renumber the request codes added since there were ``base`` (all of them used in
        ``req``) in order of first appearance in ``req``, as reading line by line would."""
        fresh = np.flatnonzero(req >= base)
        if not fresh.size:
            return req
        codes, at = np.unique(req[fresh], return_index=True)
        order = codes[np.argsort(at)]
        names = self._codes.names
        if order.size != len(names) - base or (order == np.arange(base, len(names))).all():
            return req
        added = names[base:]
        remap = np.empty(order.size, np.int64)
        for new, old in enumerate(order.tolist(), start=base):
            names[new] = added[old - base]
            self._codes[names[new]] = new
            remap[old - base] = new
        req[fresh] = remap[req[fresh] - base]
        return req

    # ------------------------------------------------------------------ msgspec

    def _decode_msgspec(
        self, data: memoryview, first: int, nlines: int, lines: np.ndarray | None = None
    ) -> RouteChunk:
        """msgspec on ``nlines`` lines numbered from ``first`` (or numbered ``lines``)."""
        meta = self.meta
        assert meta is not None
        n, k = nlines, meta.top_k
        with _gc_paused():
            ids, w64, token_idx, layer, phase, step, req_names = self._msgspec_columns(data, n, k)
        ids = ids.reshape(n, k)
        if not schema.ids_valid(ids, meta.num_experts).all():
            raise _Reject
        if not schema.weights_valid(w64).all():
            raise _Reject
        if self._maybe_repeated_key(data, n, phase, step):
            raise _Reject
        req = np.fromiter(map(self._codes.__getitem__, req_names), np.int64, n)
        return RouteChunk(
            ids=ids,
            weights=w64.astype(np.float32).reshape(n, k),
            layer=layer,
            token_idx=token_idx,
            phase=phase,
            step=step,
            req=req,
            line=np.arange(first, first + n, dtype=np.int64) if lines is None else lines,
        )

    def _maybe_repeated_key(
        self, data: memoryview, n: int, phase: np.ndarray, step: np.ndarray
    ) -> bool:
        """Whether a line of ``data`` may name a route field twice (JSON decoders keep the last
        value silently; pydantic then names the line). The cheap test first: each record has
        at least one colon per field it holds, so with exactly that many colons in ``data`` no
        line can hold a key twice. Only otherwise (extra fields, nulls, colons in strings) are
        the field keys counted."""
        a = np.frombuffer(data, np.uint8)
        colons = int(np.count_nonzero(np.equal(a, 0x3A, out=self._scratch[: a.size])))
        phases = int(np.count_nonzero(phase != NO_PHASE))
        steps = int(np.count_nonzero(step != NO_STEP))
        if colons <= 6 * n + phases + steps:
            return False
        raw = bytes(data)
        if b"\\u" in raw:  # a key may be spelled with escapes
            return True
        # every line holds each required key at least once, so n of each means once a line;
        # an optional key may be on no more lines than have a value for it (a null: pydantic)
        most = dict.fromkeys(_FIELD_KEYS, n) | {b'"phase"': phases, b'"step"': steps}
        return any(raw.count(key) > m for key, m in most.items())

    def _msgspec_columns(self, data: memoryview, n: int, k: int) -> tuple[np.ndarray, ...]:
        """Decode ``n`` lines with msgspec and turn the records into columns. Runs with the GC
        paused and drops the records before returning, so no collection ever scans them."""
        if not _utf8(data):
            raise _Reject
        try:
            recs = self._msgspec.decode_lines(data)  # type: ignore[union-attr]
        except (msgspec.DecodeError, ValueError, RecursionError) as e:
            raise _Reject from e
        if len(recs) != n:  # a line holding two records
            raise _Reject
        try:  # int64 columns: an integer beyond 64 bits overflows
            ids = np.fromiter(chain.from_iterable(map(_get("topk_ids"), recs)), np.int64, n * k)
            w64 = np.fromiter(
                chain.from_iterable(map(_get("topk_weights"), recs)), np.float64, n * k
            )
            token_idx = np.fromiter(map(_get("token_idx"), recs), np.int64, n)
            if len(self.layers) == 1:  # the decoder admits no other layer
                layer = np.full(n, self.layers[0], np.int64)
            else:
                layer = np.fromiter(map(_get("layer"), recs), np.int64, n)
            step = _steps(list(map(_get("step"), recs)))
        except (OverflowError, ValueError) as e:
            raise _Reject from e
        phase = np.fromiter(map(_PHASE_CODE.__getitem__, map(_get("phase"), recs)), np.int8, n)
        req_names = list(map(_get("req_id"), recs))
        del recs
        return ids, w64, token_idx, layer, phase, step, req_names

    # ------------------------------------------------------------------ pydantic

    def _decode_pydantic(
        self, lines: list[bytes], first: int, sink: IssueSink
    ) -> RouteChunk | None:
        """pydantic, line by line: the reference behaviour, used where the others decline."""
        self._decoded("pydantic", first, len(lines))
        good: list[tuple[int, schema.RouteRecord]] = []
        for i, raw in enumerate(lines):
            rec = self._check_line(raw, first + i, sink)
            if rec is not None:
                good.append((first + i, rec))
        if not good or self.meta is None:
            return None
        return self._records_chunk(good)

    def _check_line(self, raw: bytes, lineno: int, sink: IssueSink) -> schema.RouteRecord | None:
        try:
            rec = schema.parse_route(raw, self.meta)
        except ValidationError as e:
            sink(Issue(lineno, _route_reason(raw, e)))
            return None
        repeated = _repeated_key(raw)
        if repeated:
            sink(Issue(lineno, f"repeated key '{repeated}' in one record: which value holds?"))
            return None
        problem = schema.range_problem(
            rec.token_idx, rec.layer, rec.topk_ids, rec.topk_weights, rec.step
        )
        if problem:
            sink(Issue(lineno, problem))
            return None
        return rec

    def _records_chunk(self, good: list[tuple[int, schema.RouteRecord]]) -> RouteChunk:
        recs = [r for _, r in good]
        n = len(recs)
        return RouteChunk(
            ids=np.array([r.topk_ids for r in recs], np.int64).reshape(n, -1),
            weights=np.array([r.topk_weights for r in recs], np.float32).reshape(n, -1),
            layer=np.array([r.layer for r in recs], np.int64),
            token_idx=np.array([r.token_idx for r in recs], np.int64),
            phase=np.array([_PHASE_CODE[r.phase] for r in recs], np.int8),
            step=np.array([NO_STEP if r.step is None else r.step for r in recs], np.int64),
            req=np.array([self._codes[r.req_id] for r in recs], np.int64),
            line=np.array([ln for ln, _ in good], np.int64),
        )

    def _last_line(self, raw: bytes, lineno: int, sink: IssueSink) -> Iterator[RouteChunk]:
        """A final line without a newline: fine if complete (warned), else a truncated write."""
        self._decoded("pydantic", lineno, 1)
        self.cut_mid_line = True
        try:
            schema.parse_route(raw, self.meta)
        except ValidationError as e:
            reason = _route_reason(raw, e)
            sink(Issue(lineno, f"truncated last line (no trailing newline): {reason}"))
            return
        sink(Issue(lineno, "last line has no trailing newline (writer cut off?)", "warning"))
        rec = self._check_line(raw, lineno, sink)
        if rec is not None and self.meta is not None:
            yield self._records_chunk([(lineno, rec)])


def _parquet_magic(path: Path) -> bool:
    """Whether ``path`` is a regular file starting with Parquet's magic bytes (pipes and
    devices are not opened here: reading would consume them)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return False
        with path.open("rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


def open_log(path: str | Path, *, require_meta: bool = True, decoder: Decoder = "auto") -> LogBase:
    """Open a log and read its meta: a JSON Lines file (:class:`RouteLog`), or a Parquet log,
    a directory of parts or one ``.parquet`` file (:mod:`moeprof.analysis.parquet_log`; told
    apart by the directory, the ``.parquet`` suffix or the file's magic bytes).

    Raises :class:`LogError` when the file is missing or unreadable, and, with ``require_meta``,
    when line 1 is not a valid meta record (an empty file included; for Parquet: a file without
    moeprof's meta or with the wrong columns). Without ``require_meta`` such a log opens with
    ``meta=None`` and the reason in ``meta_issue``. ``decoder`` limits the decoders a JSON Lines
    log's passes use (:data:`Decoder`; the default is the fastest that applies). Several files
    and globs: :func:`moeprof.analysis.sources.open_logs`.
    """
    if str(path) == "-":
        raise LogError(f"-: {_PIPE}")
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet" or _parquet_magic(path):
        from moeprof.analysis.parquet_log import open_parquet

        return open_parquet(path, require_meta=require_meta)
    try:
        f = path.open("rb")
    except FileNotFoundError as e:
        raise LogError(f"{path}: no such file") from e
    except IsADirectoryError as e:
        raise LogError(f"{path}: is a directory, not a log file") from e
    except OSError as e:
        raise LogError(f"{path}: cannot read: {e.strerror or e}") from e
    with f:
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):  # one pass only, and chunks() seeks
            raise LogError(f"{path}: {_PIPE}")
        first = f.readline(BLOCK_BYTES)
        offset: int | None = None
        if not first.endswith(b"\n") and len(first) == BLOCK_BYTES:
            # over the limit: in a file (finite) routes start after it, skipped in bounded
            # pieces; on a device such as /dev/zero the line may never end: nothing more is read
            rest = first
            while stat.S_ISREG(mode) and len(rest) == BLOCK_BYTES and not rest.endswith(b"\n"):
                rest = f.readline(BLOCK_BYTES)
        if stat.S_ISREG(mode) or first.endswith(b"\n") or len(first) < BLOCK_BYTES:
            try:
                offset = f.tell()
            except OSError as e:  # a terminal or another stream that cannot seek
                raise LogError(f"{path}: {_PIPE}") from e
    meta: schema.MetaRecord | None = None
    issue: Issue | None = None
    routes_offset: int | None = offset
    routes_line = 2
    if not first:
        issue = Issue(1, "empty file: expected a meta record on line 1")
    elif not first.endswith(b"\n") and len(first) == BLOCK_BYTES:
        issue = Issue(1, _LONG_LINE)
    else:
        try:
            meta = schema.parse_meta(first)
        except ValidationError as e:
            issue = Issue(1, _meta_reason(first, e))
            if issue.message == _MISSING_META:
                routes_offset, routes_line = 0, 1  # check line 1 as a route as well
        if meta is not None and max(meta.layers_logged) > schema.INT64_MAX:
            meta, issue = None, Issue(1, "layers_logged has a layer number beyond 64 bits")
    if issue is not None and require_meta:
        raise LogError(issue.format(path))
    if meta is not None and not first.endswith(b"\n"):
        issue = Issue(1, "meta line has no trailing newline and the log has no routes", "warning")
    return RouteLog(path, meta, issue, routes_offset, routes_line, decoder)
