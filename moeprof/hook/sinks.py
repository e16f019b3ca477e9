"""Where the writer thread puts routes: a JSONL file or a Parquet directory.

The writer (:mod:`moeprof.hook.writer`) maps captured rows to requests once, into columns
(:class:`RouteColumns`); a sink only writes them. The sink is chosen by the log path:
``VLLM_LOG_MOE=routes.parquet`` (a path ending in ``.parquet``) gets :class:`ParquetSink`, any
other path :class:`JsonlSink`. Both hold an exclusive ``flock`` for their whole life, so a
second writer on the same log is refused at start with one line.

JSONL (:class:`JsonlSink`): line 1 is the meta record, then one route line per route
(:mod:`moeprof.layout`), then, when logging ends cleanly, the closing record
(:class:`moeprof.schema.EndRecord`, ``{"type":"end",...}``) as the last line. Text is written
in pieces of whole lines (``PIECE_BYTES``); a piece the disk cannot take is cut back to its
last whole line, so the routes that fit are kept and the file always ends on a whole line (on a
full disk ``END_RESERVE`` bytes more go, so that the closing record still fits).

Parquet (:class:`ParquetSink`): the directory layout of :mod:`moeprof.columns`. Routes go
into an open part under its hidden temporary name; the part is closed (footer written, then
renamed to ``part-NNNNN.parquet``) every ``PART_ROUTES`` routes or ``part_sec`` seconds
(``VLLM_LOG_MOE_PART_SEC``, default ``PART_SEC``), whichever comes first. What a directory
means:

- The path may not exist yet (it is created), or be an empty directory.
- A directory that holds anything else is refused unless ``VLLM_LOG_MOE_OVERWRITE=1``; with
  overwrite, only the files moeprof writes there (parts ``part-NNNNN.parquet`` and temporary
  ``.part-NNNNN.parquet.tmp``) are removed, after the lock is taken; other files are left.
- A regular file at the path is refused, overwrite or not.
- The lock is ``.moeprof.lock`` in the directory (hidden: Parquet readers skip it).

What a crash can lose: JSONL, the routes not yet written (at most the steps queued in the host
ring and the one piece being written; the file ends on a whole line). Parquet, in addition,
the open part (at most ``PART_ROUTES`` routes or ``part_sec`` seconds of routes); every closed
part stays readable and a half-written part never carries a part's name.

The closing record is written by :meth:`close` with a record: the writer does that when the
engine shuts down cleanly (also after logging stopped on a full disk, where it may fit). JSONL:
the last line. Parquet: the ``moeprof.end`` key-value metadata of the last part (a part with
no rows when none is open).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from moeprof.errors import HookRefusal
from moeprof.layout import route_template
from moeprof.route_text import route_bytes

FORMAT_CHUNK = 2048
"""Routes formatted as JSON between two hand-backs of the GIL (about 1 ms of work, most of it in
numpy loops that release the GIL; the longest hold is dropping the padding, ~0.3 ms). Smaller
chunks cost more per route: numpy's per-call overhead (``bench/writer_cost.py``)."""
PIECE_BYTES = 1 << 16
"""JSONL text is written in pieces of whole lines of at least this size (the last one less)."""
ARROW_CHUNK = 1 << 15
"""Routes turned into one Arrow record batch between two hand-backs of the GIL."""
ROW_GROUP_ROUTES = 1 << 17
"""Routes buffered in memory (as Arrow batches) before they are written as a row group."""
PART_ROUTES = 1 << 20
"""A Parquet part is closed once it holds this many routes ..."""
PART_SEC = 10.0
"""... or once it has been open this many seconds, whichever comes first."""
END_RESERVE = 8192
"""Bytes a full disk's cut goes back beyond the last whole line, so that the closing record
fits: about 48 route lines, counted as dropped. At least two 4 KiB blocks, because file systems
give back only whole blocks: on tmpfs, a 1 KiB cut left the closing line no room."""
LOCK_NAME = ".moeprof.lock"
_TEMP_PART_RE = re.compile(r"\.part-(\d{5,})\.parquet\.tmp")


class RouteColumns(NamedTuple):
    """Routes mapped to requests, as columns (one entry per route unless said otherwise)."""

    seg_req: list[str]
    """The request id the user holds, per run of consecutive routes of one request ..."""
    seg_routes: np.ndarray
    """... and how many routes that run has."""
    token_idx: np.ndarray
    layer: np.ndarray
    ids: np.ndarray
    """(n, top_k) expert ids."""
    weights: np.ndarray
    """(n, top_k) float32 router weights."""
    prefill: np.ndarray
    """True for prompt tokens."""
    step: np.ndarray

    @property
    def num_routes(self) -> int:
        return int(self.ids.shape[0])


def pause() -> None:
    """Hand the GIL to the model's thread if it waits for it.

    ``time.sleep(1e-6)`` rather than ``sleep(0)``: a real (if tiny) sleep lets the waiting
    thread take the GIL and run, where ``sleep(0)`` often gets it straight back.
    """
    time.sleep(1e-6)


class Sink(Protocol):
    path: Path
    routes: int
    """Routes a reader finds in the log (for Parquet: once the open part is closed)."""

    def write(self, cols: RouteColumns) -> None:
        """Write routes; OSError on failure, after which :attr:`routes` is exact again."""

    def tick(self, now: float) -> None:
        """Periodic housekeeping (Parquet: close a part that has been open long enough)."""

    def removed(self) -> bool:
        """Whether the log lost its last name (file or directory removed)."""

    def close(self, end: dict[str, Any] | None) -> str | None:
        """Close the log, writing ``end`` as its closing record when given; returns why the
        record could not be written, or None."""


def open_sink(
    path: Path, meta: dict[str, Any], top_k: int, overwrite: bool, part_sec: float = PART_SEC
) -> Sink:
    """The sink for ``path``: Parquet for a ``.parquet`` path, JSONL otherwise."""
    if path.suffix == ".parquet":
        return ParquetSink(path, meta, top_k, overwrite, part_sec)
    return JsonlSink(path, meta, top_k, overwrite)


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"))


# --- JSONL --------------------------------------------------------------------------------------


class JsonlSink:
    """A JSONL log: the meta line, whole route lines, the closing line."""

    def __init__(self, path: Path, meta: dict[str, Any], top_k: int, overwrite: bool) -> None:
        self.path = path
        self.routes = 0
        self._template = route_template(None, top_k)
        self._json_of: dict[str, str] = {}
        self._fd: int | None = _open_locked(path, overwrite)
        self._size = 0
        self._routes_start = 0
        """Where the route lines start (the meta line's end); 0 until it is written."""
        try:
            self._write_piece((_dumps(meta) + "\n").encode())
        except OSError as e:
            self._close_fd()
            raise HookRefusal(f"cannot write {path}: {e}") from None
        self._routes_start = self._size

    def write(self, cols: RouteColumns) -> None:
        n = cols.num_routes
        if n == 0:
            return
        if len(self._json_of) > 4096:  # ids of finished requests: keep the cache small
            self._json_of.clear()
        # the ids' JSON text (ASCII: json.dumps escapes the rest) as bytes, one per route
        seg_json = np.array([self._json(r) for r in cols.seg_req], dtype="S")
        req_json = np.repeat(seg_json, cols.seg_routes)
        parts: list[bytes] = []
        size = 0
        for a in range(0, n, FORMAT_CHUNK):
            b = a + FORMAT_CHUNK
            raw = route_bytes(
                self._template,
                req_json[a:b],
                cols.token_idx[a:b],
                cols.ids[a:b],
                cols.weights[a:b],
                cols.prefill[a:b],
                layer=cols.layer[a:b],
                step=cols.step[a:b],
            )
            parts.append(raw)
            size += len(raw)
            if size >= PIECE_BYTES:
                self._write_lines(b"".join(parts))
                parts, size = [], 0
            pause()
        if parts:
            self._write_lines(b"".join(parts))

    def _json(self, req: str) -> str:
        text = self._json_of.get(req)
        if text is None:
            text = self._json_of[req] = json.dumps(req)
        return text

    def _write_lines(self, raw: bytes) -> None:
        self._write_piece(raw)
        self.routes += raw.count(b"\n")

    def _write_piece(self, raw: bytes, reserve: bool = True) -> None:
        """Write ``raw`` (whole lines); when the disk takes only part of it, keep the whole
        lines that fit, cut the rest off, count the route lines kept, and raise.

        On a full disk (with ``reserve``) the cut goes back ``END_RESERVE`` bytes further (a
        few route lines, counted as dropped), so that the closing record still fits in the
        space the file already holds.
        """
        assert self._fd is not None
        data = memoryview(raw)
        done = 0
        try:
            while done < len(raw):
                done += os.write(self._fd, data[done:])
        except OSError as e:
            keep = raw.rfind(b"\n", 0, done) + 1
            lines = raw.count(b"\n", 0, keep)
            size = self._size + keep
            if reserve and e.errno in (errno.ENOSPC, errno.EDQUOT) and self._routes_start:
                size, cut = self._room_for_end(size)
                lines -= cut
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
                os.lseek(self._fd, size, os.SEEK_SET)  # the next write (the end line) goes here
            self._size = size
            self.routes += lines
            raise
        self._size += len(raw)

    def _room_for_end(self, size: int) -> tuple[int, int]:
        """A file size at least ``END_RESERVE`` bytes below ``size`` that ends on a whole line
        (never inside the meta line), and how many lines that cuts off."""
        assert self._fd is not None
        floor = self._routes_start
        target = max(floor, size - END_RESERVE)
        start = max(floor, target - 2 * END_RESERVE)
        try:
            tail = os.pread(self._fd, size - start, start)
        except OSError:
            return size, 0
        if len(tail) != size - start:
            return size, 0
        at = tail.rfind(b"\n", 0, target - start)
        new_size = start + at + 1 if at >= 0 else floor
        return new_size, tail.count(b"\n", new_size - start)

    def tick(self, now: float) -> None:
        return None

    def removed(self) -> bool:
        return self._fd is not None and os.fstat(self._fd).st_nlink == 0

    def close(self, end: dict[str, Any] | None) -> str | None:
        problem = None
        if end is not None and self._fd is not None:
            try:
                self._write_piece((_dumps(end) + "\n").encode(), reserve=False)
            except OSError as e:
                problem = f"{type(e).__name__}: {e}"
        self._close_fd()
        return problem

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_locked(path: Path, overwrite: bool) -> int:
    """Open the JSONL log for writing under an exclusive lock held until it is closed.

    The file is truncated (when overwriting) only once the lock is held, so a log another
    process is still writing is left untouched when this one is refused.
    """
    flags = os.O_RDWR | os.O_CREAT | (0 if overwrite else os.O_EXCL)  # read: see _room_for_end
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise HookRefusal(
            f"{path} already exists; remove it or set VLLM_LOG_MOE_OVERWRITE=1"
        ) from None
    except OSError as e:
        raise HookRefusal(f"cannot open {path} for writing: {e}") from None
    _lock(fd, path)
    if overwrite:
        try:
            os.ftruncate(fd, 0)
        except OSError as e:
            os.close(fd)
            raise HookRefusal(f"cannot open {path} for writing: {e}") from None
    return fd


def _lock(fd: int, path: Path) -> None:
    """Take an exclusive ``flock`` on ``fd`` or refuse (closing ``fd``) with one line."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        who = f"another process (pid {holder})" if holder else "another process"
        raise HookRefusal(
            f"{path} is being written by {who}; stop it or choose another log path"
        ) from None
    except OSError as e:  # a file system without locks: log, unguarded
        import logging

        logging.getLogger("vllm.moeprof").warning(
            "moeprof: cannot lock %s (%s); a second writer would not be refused", path, e
        )


def _lock_holder(fd: int) -> int | None:
    """The pid holding a ``flock`` on ``fd``'s file, from Linux's ``/proc/locks``; else None."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if fields[1] == "FLOCK" and fields[3] == "WRITE" and fields[5] == inode:
                pid = int(fields[4])
                return pid if pid > 0 else None
    return None


# --- Parquet ------------------------------------------------------------------------------------


def is_moeprof_part(name: str) -> bool:
    """Whether a file name in a Parquet log directory is one moeprof writes (a part, complete
    or temporary)."""
    from moeprof.columns import PART_RE

    return bool(PART_RE.fullmatch(name) or _TEMP_PART_RE.fullmatch(name))


def parquet_dir_problem(path: Path, overwrite: bool) -> str | None:
    """Why ``path`` cannot become a Parquet log directory, or None (see the module docstring)."""
    if path.is_symlink() and not path.exists():
        return f"{path} is a dangling symbolic link"
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a directory (a Parquet log is a directory of parts)"
    if path.is_dir():
        entries = [e for e in os.listdir(path) if e != LOCK_NAME]
        if entries and not overwrite:
            return (
                f"{path} already exists and is not empty; remove it or set "
                "VLLM_LOG_MOE_OVERWRITE=1 (which replaces only moeprof's part files)"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            return f"cannot write {path}: the directory is not writable"
    return None


class ParquetSink:
    """A Parquet log directory of parts, each complete once it has its name."""

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        top_k: int,
        overwrite: bool,
        part_sec: float = PART_SEC,
        part_routes: int | None = None,
    ) -> None:
        import pyarrow as pa

        from moeprof.columns import META_KEY, route_schema

        self.path = path
        self.routes = 0
        self.part_sec = part_sec
        self.part_routes = PART_ROUTES if part_routes is None else part_routes
        self._pa = pa
        self._schema = route_schema(top_k).with_metadata({META_KEY: _dumps(meta).encode()})
        self._dir_fd, self._lock_fd = self._open_dir(path, overwrite)
        self._index = 0
        self._closed_routes = 0
        """Routes in closed (renamed) parts."""
        self._part: Any = None
        """The open part's ``ParquetWriter``, or None."""
        self._part_routes = 0
        self._part_opened = 0.0
        self._pending: list[Any] = []
        self._pending_routes = 0

    @staticmethod
    def _open_dir(path: Path, overwrite: bool) -> tuple[int, int]:
        problem = parquet_dir_problem(path, overwrite)
        if problem is not None:
            raise HookRefusal(problem)
        try:
            path.mkdir(exist_ok=True)
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise HookRefusal(f"cannot create {path}: {e}") from None
        try:
            lock_fd = os.open(path / LOCK_NAME, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError as e:
            os.close(dir_fd)
            raise HookRefusal(f"cannot write in {path}: {e}") from None
        try:
            _lock(lock_fd, path)
        except HookRefusal:
            os.close(dir_fd)
            raise
        names = os.listdir(path)
        if any(n != LOCK_NAME for n in names) and not overwrite:  # filled since it was checked
            os.close(lock_fd)
            os.close(dir_fd)
            raise HookRefusal(
                f"{path} already exists and is not empty; remove it or set VLLM_LOG_MOE_OVERWRITE=1"
            )
        for name in names:
            if is_moeprof_part(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path / name)
        return dir_fd, lock_fd

    # writing

    def write(self, cols: RouteColumns) -> None:
        from moeprof.columns import routes_batch

        n = cols.num_routes
        if n == 0:
            return
        # one run per token in decode steps: map the runs to codes at C speed (dict, map)
        names = list(dict.fromkeys(cols.seg_req))
        code_of = {name: i for i, name in enumerate(names)}
        seg_code = np.fromiter(map(code_of.__getitem__, cols.seg_req), np.int32, len(cols.seg_req))
        req_code = np.repeat(seg_code, cols.seg_routes)
        phase = np.logical_not(cols.prefill).view(np.int8)  # phase codes: prefill 0, decode 1
        try:
            a = 0
            while a < n:
                room = self.part_routes - (self._part_routes if self._part is not None else 0)
                b = min(n, a + ARROW_CHUNK, a + room)  # a part closes at exactly part_routes
                if a:
                    pause()
                batch = routes_batch(
                    req_code[a:b],
                    names,
                    cols.token_idx[a:b],
                    cols.layer[a:b],
                    cols.ids[a:b],
                    cols.weights[a:b],
                    phase[a:b],
                    cols.step[a:b],
                )
                self._add(batch)
                a = b
        except BaseException:
            self._abandon_part()
            raise

    def _add(self, batch: Any) -> None:
        if self._part is None:
            self._open_part()
        self._pending.append(batch)
        self._pending_routes += batch.num_rows
        self._part_routes += batch.num_rows
        self.routes += batch.num_rows
        if self._part_routes >= self.part_routes:
            self._close_part(None)
        elif self._pending_routes >= ROW_GROUP_ROUTES:
            self._write_pending()

    def _open_part(self) -> None:
        import pyarrow.parquet as pq

        from moeprof.columns import WRITE_OPTIONS, temp_part_name

        self._part = pq.ParquetWriter(
            str(self.path / temp_part_name(self._index)),
            self._schema,
            **WRITE_OPTIONS,
        )
        self._part_routes = 0
        self._part_opened = time.monotonic()

    def _write_pending(self) -> None:
        if self._pending:
            self._part.write_table(self._pa.Table.from_batches(self._pending))
            self._pending, self._pending_routes = [], 0

    def _close_part(self, end: dict[str, Any] | None) -> None:
        """Write the open part's footer (with ``end`` when given) and give it its name."""
        from moeprof.columns import END_KEY, part_name, temp_part_name

        try:
            self._write_pending()
            if end is not None:
                self._part.add_key_value_metadata({END_KEY: _dumps(end).encode()})
            self._part.close()
            os.rename(self.path / temp_part_name(self._index), self.path / part_name(self._index))
        except BaseException:
            self._abandon_part()
            raise
        self._part = None
        self._index += 1
        self._closed_routes += self._part_routes
        self._part_routes = 0

    def _abandon_part(self) -> None:
        """Drop the open part (a write failed): its file goes, the closed parts stay."""
        from moeprof.columns import temp_part_name

        if self._part is not None:
            with contextlib.suppress(Exception):
                self._part.close()
        self._part = None
        self._pending, self._pending_routes = [], 0
        self._part_routes = 0
        with contextlib.suppress(OSError):
            os.unlink(self.path / temp_part_name(self._index))
        self.routes = self._closed_routes

    def tick(self, now: float) -> None:
        if self._part is not None and now - self._part_opened >= self.part_sec:
            self._close_part(None)

    def removed(self) -> bool:
        return os.fstat(self._dir_fd).st_nlink == 0

    def close(self, end: dict[str, Any] | None) -> str | None:
        problem = None
        try:
            if end is not None:
                if self._part is None:
                    self._open_part()  # a part with no rows, to carry the closing record
                self._close_part(end)
            elif self._part is not None:
                self._close_part(None)
        except Exception as e:
            problem = f"{type(e).__name__}: {e}"
        for fd in (self._lock_fd, self._dir_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._lock_fd = self._dir_fd = -1
        return problem


def part_names(path: Path) -> Sequence[str]:
    """The closed parts of a Parquet log directory, in log order."""
    from moeprof.columns import PART_RE

    return sorted(n for n in os.listdir(path) if PART_RE.fullmatch(n))


__all__ = [
    "JsonlSink",
    "ParquetSink",
    "RouteColumns",
    "Sink",
    "open_sink",
    "parquet_dir_problem",
    "part_names",
    "pause",
]
