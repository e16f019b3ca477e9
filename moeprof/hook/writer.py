"""Turning captured rows into JSONL, on a background thread, so the engine never waits on I/O.

The model's thread only appends a step (where its rows sit in the host ring, and the batch
layout) to a queue, without waking anyone; this thread looks at the queue every
``IDLE_FLUSH_SEC``, and once the engine is idle or the ring half full it waits for the
device-to-host copies, maps rows to requests, formats and writes.
A failing write (disk full) turns logging off with one error message: the engine keeps
serving, and the log keeps ending on a complete line. A log removed while it is written (the
file or its directory) is noticed at the next flush and at close (its link count drops to 0):
logging stops with one error, since whatever is written after that is lost. The log is held
under an exclusive ``flock`` for its whole life, so a second writer on the same path (another
engine, overwrite or not) is refused at start instead of interleaving into the same file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from moeprof.errors import HookRefusal
from moeprof.hook.ring import HostRing
from moeprof.hook.rows import RowMapper, StepBatch
from moeprof.layout import format_routes, route_template

logger = logging.getLogger("vllm.moeprof")
"""Under vLLM's logger, so the hook's lines reach the engine's output with vLLM's own."""

IDLE_FLUSH_SEC = 0.05
FORMAT_CHUNK = 256
"""Rows formatted between two hand-backs of the GIL (~0.4 ms of work)."""
FLUSH_ROUTES = 1 << 16
"""Routes rendered and written per piece when a flush has more."""


def _leave_compute_cores() -> None:
    """Move the calling thread onto CPUs its process is not bound to, if there are any.

    vLLM's CPU backend pins each worker process to the cores of its OpenMP compute threads
    (and keeps others free for the engine's own processes); a thread started in the worker
    inherits that pin, so without this the writer would format on the very core the model
    runs on. Where the process is not pinned (GPU workers) nothing changes.
    """
    if not hasattr(os, "sched_setaffinity"):
        return
    with contextlib.suppress(OSError):
        pinned = os.sched_getaffinity(0)
        others = set(range(os.cpu_count() or 0)) - pinned
        if others:
            os.sched_setaffinity(0, others)  # 0: on Linux, the calling thread only


class StepItem(NamedTuple):
    """What the model's thread hands over for one real step (a tuple: cheapest to build)."""

    batch: StepBatch
    start: int
    """Ring position of the step's first row (``batch.num_tokens`` rows)."""
    ready: Any
    """A CUDA event recorded after the device-to-host copy, or None when already on the host."""
    new_prompt_lens: dict[str, int]
    finished: Collection[str]
    step: int
    """The engine step's number (real steps since logging was armed), written as ``step``."""


class LogWriter:
    """Owns the file, the host ring and the thread; also the per-request state of mapping rows."""

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        layers: Sequence[int],
        top_k: int,
        external_id: Callable[[str], str],
        overwrite: bool,
        ring: HostRing,
    ) -> None:
        self.path = path
        self._fd: int | None = _open_locked(path, overwrite)
        self.ring = ring
        self._template = route_template(None, top_k)
        self._layers = np.asarray(layers, dtype=np.int64)
        """The logged layers in ring order: a token's row holds them side by side."""
        self.device_bytes = 0
        """The device buffer's size, for the closing stats line (set by the collector)."""
        self.cpu_sec = 0.0
        """CPU time the writer thread has used (formatting, mapping, writing)."""
        self._external_id = external_id
        self._req_json: dict[str, str] = {}
        self._mapper = RowMapper()
        self.routes_written = 0
        self.recomputed_skipped = 0
        self.failed = False
        self._size = 0
        self._items: deque[StepItem] = deque()
        self._submitted = 0
        self._wake = threading.Event()
        self._closed = False
        self._write(json.dumps(meta, separators=(",", ":")) + "\n")
        self._thread = threading.Thread(target=self._run, name="moeprof-writer", daemon=True)
        self._thread.start()

    def submit(self, item: StepItem) -> None:
        """Queue a step; called on the model's thread, so it wakes nobody."""
        if self.failed or self._closed:
            self.ring.release(item.start + item.batch.num_tokens)
            return
        self._items.append(item)
        self._submitted += 1

    def wake(self) -> None:
        """Have the thread look at the queue now instead of at its next tick."""
        self._wake.set()

    def close(self, timeout: float = 60.0) -> None:
        """Drain what is queued, then close the file; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)
        if not self.failed and not self._thread.is_alive():
            with contextlib.suppress(OSError):  # removed after the last flush
                self._check_not_removed()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        logger.info("moeprof: stats %s", json.dumps(self.stats(), separators=(", ", ": ")))

    def stats(self) -> dict[str, Any]:
        """What logging cost and produced, for the line the writer logs when it closes."""
        return {
            "routes": self.routes_written,
            "layers": len(self._layers),
            "writer_cpu_sec": round(self.cpu_sec, 6),
            "ring_bytes": self.ring.nbytes,
            "device_bytes": self.device_bytes,
            "steps": self._submitted,
            "recomputed_skipped": self.recomputed_skipped,
        }

    def _run(self) -> None:
        """Every ``IDLE_FLUSH_SEC`` (or when woken) decide whether to render what is queued.

        Rendering waits until the engine is idle (no step since the last look), the ring is
        half full, or the log is closed: on a busy machine the formatting then costs the
        engine no CPU time while it generates, and is done in fewer, larger calls. The GIL is
        handed back between chunks of ``FORMAT_CHUNK`` rows.
        """
        _leave_compute_cores()
        cpu_start = time.thread_time()
        try:
            self._loop()
        finally:
            self.cpu_sec = time.thread_time() - cpu_start

    def _loop(self) -> None:
        seen = 0
        while True:
            self._wake.wait(IDLE_FLUSH_SEC)
            self._wake.clear()
            closing = self._closed
            submitted = self._submitted
            idle = submitted == seen
            seen = submitted
            if closing or idle or self.ring.backlog * 2 >= self.ring.capacity:
                self._flush()
            if closing:
                return

    def _flush(self) -> None:
        """Render every queued step and write it, ``FLUSH_ROUTES`` at a time; free the rows."""
        items: list[StepItem] = []
        with contextlib.suppress(IndexError):
            while True:
                items.append(self._items.popleft())
        if not items:
            return
        last = items[-1]
        end = last.start + last.batch.num_tokens
        try:
            if self.failed or self._check_not_removed():
                return
            if last.ready is not None:
                last.ready.synchronize()  # copies run in stream order: the last one ends last
            group: list[StepItem] = []
            routes = 0
            for item in items:
                group.append(item)
                routes += item.batch.num_tokens * len(self._layers)
                if routes >= FLUSH_ROUTES:
                    self._write(self._render(group))
                    group, routes = [], 0
            if group:
                self._write(self._render(group))
        except Exception as e:  # never let logging take the engine down
            self._fail(e)
        finally:
            self.ring.release(end)

    def _render(self, items: list[StepItem]) -> str:
        """The route lines of ``items``: per token, one line per logged layer, in step order."""
        capacity = self.ring.capacity
        mapped = self._mapper.map(
            (it.batch, it.start % capacity, it.new_prompt_lens, it.finished, it.step)
            for it in items
        )
        if mapped.skipped:
            if not self.recomputed_skipped:
                logger.warning(
                    "moeprof: vLLM preempted a request and recomputes its tokens; "
                    "tokens recomputed after preemption are logged once, not again"
                )
            self.recomputed_skipped += mapped.skipped
        num_layers = len(self._layers)
        routes = len(mapped.rows) * num_layers
        seg_json = np.array([self._json_id(r) for r in mapped.seg_req], dtype=object)
        req_json = np.repeat(seg_json, mapped.seg_len * num_layers)
        token_idx = np.repeat(mapped.token_idx, num_layers)
        prefill = np.repeat(mapped.prefill, num_layers)
        step = np.repeat(mapped.step, num_layers)
        layer = np.tile(self._layers, len(mapped.rows))
        k = self.ring.ids_np.shape[2]
        ids = self.ring.ids_np[mapped.rows].reshape(routes, k)
        weights = self.ring.weights_np[mapped.rows].reshape(routes, k)
        parts = []
        for a in range(0, routes, FORMAT_CHUNK):
            b = a + FORMAT_CHUNK
            parts.append(
                format_routes(
                    self._template,
                    req_json[a:b],
                    token_idx[a:b],
                    ids[a:b],
                    weights[a:b],
                    prefill[a:b],
                    layer=layer[a:b],
                    step=step[a:b],
                )
            )
            time.sleep(0)  # hand the GIL to the model's thread if it is waiting for it
        text = "".join(parts)
        for it in items:
            for rid in it.finished:
                self._req_json.pop(rid, None)
        self.routes_written += routes
        return text

    def _json_id(self, rid: str) -> str:
        text = self._req_json.get(rid)
        if text is None:
            text = self._req_json[rid] = json.dumps(self._external_id(rid))
        return text

    def _write(self, text: str) -> None:
        """Write whole lines or nothing: a failed write is cut back to the last full line."""
        assert self._fd is not None
        raw = text.encode()
        data = memoryview(raw)
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(raw)

    def _check_not_removed(self) -> bool:
        """Whether the log has lost its last name (file or directory removed); says so once.

        Writes to such a file succeed but reach nothing anyone can read, so logging stops.
        """
        if self._fd is None or os.fstat(self._fd).st_nlink > 0:
            return False
        self.failed = True
        logger.error(
            "moeprof: the log file %s was removed (or its directory): logging stopped after "
            "%d routes; the engine goes on",
            self.path,
            self.routes_written,
        )
        return True

    def _fail(self, exc: Exception) -> None:
        self.failed = True
        logger.error(
            "moeprof: logging to %s stopped after %d routes: %s: %s (the engine goes on)",
            self.path,
            self.routes_written,
            type(exc).__name__,
            exc,
        )


def _open_locked(path: Path, overwrite: bool) -> int:
    """Open the log for writing under an exclusive lock held until it is closed.

    The file is truncated (when overwriting) only once the lock is held, so a log another
    process is still writing is left untouched when this one is refused.
    """
    flags = os.O_WRONLY | os.O_CREAT | (0 if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise HookRefusal(
            f"{path} already exists; remove it or set VLLM_LOG_MOE_OVERWRITE=1"
        ) from None
    except OSError as e:
        raise HookRefusal(f"cannot open {path} for writing: {e}") from None
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
        logger.warning(
            "moeprof: cannot lock %s (%s); a second writer would not be refused", path, e
        )
    if overwrite:
        try:
            os.ftruncate(fd, 0)
        except OSError as e:
            os.close(fd)
            raise HookRefusal(f"cannot open {path} for writing: {e}") from None
    return fd


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
