"""``moeprof export``: a log from one form to another, and a CSV set for spreadsheets.

- **JSONL -> Parquet**: the layout of :mod:`moeprof.columns` (a directory ``OUT`` of parts
  ``part-NNNNN.parquet``, each complete, the meta record in every part's metadata and the closing
  record, when the log has one, in the last), or with ``single_file`` one Parquet file holding
  both records (readers take either form).
- **Parquet -> JSONL**: byte for byte what the hook writes for the same records: the meta line
  as ``json.dumps(meta, separators=(",", ":"))``, route lines from the hook's own template and
  formatter (:mod:`moeprof.layout`), the closing record, when present, as the last line in the
  meta line's form.
- **CSV set** (:func:`export_csv`): see :mod:`moeprof.analysis.csvset`.

Memory stays flat: routes stream through in batches (a JSONL chunk, or
:data:`~moeprof.api.BATCH_ROWS` Parquet rows) and Parquet parts are closed every
:data:`PART_ROWS` routes. No file is replaced unless ``force``: output goes to a hidden
temporary beside ``OUT`` and is renamed into place once complete. Progress goes to a callback
(:data:`~moeprof.api.Progress`); nothing here prints.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from moeprof.api import PathArg, Progress, RouteSource, open_source
from moeprof.columns import WRITE_OPTIONS
from moeprof.errors import UserError
from moeprof.outfiles import refuse_existing, replacing, umask

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

Format = Literal["jsonl", "parquet"]
PART_ROWS = 1 << 20
"""Routes per Parquet part (and per row group of a single-file export)."""
ROW_GROUP_ROWS = 1 << 18
"""Routes per Parquet row group."""


@dataclass(frozen=True)
class ExportResult:
    source: Path
    out: Path
    format: Format
    routes: int
    parts: int
    """Parquet files written (0 for JSONL)."""
    complete: bool
    """Whether the log carries its closing record (was closed cleanly)."""


def output_format(source: RouteSource, out: Path, to: Format | None) -> Format:
    """What ``out`` becomes: ``to`` if given, else by its suffix (``.jsonl``/``.parquet``),
    else the other form than the source's."""
    if to is not None:
        return to
    if out.suffix == ".parquet":
        return "parquet"
    if out.suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    return "jsonl" if source.kind == "parquet" else "parquet"


def export(
    log: PathArg,
    out: PathArg,
    *,
    to: Format | None = None,
    single_file: bool = False,
    force: bool = False,
    on_progress: Progress | None = None,
) -> ExportResult:
    """Write ``log`` (JSONL or Parquet) to ``out`` in the other form (or the form ``to``/the
    suffix of ``out`` names). Refuses an existing ``out`` without ``force``."""
    source = open_source(log)
    out = Path(out)
    fmt = output_format(source, out, to)
    if out.resolve() == source.path.resolve():
        raise UserError(f"{out}: is the log being exported; choose another output")
    refuse_existing(out, force)
    if fmt == "jsonl":
        routes = _write_jsonl(source, out, force, on_progress)
        parts = 0
    elif single_file:
        routes = _write_parquet_file(source, out, force, on_progress)
        parts = 1
    else:
        routes, parts = _write_parquet_dir(source, out, force, on_progress)
    return ExportResult(source.path, out, fmt, routes, parts, source.end is not None)


def _progress(source: RouteSource, on_progress: Progress | None) -> Iterator[pa.RecordBatch]:
    done = 0
    for batch in source.batches():
        yield batch
        done += batch.num_rows
        if on_progress is not None:
            total = source.total
            on_progress(done, None if total is None else max(total, done))
    if on_progress is not None:
        on_progress(done, done)


# --------------------------------------------------------------------------- to JSONL


def record_line(record: dict[str, Any]) -> str:
    """A meta or closing record as the hook writes it: compact JSON, keys in their order."""
    return json.dumps(record, separators=(",", ":")) + "\n"


def _write_jsonl(source: RouteSource, out: Path, force: bool, on_progress: Progress | None) -> int:
    routes = 0
    with replacing(out, force=force) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(record_line(source.meta))
        for batch in _progress(source, on_progress):
            fh.write(format_batch(batch, source.top_k))
            routes += batch.num_rows
        if source.end is not None:
            fh.write(record_line(source.end))
    return routes


def format_batch(batch: pa.RecordBatch, top_k: int) -> str:
    """Route lines of a ``route_schema`` batch, exactly as the hook formats the same routes.
    Rows without a phase or a step leave the field out, as the hook's older template did."""
    import numpy as np

    n = batch.num_rows
    if n == 0:
        return ""
    cols = _columns(batch, top_k)
    has_phase, has_step = cols["has_phase"], cols["has_step"]
    if has_phase.all() and has_step.all():
        return _format_rows(cols, top_k, slice(0, n), ())
    pattern = has_phase.astype(np.int8) * 2 + has_step.astype(np.int8)
    cuts = np.flatnonzero(np.diff(pattern)) + 1
    bounds = [0, *cuts.tolist(), n]
    parts = []
    for a, b in itertools.pairwise(bounds):
        omit = tuple(
            name for name, has in (("phase", has_phase[a]), ("step", has_step[a])) if not has
        )
        parts.append(_format_rows(cols, top_k, slice(a, b), omit))
    return "".join(parts)


def _columns(batch: pa.RecordBatch, top_k: int) -> dict[str, np.ndarray]:
    import numpy as np
    import pyarrow as pa

    n = batch.num_rows
    req = batch.column("req_id")
    if isinstance(req, pa.DictionaryArray):
        names = np.array([json.dumps(s) for s in req.dictionary.to_pylist()] or [""], object)
        req_json = names[req.indices.to_numpy(zero_copy_only=False)]
    else:
        req_json = np.array([json.dumps(s) for s in req.to_pylist()], object)
    phase = batch.column("phase")
    if isinstance(phase, pa.DictionaryArray):
        phase = phase.dictionary_decode()
    phase_names = np.array(phase.to_pylist(), object)
    step = batch.column("step")
    return {
        "req_json": req_json,
        "token_idx": batch.column("token_idx").to_numpy(zero_copy_only=False),
        "layer": batch.column("layer").to_numpy(zero_copy_only=False),
        "ids": batch.column("topk_ids").flatten().to_numpy().reshape(n, top_k),
        "weights": batch.column("topk_weights").flatten().to_numpy().reshape(n, top_k),
        "prefill": phase_names == "prefill",
        "has_phase": phase_names != None,  # noqa: E711 - elementwise
        "step": step.fill_null(0).to_numpy(zero_copy_only=False),
        "has_step": ~step.is_null().to_numpy(zero_copy_only=False),
    }


def _format_rows(
    cols: dict[str, np.ndarray], top_k: int, rows: slice, omit: tuple[str, ...]
) -> str:
    from moeprof.layout import format_routes, route_template

    return format_routes(
        route_template(None, top_k, omit=omit),
        cols["req_json"][rows],
        cols["token_idx"][rows],
        cols["ids"][rows],
        cols["weights"][rows],
        None if "phase" in omit else cols["prefill"][rows],
        layer=cols["layer"][rows],
        step=None if "step" in omit else cols["step"][rows],
    )


# --------------------------------------------------------------------------- to Parquet


def _schema(source: RouteSource) -> pa.Schema:
    """``route_schema`` with the meta record in its metadata (every part carries it)."""
    from moeprof.columns import META_KEY, route_schema

    meta = json.dumps(source.meta, separators=(",", ":")).encode()
    return route_schema(source.top_k).with_metadata({META_KEY: meta})


class _Part:
    """One Parquet file being written; :meth:`close` adds the closing record to its footer's
    key-value metadata (as the hook's sink does), when given."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        import pyarrow.parquet as pq

        self.path = path
        self.rows = 0
        self._writer = pq.ParquetWriter(path, schema, **WRITE_OPTIONS)

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.rows += table.num_rows

    def close(self, end: dict[str, Any] | None = None) -> None:
        from moeprof.columns import END_KEY

        if end is not None:
            self._writer.add_key_value_metadata(
                {END_KEY: json.dumps(end, separators=(",", ":")).encode()}
            )
        self._writer.close()


def _write_parquet_file(
    source: RouteSource, out: Path, force: bool, on_progress: Progress | None
) -> int:
    """One Parquet file holding both records (the meta in its schema, the closing record in
    its footer)."""
    schema = _schema(source)
    with replacing(out, force=force) as tmp:
        part = _Part(tmp, schema)
        try:
            for table in _row_groups(_progress(source, on_progress), schema):
                part.write(table)
        finally:
            part.close(source.end)
    return part.rows


def _row_groups(batches: Iterator[pa.RecordBatch], schema: pa.Schema) -> Iterator[pa.Table]:
    """Batches gathered into tables of about :data:`ROW_GROUP_ROWS` routes."""
    import pyarrow as pa

    held: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        held.append(batch)
        rows += batch.num_rows
        if rows >= ROW_GROUP_ROWS:
            yield pa.Table.from_batches(held, schema=schema)
            held, rows = [], 0
    if held:
        yield pa.Table.from_batches(held, schema=schema)


def _write_parquet_dir(
    source: RouteSource, out: Path, force: bool, on_progress: Progress | None
) -> tuple[int, int]:
    """The :mod:`moeprof.columns` directory layout (parts of at most :data:`PART_ROWS` routes,
    the closing record in the last), built in a hidden directory beside ``out`` and renamed
    into place when complete (an existing ``out`` is replaced only then)."""
    from moeprof.columns import part_name

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise UserError(f"{out}: cannot write: {e.strerror or e}") from e
    schema = _schema(source)
    routes = parts = 0
    part: _Part | None = None
    try:
        for table in _row_groups(_progress(source, on_progress), schema):
            at = 0
            while at < table.num_rows:
                if part is None:
                    part = _Part(tmp / part_name(parts), schema)
                    parts += 1
                take = min(table.num_rows - at, PART_ROWS - part.rows)
                part.write(table.slice(at, take))
                at += take
                if part.rows >= PART_ROWS:
                    part.close()
                    part = None
            routes += table.num_rows
        if part is None:  # no routes, or the last part is full: the end goes in an empty one
            part = _Part(tmp / part_name(parts), schema)
            parts += 1
        part.close(source.end)
        part = None
        os.chmod(tmp, 0o777 & ~umask())
        _replace_dir(tmp, out, force)
    except OSError as e:
        raise UserError(f"{out}: cannot write: {e.strerror or e}") from e
    finally:
        if part is not None:
            with contextlib.suppress(Exception):
                part.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return routes, parts


def _replace_dir(tmp: Path, out: Path, force: bool) -> None:
    """Put the finished directory ``tmp`` at ``out``; an existing ``out`` (``force`` only) is
    moved aside first and removed once the new one is in place."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    refuse_existing(out, force)
    if out.is_dir() and not out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rename(out, old / "x")
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        os.rename(tmp, out)


# --------------------------------------------------------------------------- CSV


def export_csv(
    log: PathArg,
    out_dir: PathArg,
    *,
    force: bool = False,
    num_experts: int | None = None,
    on_progress: Progress | None = None,
) -> list[Path]:
    """The CSV set of :mod:`moeprof.analysis.csvset` for ``log``, in ``out_dir``; the files
    written. Refuses files already there without ``force``."""
    from moeprof.analysis import csvset

    return csvset.write_csv_set(
        Path(log), Path(out_dir), force=force, num_experts=num_experts, on_progress=on_progress
    )
