"""moeprof as a library: a log as a pyarrow Table, and the analyses the CLI prints, as dataclasses.

::

    import moeprof

    routes = moeprof.load("routes.jsonl")       # or "routes.parquet", a part file, several DP files
    moeprof.meta(routes)["model_id"]             # the meta record, from the table's metadata
    moeprof.end(routes)                          # the closing record, None if not closed cleanly
    df = moeprof.load("routes.parquet", as_="pandas")
    report = moeprof.analyze("routes.jsonl")     # AnalysisReport, as `moeprof analyze --json`
    counts = moeprof.expert_counts("routes.parquet")  # ExpertCounts: (layers, E) int64 arrays

A log is read here through a :class:`RouteSource`: the meta and closing records as the JSON
objects the hook wrote, and the routes as record batches of :func:`moeprof.columns.route_schema`,
a bounded number of rows at a time. ``moeprof export`` writes from the same sources, so the two
cannot disagree about what a log holds. Nothing here prints; long reads report progress through
a callback.

Where the input is:

- a JSONL log (the hook's text form): read by :func:`moeprof.analysis.reader.open_log`, with its
  checks (a bad line raises :class:`~moeprof.analysis.reader.LogError`: ``file:line: reason``);
- a Parquet log (:mod:`moeprof.columns`): a directory of ``part-NNNNN.parquet`` files (by
  convention named ``routes.parquet``) or a single ``.parquet`` file; its schema must be
  ``route_schema(top_k)`` and every part must carry the meta record.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from moeprof.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa

    from moeprof.analysis.analyze import AnalysisReport
    from moeprof.analysis.counts import ExpertCounts
    from moeprof.analysis.validate import ValidationReport

PathArg = str | os.PathLike[str]
"""A path as callers hold it."""
Paths = PathArg | Sequence[PathArg]
"""One log, or several (one per data-parallel rank of one run); each may be a glob."""
Progress = Callable[[int, int | None], None]
"""``(routes done, routes in all)``: ``None`` in all where the total is not known up front; for
JSONL logs the total is an estimate from the file size, corrected at the end."""

BATCH_ROWS = 1 << 16
"""Routes per record batch read from Parquet (a JSONL chunk is one batch)."""
SOURCES_KEY = b"moeprof.sources"
"""Schema metadata of a loaded table: a JSON list of ``{"path", "meta", "end"}`` per source."""


class ParquetLogError(UserError):
    """A Parquet file or directory that is not a moeprof Parquet log (one line, names the file)."""


# --------------------------------------------------------------------------- sources


def is_parquet(path: Path) -> bool:
    """Whether ``path`` names a Parquet log: a directory, or a file ending in ``.parquet`` or
    starting with Parquet's magic bytes."""
    if path.is_dir() or path.suffix == ".parquet":
        return True
    try:
        with path.open("rb") as fh:
            return fh.read(4) == b"PAR1"
    except OSError:
        return False


def expand(paths: Paths) -> list[Path]:
    """The logs ``paths`` names, in order: globs expanded (sorted); a glob matching nothing is a
    :class:`UserError`."""
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not items:
        raise UserError("no log given")
    out: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if glob.has_magic(text) and not Path(text).exists():
            found = sorted(glob.glob(text))
            if not found:
                raise UserError(f"{text}: no file matches")
            out += [Path(f) for f in found]
        else:
            out.append(Path(text))
    return out


@dataclass
class RouteSource:
    """One log, open for reading: its records as the hook wrote them, its routes as batches."""

    path: Path
    kind: Literal["jsonl", "parquet"]
    meta: dict[str, Any]
    """The meta record as a JSON object, keys in the writer's order."""
    top_k: int
    total: int | None
    """Routes in the log: exact for Parquet, an estimate for JSONL (None if unknown)."""
    end: dict[str, Any] | None
    """The closing record as a JSON object; None when the log was not closed cleanly."""
    read: Callable[[], Iterator[pa.RecordBatch]] = field(repr=False)

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The routes in log order, as record batches of ``route_schema(top_k)``; a fresh pass
        each call."""
        return self.read()


def open_source(path: PathArg) -> RouteSource:
    """Open one log (JSONL, a Parquet file or a Parquet log directory) for reading."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise UserError(f"{path}: no such file")
    if is_parquet(path):
        return _parquet_source(path)
    return _jsonl_source(path)


def read_end_line(path: Path) -> dict[str, Any] | None:
    """The closing record of a JSONL log (its last line, ``{"type":"end",...}``), else None."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - 65536))
            tail = fh.read()
    except OSError:
        return None
    lines = tail.rstrip(b"\n").rsplit(b"\n", 1)
    last = lines[-1]
    if b'"end"' not in last:
        return None
    try:
        obj = json.loads(last)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and obj.get("type") == "end" else None


def rank_logs(path: Path) -> list[Path]:
    """The files a launch logging to ``path`` wrote: ``path`` itself, or with data parallelism
    one per rank (``routes.dp0.jsonl``, ``routes.dp1.jsonl``, ...; see
    :meth:`moeprof.hook.config.HookConfig.path_for_dp_rank`)."""
    if path.exists():
        return [path]
    ranks = sorted(
        path.parent.glob(f"{glob.escape(path.stem)}.dp*{glob.escape(path.suffix)}"),
        key=lambda p: (len(p.name), p.name),
    )
    return ranks


def closing_record(path: PathArg) -> dict[str, Any] | None:
    """The closing record of a log (JSONL: its last line; Parquet: the ``moeprof.end`` metadata
    of the last part), read without reading the routes; None when the log has none (cut short,
    still being written) or does not exist. For a launch with data-parallel ranks (one file per
    rank), the first rank's, and None unless every rank has one."""
    files = rank_logs(Path(path))
    if not files:
        return None
    ends = [_closing_record_of(f) for f in files]
    return ends[0] if all(e is not None for e in ends) else None


def _closing_record_of(path: Path) -> dict[str, Any] | None:
    if not is_parquet(path):
        return read_end_line(path)
    import pyarrow.parquet as pq

    from moeprof.columns import END_KEY

    try:
        parts = parquet_parts(path)
        kv = pq.read_metadata(parts[-1]).metadata or {}
    except (OSError, ValueError, UserError):
        return None
    return json.loads(kv[END_KEY]) if END_KEY in kv else None


def _jsonl_source(path: Path) -> RouteSource:
    from moeprof.analysis.reader import BLOCK_BYTES, open_log

    log = open_log(path)
    assert log.meta is not None
    with path.open("rb") as fh:
        meta = json.loads(fh.readline(BLOCK_BYTES))
        start = fh.tell()
        sample = fh.read(1 << 20)
        size = os.fstat(fh.fileno()).st_size
    lines = sample.count(b"\n")
    total = round((size - start) * lines / len(sample)) if lines else 0
    top_k = log.meta.top_k

    def batches() -> Iterator[pa.RecordBatch]:
        for chunk in log.chunks():
            yield chunk_batch(chunk, log.req_ids)

    return RouteSource(path, "jsonl", meta, top_k, total, read_end_line(path), batches)


def chunk_batch(chunk: Any, req_ids: Sequence[str]) -> pa.RecordBatch:
    """A reader :class:`~moeprof.analysis.reader.RouteChunk` as a record batch of
    ``route_schema``; its ``req_id`` dictionary holds only the chunk's own requests."""
    import numpy as np

    from moeprof.columns import routes_batch
    from moeprof.schema import NO_STEP

    codes, inverse = np.unique(chunk.req, return_inverse=True)
    step = None if bool((chunk.step == NO_STEP).all()) else chunk.step
    return routes_batch(
        inverse.reshape(-1),
        [req_ids[c] for c in codes.tolist()],
        chunk.token_idx,
        chunk.layer,
        chunk.ids,
        chunk.weights,
        chunk.phase,
        step,
    )


def parquet_parts(path: Path) -> list[Path]:
    """The part files of a Parquet log, in log order (a single file: itself)."""
    from moeprof.columns import PART_RE

    if not path.is_dir():
        return [path]
    parts = sorted(
        (int(m.group(1)), p)
        for p in path.iterdir()
        if (m := PART_RE.fullmatch(p.name)) and p.is_file()
    )
    if not parts:
        raise ParquetLogError(f"{path}: no part-NNNNN.parquet files: not a Parquet log")
    return [p for _, p in parts]


def _parquet_source(path: Path) -> RouteSource:
    import pyarrow.parquet as pq

    from moeprof.columns import END_KEY, META_KEY, route_schema

    parts = parquet_parts(path)
    files = []
    for part in parts:
        try:
            files.append(pq.ParquetFile(part))
        except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError
            raise ParquetLogError(f"{part}: not a readable Parquet file ({e})") from None
    kv = _key_values(files[0])
    if META_KEY not in kv:
        raise ParquetLogError(f"{parts[0]}: no moeprof meta record ({META_KEY.decode()})")
    try:
        meta = json.loads(kv[META_KEY])
        top_k = int(meta["top_k"])
        expected = route_schema(top_k)
    except (ValueError, KeyError, TypeError) as e:
        raise ParquetLogError(f"{parts[0]}: the meta record is not valid ({e})") from None
    for part, f in zip(parts, files, strict=True):
        _check_schema(part, f.schema_arrow, expected)
    last = _key_values(files[-1])
    end = json.loads(last[END_KEY]) if END_KEY in last else None
    total = sum(f.metadata.num_rows for f in files)

    def batches() -> Iterator[pa.RecordBatch]:
        for part in parts:
            f = pq.ParquetFile(part)
            for batch in f.iter_batches(batch_size=BATCH_ROWS, use_threads=False):
                yield batch.replace_schema_metadata(None)

    return RouteSource(path, "parquet", meta, top_k, total, end, batches)


def _key_values(f: Any) -> dict[bytes, bytes]:
    """A Parquet file's footer key-value metadata (where the hook's sink adds the closing
    record when it closes the last part), with its Arrow schema's metadata."""
    kv = dict(f.schema_arrow.metadata or {})
    kv.update(f.metadata.metadata or {})
    return kv


def _check_schema(part: Path, schema: pa.Schema, expected: pa.Schema) -> None:
    names = schema.names
    if names != expected.names:
        raise ParquetLogError(
            f"{part}: columns {', '.join(names)}; a moeprof Parquet log has "
            f"{', '.join(expected.names)}"
        )
    for got, want in zip(schema, expected, strict=True):
        if not got.type.equals(want.type):
            raise ParquetLogError(f"{part}: column {got.name} is {got.type}, expected {want.type}")


# --------------------------------------------------------------------------- load


def load(
    paths: Paths,
    *,
    as_: Literal["arrow", "pandas"] = "arrow",
    on_progress: Progress | None = None,
) -> Any:
    """Every route of a log as one table: a pyarrow Table of ``route_schema(top_k)`` (or, with
    ``as_="pandas"``, a pandas DataFrame).

    ``paths`` is a JSONL log, a Parquet log (directory or file), a glob, or several of them (the
    logs of one run's data-parallel ranks: their rows are concatenated in the order given, and
    they must agree on ``top_k``). The meta record (of the first log), the closing record (when
    every log has one, of the first) and each source's records are attached to the table's
    schema metadata: read them with :func:`meta`, :func:`end` and :func:`sources`. A DataFrame
    carries the same in ``df.attrs["moeprof"]``.

    The whole log is held in memory (about 60 bytes a route for top-4); for logs larger than
    memory, read the Parquet form with DuckDB or Polars, or stream with :func:`open_source`.
    """
    if as_ not in ("arrow", "pandas"):
        raise ValueError(f"as_ must be 'arrow' or 'pandas', not {as_!r}")
    if as_ == "pandas":
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise ImportError(
                "moeprof.load(..., as_='pandas') needs pandas, which is not installed: "
                "pip install pandas (or load the pyarrow Table and convert it yourself)"
            ) from None
    import pyarrow as pa

    from moeprof.columns import END_KEY, META_KEY, route_schema

    sources = [open_source(p) for p in expand(paths)]
    top_ks = {s.top_k for s in sources}
    if len(top_ks) > 1:
        raise UserError(
            "the logs differ in top_k ("
            + ", ".join(f"{s.path}: {s.top_k}" for s in sources)
            + "): not one run"
        )
    batches: list[pa.RecordBatch] = []
    done = 0
    total = None if any(s.total is None for s in sources) else sum(s.total or 0 for s in sources)
    for s in sources:
        for batch in s.batches():
            batches.append(batch)
            done += batch.num_rows
            if on_progress is not None:
                on_progress(done, max(total, done) if total is not None else None)
    if on_progress is not None:
        on_progress(done, done)
    described = [{"path": str(s.path), "meta": s.meta, "end": s.end} for s in sources]
    metadata = {META_KEY: json.dumps(sources[0].meta), SOURCES_KEY: json.dumps(described)}
    if all(s.end is not None for s in sources):
        metadata[END_KEY] = json.dumps(sources[0].end)
    schema = route_schema(sources[0].top_k).with_metadata(metadata)
    table = pa.Table.from_batches(batches, schema=schema)
    if as_ == "arrow":
        return table
    df = table.to_pandas(use_threads=False)
    df.attrs["moeprof"] = {
        "meta": sources[0].meta,
        "end": metadata_end(table),
        "sources": described,
    }
    return df


def _metadata(obj: Any) -> dict[bytes, bytes]:
    schema = getattr(obj, "schema", None)
    if schema is not None and getattr(schema, "metadata", None) is not None:
        return dict(schema.metadata)
    attrs = getattr(obj, "attrs", {}).get("moeprof")
    if attrs is not None:
        out = {b"moeprof.meta": json.dumps(attrs["meta"]).encode()}
        if attrs.get("end") is not None:
            out[b"moeprof.end"] = json.dumps(attrs["end"]).encode()
        out[SOURCES_KEY] = json.dumps(attrs["sources"]).encode()
        return out
    raise ValueError("not a table from moeprof.load (no moeprof metadata)")


def meta(table: Any) -> dict[str, Any]:
    """The meta record of a table (or DataFrame) from :func:`load`, as a dict."""
    from moeprof.columns import META_KEY

    kv = _metadata(table)
    if META_KEY not in kv:
        raise ValueError("not a table from moeprof.load (no moeprof.meta metadata)")
    return json.loads(kv[META_KEY])


def metadata_end(table: Any) -> dict[str, Any] | None:
    """The closing record of a loaded table, None when a log was not closed cleanly."""
    from moeprof.columns import END_KEY

    kv = _metadata(table)
    return json.loads(kv[END_KEY]) if END_KEY in kv else None


end = metadata_end


def sources(table: Any) -> list[dict[str, Any]]:
    """Per log the table was loaded from: ``{"path", "meta", "end"}``."""
    kv = _metadata(table)
    return json.loads(kv[SOURCES_KEY]) if SOURCES_KEY in kv else []


# --------------------------------------------------------------------------- analyses


def analyze(
    paths: Paths,
    *,
    num_experts: int | None = None,
    top: int = 3,
    exclude_suspect: bool = False,
    layers: int | str | Iterable[int] | None = None,
    analyses: Iterable[str] = (),
    outputs: PathArg | None = None,
    tokenizer: str | None = None,
    ep_ranks: Sequence[int] | None = None,
    redundant_experts: int = 0,
) -> AnalysisReport:
    """What ``moeprof analyze`` prints, as dataclasses
    (:class:`~moeprof.analysis.analyze.AnalysisReport`; ``.to_dict()``/``.to_json()`` give
    ``analyze --json``). Several paths are analysed each and compared layer by layer.

    ``layers``: an index, a selection's text (``"0-11,23"``) or indices; None for all.
    ``analyses``: extra analyses by name (``"tokens"``, ``"cross_layer"``, ``"reuse"``,
    ``"ep"``; see :data:`moeprof.analysis.passes.ANALYSES`); ``"tokens"`` needs ``outputs``.
    """
    from moeprof.analysis import analyze as lib
    from moeprof.analysis.passes import PassOptions

    if layers is None or isinstance(layers, int | str):
        chosen = lib.chosen_layers(None if layers is None else str(layers))
    else:
        chosen = tuple(int(x) for x in layers)
    return lib.analyze_logs(
        list(expand(paths)),
        num_experts=num_experts,
        top=top,
        exclude_suspect=exclude_suspect,
        layers=chosen,
        analyses=list(analyses),
        options=PassOptions(
            outputs=None if outputs is None else Path(outputs),
            tokenizer=tokenizer,
            ep_ranks=None if ep_ranks is None else tuple(ep_ranks),
            redundant_experts=redundant_experts,
            top=top,
        ),
    )


def expert_counts(paths: Paths, *, num_experts: int | None = None) -> ExpertCounts:
    """Expert activation counts per logged layer and phase
    (:class:`~moeprof.analysis.counts.ExpertCounts`): ``.counts`` (layers x experts, int64),
    ``.by_phase["prefill"|"decode"|"unknown"]``, ``.routes`` per layer, ``.balance()`` (CV,
    max/mean, Gini, entropy ratio per layer) and ``.to_table()`` (a tidy pyarrow Table:
    layer, phase, expert, count). What ``moeprof counts`` prints.

    ``paths``: one log (JSONL, a Parquet file or directory), a glob, or the files of one run's
    data-parallel ranks (counted as one log); several unrelated logs are a
    :class:`~moeprof.errors.UserError`. The fast path: a Parquet log is read three columns at
    a time (layer, phase, topk_ids; ``bench/analysis_throughput.py``'s ``load-stats``), and
    only what those columns carry is checked; :func:`validate` checks the rest.
    ``num_experts``: the expert axis's length when the meta does not declare it (default: max
    id + 1). A bad route raises
    :class:`~moeprof.analysis.reader.LogError` (``file:line: reason``).
    """
    from moeprof.analysis.counts import count_experts
    from moeprof.analysis.sources import open_one

    return count_experts(open_one(expand(paths)), num_experts=num_experts)


def validate(
    path: PathArg, *, outputs: PathArg | None = None, max_errors: int = 20
) -> ValidationReport:
    """What ``moeprof validate`` prints, as a dataclass
    (:class:`~moeprof.analysis.validate.ValidationReport`; ``.valid`` is the verdict)."""
    from moeprof.analysis import validate as lib

    return lib.validate_log(
        Path(path), outputs=None if outputs is None else Path(outputs), max_errors=max_errors
    )
