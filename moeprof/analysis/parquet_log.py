"""Reading a Parquet log (:mod:`moeprof.columns`): the same chunks, checks and messages as a
JSON Lines log, at the speed of columns.

A Parquet log is a directory of parts ``part-NNNNN.parquet`` (or one ``.parquet`` file): the
meta record is the JSON in each part's key-value metadata under ``moeprof.meta``, the closing
record in the last part's ``moeprof.end``. :class:`ParquetLog` offers what
:class:`~moeprof.analysis.reader.RouteLog` offers (it is a
:class:`~moeprof.analysis.reader.LogBase`) and yields the same :class:`RouteChunk` columns:

- Columns are read with pyarrow one record batch at a time (:data:`BATCH_ROWS` rows, constant
  memory), single-threaded (pyarrow's threaded reads can abort the interpreter at exit,
  apache/arrow#34314). Ids and weights come from the fixed-size lists' child arrays as numpy
  views, with no Python object per row; a request's dictionary index is mapped to the log's
  request code through a small table per dictionary, codes given in order of first appearance
  as in a JSON Lines log.
- Every rule a JSON Lines route is held to is checked on whole columns: ``top_k`` ids and
  weights, the layer among ``layers_logged``, ids distinct, non-negative and below
  ``num_experts`` (:func:`moeprof.schema.ids_valid`), weights finite and within float32
  (:func:`moeprof.schema.weights_valid`), no negative ``token_idx`` or ``step``, a known phase,
  no nulls where the schema has no None. Only the rows that fail are turned into records and
  judged by pydantic, so their reasons read exactly as for the same route in JSON Lines.
- A problem in a row is located as ``routes.parquet/part-00003.parquet: row 17: reason`` (the
  row in its part; :attr:`RouteChunk.line` is the row counted across all parts). A part that
  cannot be read, has other columns or another meta is one error for the part; a log whose
  first part has no ``moeprof.meta`` or columns of the wrong type cannot be read at all
  (``meta_issue``, or :class:`LogError` when a meta is required): one line.

Other writers' Parquet files are read too when they carry the meta: ``req_id`` and ``phase``
may be plain strings, ints of any width, ids and weights variable-length lists (each checked for
``top_k`` entries), weights float64 (narrowed to float32 as JSON numbers are), ``phase`` and
``step`` absent.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from moeprof import columns, schema
from moeprof.analysis.reader import (
    DecodedSink,
    Issue,
    IssueSink,
    LoadChunk,
    LogBase,
    LogError,
    RouteChunk,
    Severity,
    _Codes,
)
from moeprof.schema import NO_PHASE, NO_STEP, PHASES

BATCH_ROWS = 1 << 16
"""Rows per record batch: a chunk of ~3 MB of columns at top-4."""
LOAD_BATCH_ROWS = 1 << 17
"""Rows per record batch of :meth:`ParquetLog.load_chunks` (fewer columns, so more rows in
about the same memory; the hook's row groups hold this many)."""
REQUIRED = ("req_id", "token_idx", "layer", "topk_ids", "topk_weights")
OPTIONAL = ("phase", "step")
LOAD_COLUMNS = ("layer", "phase", "topk_ids")
"""What :meth:`ParquetLog.load_chunks` reads (and ``topk_weights`` when asked for weights)."""
_BAD = -2
"""A request or phase dictionary entry no route may hold (an empty id, an unknown phase)."""
_NEW = -1
"""A request dictionary entry not yet given a code."""
_PHASE_CODE = {name: i for i, name in enumerate(PHASES)}


@dataclass
class _Part:
    path: Path
    label: str | None
    """How issues name the part (None: the log's own path, a single-file log)."""


class ParquetLog(LogBase):
    """An open Parquet log; see the module docstring. Open it with
    :func:`moeprof.analysis.reader.open_log`."""

    form = "parquet"

    def __init__(
        self,
        path: Path,
        parts: list[_Part],
        meta: schema.MetaRecord | None,
        meta_issue: Issue | None,
        layout_issues: list[Issue],
    ) -> None:
        self.path = path
        self.parts = parts
        self.meta = meta
        self.meta_issue = meta_issue
        self._layout_issues = layout_issues
        self._codes = _Codes()
        self._starts: list[int] = []
        self._labels: list[str | None] = []
        self._req_cache: tuple[pa.Array, np.ndarray, list[str]] | None = None
        self._index_layers()
        if meta is not None:
            layers = np.asarray(meta.layers_logged, np.int64)
            self._one_layer = int(layers[0]) if layers.size == 1 else None
            self._layers_arr = layers

    # ------------------------------------------------------------------ the LogBase parts

    @property
    def routes_read(self) -> int:
        return self.lines_read

    @property
    def nbytes(self) -> int:
        total = 0
        for part in self.parts:
            with suppress(OSError):
                total += part.path.stat().st_size
        return total

    def issue(self, line: int | None, message: str, severity: Severity = "error") -> Issue:
        if line is None or not self._starts:
            return Issue(line, message, severity)
        at = bisect.bisect_right(self._starts, line) - 1
        row = line - self._starts[at] + 1
        return Issue(line, message, severity, file=self._labels[at], row=row)

    def with_num_experts(self, num_experts: int) -> ParquetLog:
        if self.meta is None:
            raise ValueError("log has no meta")
        meta = self.meta.model_copy(update={"num_experts": num_experts})
        return ParquetLog(self.path, self.parts, meta, self.meta_issue, self._layout_issues)

    # ------------------------------------------------------------------ reading

    def chunks(
        self, on_issue: IssueSink | None = None, *, on_decoded: DecodedSink | None = None
    ) -> Iterator[RouteChunk]:
        """Yield the valid routes batch by batch; report every bad row to ``on_issue``
        (without it, the first error raises :class:`LogError`). Without a meta nothing is
        read. ``on_decoded`` hears ``("parquet", first row, rows)`` per batch."""
        return self._read(on_issue, on_decoded, None)

    def load_chunks(
        self, on_issue: IssueSink | None = None, *, weights: bool = True
    ) -> Iterator[LoadChunk]:
        """Only the columns :data:`LOAD_COLUMNS` (and ``topk_weights`` with ``weights``),
        decoded and checked: the layer among ``layers_logged``, ids distinct and in range,
        weights finite, a known phase, no nulls. A row that fails is reported as :meth:`chunks`
        reports it (its reason from the whole row, read again from its row group); rules on
        the columns not read are not checked here (``validate`` does)."""
        names = (*LOAD_COLUMNS, "topk_weights") if weights else LOAD_COLUMNS
        return self._read(on_issue, None, names)

    def _read(
        self,
        on_issue: IssueSink | None,
        on_decoded: DecodedSink | None,
        project: tuple[str, ...] | None,
    ) -> Iterator:
        """The pass behind :meth:`chunks` (``project`` None: every column, RouteChunks) and
        :meth:`load_chunks` (``project``: those columns, LoadChunks)."""
        sink = on_issue or self._raise_errors
        self.end = None
        self.lines_read = 0
        self._starts, self._labels = [], []
        if self.meta is None:
            return
        for issue in self._layout_issues:
            sink(issue)
        row = 1
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            self._starts.append(row)
            self._labels.append(part.label)
            pf, rows = self._open_part(part, sink)
            if pf is not None:
                with pf:
                    self._closing_record(pf, part, i == last, sink)
                    yield from self._part_chunks(pf, part, row, sink, on_decoded, project)
            row += rows  # a part that cannot be read still takes its rows' numbers
            self.lines_read = row - 1

    def _part_chunks(
        self,
        pf: pq.ParquetFile,
        part: _Part,
        row: int,
        sink: IssueSink,
        on_decoded: DecodedSink | None,
        project: tuple[str, ...] | None,
    ) -> Iterator[RouteChunk | LoadChunk]:
        wanted = (*REQUIRED, *OPTIONAL) if project is None else project
        names = [c for c in wanted if c in pf.schema_arrow.names]
        size = BATCH_ROWS if project is None else LOAD_BATCH_ROWS
        batches = pf.iter_batches(batch_size=size, columns=names, use_threads=False)
        rows = _RowGroups(pf)
        while True:
            try:
                batch = next(batches, None)
            except (OSError, pa.ArrowException) as e:  # a damaged page: the part's rest is lost
                sink(Issue(None, f"cannot read: {_arrow_reason(e)}", file=part.label))
                return
            if batch is None:
                return
            n = batch.num_rows
            if on_decoded is not None and n:
                on_decoded("parquet", row, n)
            if project is None:
                chunk: RouteChunk | LoadChunk | None = self._batch(batch, row, part, sink)
            else:
                chunk = self._load_batch(batch, row, part, sink, rows)
            row += n
            self.lines_read = row - 1
            if chunk is not None and len(chunk):
                yield chunk

    def _open_part(self, part: _Part, sink: IssueSink) -> tuple[pq.ParquetFile | None, int]:
        """The part opened with its rows, or (None, rows to skip) after reporting why not."""
        try:
            pf = pq.ParquetFile(part.path)
        except (OSError, pa.ArrowException) as e:
            sink(Issue(None, f"cannot read: {_arrow_reason(e)}", file=part.label))
            return None, 0
        rows = pf.metadata.num_rows
        kv = pf.schema_arrow.metadata or {}
        assert self.meta is not None
        problem = None
        raw = kv.get(columns.META_KEY)
        if raw is None:
            problem = f"no {columns.META_KEY.decode()} in its key-value metadata"
        else:
            try:
                meta = schema.parse_meta(raw)
            except ValidationError:
                meta = None
            if meta != self.meta and not (
                meta is not None
                and meta.model_copy(update={"num_experts": self.meta.num_experts}) == self.meta
            ):
                problem = "its meta differs from the first part's (parts of different runs?)"
        problem = problem or schema_problem(pf.schema_arrow, self.meta.top_k)
        if problem is not None:
            sink(Issue(None, f"{problem}; its {rows:,} rows are not read", file=part.label))
            pf.close()
            return None, rows
        return pf, rows

    def _closing_record(self, pf: pq.ParquetFile, part: _Part, last: bool, sink: IssueSink) -> None:
        # the footer's key-value metadata: a writer adds the closing record there when it
        # closes the last part, after the Arrow schema stored with the file was fixed
        raw = (pf.metadata.metadata or {}).get(columns.END_KEY)
        if raw is None:
            return
        if not last:
            sink(Issue(None, "a closing record in a part that is not the last", file=part.label))
            return
        try:
            self.end = schema.parse_end(raw)
        except ValidationError as e:
            sink(Issue(None, f"closing record: {schema.explain(e)}", file=part.label))

    # ------------------------------------------------------------------ one batch

    def _batch(
        self, batch: pa.RecordBatch, first: int, part: _Part, sink: IssueSink
    ) -> RouteChunk | None:
        """The valid rows of ``batch`` (its first row numbered ``first``) as a chunk; each bad
        row reported with pydantic's reason."""
        if batch.num_rows == 0:
            return None
        n, k, col, bad = self._columns(batch)
        req = self._request_codes(col["req_id"], bad)
        # each rule is tested on the whole column first (one cheap reduction) and row by row
        # only when it fails somewhere
        token_idx = _ints(col["token_idx"], bad)
        if token_idx.min() < 0:
            bad |= token_idx < 0
        layer = self._layers(col["layer"], bad)
        ids = self._ids(col, k, bad).astype(np.int64)
        weights = _weights(col["topk_weights"], k, bad).astype(np.float32)
        phase = _phases(col.get("phase"), n, bad)
        step = _steps(col.get("step"), n, bad)
        line = np.arange(first, first + n, dtype=np.int64)
        chunk = RouteChunk(ids, weights, layer, token_idx, phase, step, req, line)
        if not bad.any():
            return chunk
        self._report_bad(bad, first, part, sink, lambda i: self._row_reason(batch, i))
        return chunk.take(~bad)

    def _load_batch(
        self, batch: pa.RecordBatch, first: int, part: _Part, sink: IssueSink, rows: _RowGroups
    ) -> LoadChunk | None:
        """:meth:`_batch` for a batch of the :data:`LOAD_COLUMNS` (and maybe ``topk_weights``):
        the same rules on the columns it has; a bad row's reason from its whole row."""
        if batch.num_rows == 0:
            return None
        n, k, col, bad = self._columns(batch)
        layer = self._layers(col["layer"], bad, widen=False)
        ids = self._ids(col, k, bad)
        arr = col.get("topk_weights")
        weights = None if arr is None else _weights(arr, k, bad).astype(np.float32, copy=False)
        phase = _phases(col.get("phase"), n, bad)
        if bad.any():
            start = self._starts[-1]  # the row in its part, from 0: first + i - start
            self._report_bad(
                bad, first, part, sink, lambda i: rows.reason(first + i - start, self._row_reason)
            )
            keep = ~bad
            layer, phase, ids = layer[keep], phase[keep], ids[keep]
            weights = None if weights is None else weights[keep]
        if ids.dtype.kind != "i":  # unsigned: those beyond int64 were bad rows
            ids = ids.astype(np.int64)
        return LoadChunk(layer, phase, ids, weights)

    def _columns(self, batch: pa.RecordBatch) -> tuple[int, int, dict[str, pa.Array], np.ndarray]:
        """What :meth:`_batch` and :meth:`_load_batch` start from: the batch's rows, ``top_k``,
        its columns by name, and a mask of bad rows (none yet)."""
        assert self.meta is not None
        n = batch.num_rows
        col = dict(zip(batch.schema.names, batch.columns, strict=True))
        return n, self.meta.top_k, col, np.zeros(n, bool)

    def _ids(self, col: dict[str, pa.Array], k: int, bad: np.ndarray) -> np.ndarray:
        """The ``topk_ids`` column as (n, k) (its stored type); rows breaking the id rules
        marked ``bad``."""
        assert self.meta is not None
        ids = _lists(col["topk_ids"], k, bad)
        _check_ids(ids, self.meta.num_experts, bad)
        return ids

    def _report_bad(
        self,
        bad: np.ndarray,
        first: int,
        part: _Part,
        sink: IssueSink,
        reason_of: Callable[[int], str | None],
    ) -> None:
        """Report each row ``i`` marked ``bad`` (row ``first + i`` of the log) with
        ``reason_of(i)``; unmark those it finds valid after all (None)."""
        start = self._starts[-1]
        for i in np.flatnonzero(bad).tolist():
            reason = reason_of(i)
            if reason is not None:
                sink(Issue(first + i, reason, file=part.label, row=first + i - start + 1))
            else:
                bad[i] = False

    def _layers(self, arr: pa.Array, bad: np.ndarray, *, widen: bool = True) -> np.ndarray:
        """The layer column (int64 with ``widen``, else as stored when a signed int); layers
        not in ``layers_logged`` mark their rows ``bad``."""
        if widen or arr.null_count or not pa.types.is_signed_integer(arr.type):
            layer = _ints(arr, bad)
        else:
            layer = arr.to_numpy()
        one = self._one_layer
        if one is None:
            bad |= ~np.isin(layer, self._layers_arr)
        elif layer.min() != one or layer.max() != one:
            bad |= layer != one
        return layer

    def _request_codes(self, arr: pa.Array, bad: np.ndarray) -> np.ndarray:
        """The request code of each row (rows with a null or empty id marked ``bad``).

        Each dictionary is mapped once to codes (a table as long as the dictionary; batches of
        one row group share their dictionary); entries new to the log get codes in order of
        their first row, as a JSON Lines log gives them, whatever the dictionary's order."""
        if not pa.types.is_dictionary(arr.type):
            arr = pc.dictionary_encode(arr)
        indices = arr.indices
        idx = _ints(indices, bad) if indices.null_count else indices.to_numpy()
        dictionary = arr.dictionary
        cached = self._req_cache
        if cached is not None and (cached[0] is dictionary or cached[0].equals(dictionary)):
            lut, names = cached[1], cached[2]
        else:
            names = dictionary.to_pylist()
            lut = np.asarray([_BAD if not s else self._codes.get(s, _NEW) for s in names], np.int64)
            self._req_cache = (dictionary, lut, names)
        codes = lut[idx]
        if codes.min(initial=0) >= 0:
            return codes
        wrong = lut == _BAD
        if wrong.any():
            bad |= wrong[idx]
        fresh = lut == _NEW
        if fresh.any():
            n = idx.size
            first = np.full(lut.size, n, np.int64)
            np.minimum.at(first, idx, np.arange(n))
            used = np.flatnonzero(fresh & (first < n))
            for e in used[np.argsort(first[used], kind="stable")].tolist():
                lut[e] = self._codes[names[e]]
            codes = lut[idx]
        return np.maximum(codes, 0)

    def _row_reason(self, batch: pa.RecordBatch | pa.Table, i: int) -> str | None:
        """Why row ``i`` is not a valid route, in the words a JSON Lines reader would use (the
        row as a record, judged by pydantic, then by the reader's range rules); None if it is
        valid after all."""
        row = batch.slice(i, 1).to_pylist()[0]
        record = {"type": "route", **{c: row[c] for c in REQUIRED}}
        for c in OPTIONAL:
            if row.get(c) is not None:
                record[c] = row[c]
        try:
            rec = schema.RouteRecord.model_validate(record, context={"meta": self.meta})
        except ValidationError as e:
            return schema.explain(e)
        return schema.range_problem(
            rec.token_idx, rec.layer, rec.topk_ids, rec.topk_weights, rec.step
        )


# --------------------------------------------------------------------------- columns


def _ints(arr: pa.Array, bad: np.ndarray, *, null: int | None = None) -> np.ndarray:
    """An integer column as int64: nulls become ``null`` (None: they mark the row ``bad``);
    unsigned values beyond int64 mark it ``bad``."""
    if arr.null_count:
        is_null = arr.is_null().to_numpy(zero_copy_only=False)
        if null is None:
            bad |= is_null
        arr = pc.fill_null(arr, 0 if null is None else null)
    values = arr.to_numpy(zero_copy_only=False)
    if values.dtype == np.uint64:
        bad |= values > np.uint64(schema.INT64_MAX)
    return values.astype(np.int64)


def _weights(arr: pa.Array, k: int, bad: np.ndarray) -> np.ndarray:
    """The weights column as (n, k) floats (float32 or float64, as stored); rows with a weight
    that is not finite or beyond float32 (:func:`moeprof.schema.weights_valid`) marked
    ``bad``."""
    weights = _lists(arr, k, bad)
    flat = weights.reshape(-1)
    if weights.dtype == np.float32:  # finite float32 values are within float32's range
        fine = bool(np.isfinite(flat).all())
    else:
        fine = bool(np.isfinite(flat).all()) and np.abs(flat).max() <= schema.FLOAT32_MAX
    if not fine:
        bad |= ~schema.weights_valid(weights).all(axis=1)
    return weights


class _RowGroups:
    """Whole rows of a part, for the reasons of rows found bad in a projected read: the row
    group holding the row is read with every column (one at a time, the last one kept)."""

    def __init__(self, pf: pq.ParquetFile) -> None:
        self.pf = pf
        self.starts: np.ndarray | None = None
        """The first row of each row group (known once a row is asked for)."""
        self.cached: tuple[int, pa.Table] | None = None

    def reason(self, row: int, judge: Callable[[pa.Table, int], str | None]) -> str | None:
        """``judge(table, i)`` on row ``row`` (from 0) of the part; why it cannot be read if
        its row group cannot be."""
        if self.starts is None:
            meta = self.pf.metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self.starts = np.cumsum([0, *sizes])
        g = int(np.searchsorted(self.starts, row, side="right")) - 1
        if self.cached is None or self.cached[0] != g:
            names = [c for c in (*REQUIRED, *OPTIONAL) if c in self.pf.schema_arrow.names]
            try:
                table = self.pf.read_row_group(g, columns=names, use_threads=False)
            except (OSError, pa.ArrowException) as e:
                return f"cannot read: {_arrow_reason(e)}"
            self.cached = (g, table)
        return judge(self.cached[1], row - int(self.starts[g]))


def _check_ids(ids: np.ndarray, num_experts: int | None, bad: np.ndarray) -> None:
    """Mark ``bad`` the rows of ``ids`` (n, k) that :func:`moeprof.schema.ids_valid` rejects,
    the same rule, computed the cheap way for row-major rows of a few ids: the range on the
    whole array first (per row only when it fails), repeats by comparing columns copied
    contiguous (numpy reduces along a short last axis a row at a time, ~40x slower)."""
    n, k = ids.shape
    if n == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (num_experts is not None and hi >= num_experts) or k > 8:
        bad |= ~schema.ids_valid(ids, num_experts)
        return
    cols = np.ascontiguousarray(ids.T)
    for a in range(k):
        for b in range(a + 1, k):
            bad |= cols[a] == cols[b]


def _steps(arr: pa.Array | None, n: int, bad: np.ndarray) -> np.ndarray:
    """The step column (``NO_STEP`` for null or no column); negative steps mark rows ``bad``."""
    if arr is None or pa.types.is_null(arr.type):
        return np.full(n, NO_STEP, np.int64)
    if not arr.null_count:
        step = _ints(arr, bad)
        bad |= step < 0
        return step
    is_null = arr.is_null().to_numpy(zero_copy_only=False)
    step = _ints(pc.fill_null(arr, 0), bad)
    bad |= step < 0
    step[is_null] = NO_STEP
    return step


def _lists(arr: pa.Array, k: int, bad: np.ndarray) -> np.ndarray:
    """A list column (fixed-size or not) as an (n, k) array of its values' type, read from
    the child array without a Python object per row; rows that are null, hold a null or do
    not hold exactly ``k`` values are marked ``bad`` (their values: zeros)."""
    n = len(arr)
    if arr.null_count:
        bad |= arr.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(arr.type):
        values = arr.values.slice(arr.offset * k, n * k)
        return _values(values, bad, n, k)
    offsets = arr.offsets.to_numpy()
    lengths = np.diff(offsets)
    wrong = lengths != k
    if not wrong.any():
        return _values(arr.values.slice(int(offsets[0]), n * k), bad, n, k)
    bad |= wrong
    child = arr.values
    flat = _values(child, np.zeros(len(child), bool), len(child), 1).reshape(-1)
    out = np.zeros((n, k), flat.dtype)
    rows = np.flatnonzero(~wrong)
    out[rows] = flat[offsets[rows, None] + np.arange(k)]
    return out


def _values(child: pa.Array, bad: np.ndarray, n: int, k: int) -> np.ndarray:
    if child.null_count:
        bad |= child.is_null().to_numpy(zero_copy_only=False).reshape(n, k).any(axis=1)
        child = pc.fill_null(child, 0)
    values = child.to_numpy(zero_copy_only=False).reshape(n, k)
    if values.dtype == np.uint64:
        bad |= (values > np.uint64(schema.INT64_MAX)).any(axis=1)
    return values


def _phases(arr: pa.Array | None, n: int, bad: np.ndarray) -> np.ndarray:
    """Phase codes (``NO_PHASE`` for null or no column); unknown names mark the row ``bad``."""
    if arr is None or pa.types.is_null(arr.type):
        return np.full(n, NO_PHASE, np.int8)
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    names = arr.dictionary.to_pylist()
    lut = np.asarray(
        [NO_PHASE if s is None else _PHASE_CODE.get(s, _BAD) for s in names] + [NO_PHASE],
        np.int8,
    )
    idx = arr.indices
    if idx.null_count:
        idx = pc.fill_null(idx, len(lut) - 1)
    codes = lut[idx.to_numpy(zero_copy_only=False)]
    if (lut == _BAD).any():
        wrong = codes == _BAD
        bad |= wrong
        codes[wrong] = NO_PHASE
    return codes


# --------------------------------------------------------------------------- schema


def schema_problem(arrow: pa.Schema, top_k: int) -> str | None:
    """What keeps ``arrow`` from holding routes of ``top_k`` experts, or None: a column of
    :data:`REQUIRED` missing, or a column of the wrong type (``req_id``/``phase`` strings or
    dictionary-encoded strings, ``token_idx``/``layer``/``step`` integers, ``topk_ids`` a list
    of integers and ``topk_weights`` one of floats, fixed-size lists of ``top_k`` when
    fixed-size)."""
    names = arrow.names
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        return f"column {', '.join(repr(c) for c in missing)} missing (not a moeprof route table)"
    expect = {
        "req_id": ("strings", _is_string),
        "phase": ("strings", _is_string),
        "token_idx": ("integers", pa.types.is_integer),
        "layer": ("integers", pa.types.is_integer),
        "step": ("integers", pa.types.is_integer),
        "topk_ids": ("a list of integers", pa.types.is_integer),
        "topk_weights": ("a list of floats", pa.types.is_floating),
    }
    for name, (what, ok) in expect.items():
        if name not in names:
            continue
        t = arrow.field(name).type
        if name in OPTIONAL and pa.types.is_null(t):  # all null: none has one
            continue
        if name.startswith("topk_"):
            if not (pa.types.is_list(t) or pa.types.is_large_list(t) or _fixed(t)) or not ok(
                t.value_type
            ):
                return f"column {name!r} is {t}, expected {what}"
            if _fixed(t) and t.list_size != top_k:
                return f"column {name!r} is {t}, expected lists of top_k={top_k} (the meta's)"
        elif not ok(t):
            return f"column {name!r} is {t}, expected {what}"
    return None


def _fixed(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t)


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _arrow_reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.rstrip(".")


# --------------------------------------------------------------------------- opening


def open_parquet(path: Path, *, require_meta: bool = True) -> ParquetLog:
    """Open a Parquet log (a directory of parts, or one file) and read its meta from the first
    part. Raises :class:`LogError` when nothing can be read (missing, not Parquet, no parts),
    and with ``require_meta`` when the first part has no valid meta or the wrong columns."""
    if not path.exists():
        raise LogError(f"{path}: no such file")
    parts, layout_issues = _find_parts(path)
    first = parts[0]
    try:
        pf = pq.ParquetFile(first.path)
    except (OSError, pa.ArrowException) as e:
        where = first.label or str(path)
        raise LogError(f"{where}: not a readable Parquet file ({_arrow_reason(e)})") from e
    with pf:
        arrow = pf.schema_arrow
    meta, problem = _read_meta(arrow)
    issue = None if problem is None else Issue(None, problem, file=first.label)
    if issue is not None and require_meta:
        raise LogError(issue.format(path))
    return ParquetLog(path, parts, meta, issue, layout_issues)


def _read_meta(arrow: pa.Schema) -> tuple[schema.MetaRecord | None, str | None]:
    raw = (arrow.metadata or {}).get(columns.META_KEY)
    if raw is None:
        return None, (
            f"no {columns.META_KEY.decode()} in the file's key-value metadata: not a moeprof "
            "Parquet log (write it with moeprof, or `moeprof export`)"
        )
    try:
        meta = schema.parse_meta(raw)
    except ValidationError as e:
        return None, f"{columns.META_KEY.decode()}: not a meta record: {schema.explain(e)}"
    problem = schema_problem(arrow, meta.top_k)
    return (meta, None) if problem is None else (None, problem)


def _find_parts(path: Path) -> tuple[list[_Part], list[Issue]]:
    """The files of a Parquet log in order, and problems of the set (a part missing)."""
    if not path.is_dir():
        return [_Part(path, None)], []
    try:
        names = [p.name for p in path.iterdir() if not p.name.startswith(".")]
    except OSError as e:
        raise LogError(f"{path}: cannot read: {e.strerror or e}") from e
    numbered = sorted(
        (int(m.group(1)), name) for name in names if (m := columns.PART_RE.fullmatch(name))
    )
    if numbered:
        files = [name for _, name in numbered]
    else:  # a directory written by another tool (DuckDB, Polars): its .parquet files
        files = sorted(name for name in names if name.endswith(".parquet"))
    if not files:
        if any(p.name.endswith(".parquet.tmp") for p in path.iterdir()):
            raise LogError(
                f"{path}: no complete Parquet part yet, only one being written (the engine was "
                "killed or is still running before it closed its first part)"
            )
        raise LogError(
            f"{path}: is a directory, not a log file (no Parquet parts {columns.PART_GLOB} in it)"
        )
    issues = []
    have = {i for i, _ in numbered}
    lost = [i for i in range(max(have, default=-1) + 1) if i not in have]
    if lost:
        shown = ", ".join(columns.part_name(i) for i in lost[:5])
        more = f" and {len(lost) - 5} more" if len(lost) > 5 else ""
        issues.append(Issue(None, f"parts missing: {shown}{more} (their routes are lost)"))
    return [_Part(path / name, f"{path}/{name}") for name in files], issues
