"""Turning captured rows into log records, on a background thread, so the engine never waits.

The thread runs in vLLM's worker itself (the default), or in the writer process
(``VLLM_LOG_MOE_WRITER=process``: :mod:`moeprof.hook.writer_process`), fed by the worker's
messages. The
model's thread only appends a step (where its rows sit in the host ring, and the batch
layout) to a queue, without waking anyone. This thread looks at the queue every
``IDLE_FLUSH_SEC``; it renders what is queued once the engine is idle, the ring is half full,
or the oldest queued step has waited ``MAX_LAG_SEC`` (so under constant load too every step is
written within about ``MAX_LAG_SEC + IDLE_FLUSH_SEC`` plus the time to render it). Rendering
waits for the device-to-host copies, maps rows to requests once (:class:`RowMapper`, into
:class:`~moeprof.hook.sinks.RouteColumns`) and hands the columns to the sink
(:mod:`moeprof.hook.sinks`: JSONL or Parquet), which formats in small slices and hands the GIL
back between them, so the model's thread is not starved.

Invariants:
    - A failing write (disk full) stops logging with one error line that gives the routes on
      disk and the routes dropped; the engine keeps serving, the log keeps every route that
      fit and ends on a whole line (JSONL) or on complete parts (Parquet).
    - A log removed while it is written (the file or its directory) is noticed at the next
      flush and at close (its link count drops to 0): logging stops with one error.
    - The log is locked for its whole life: a second writer is refused at start.
    - :meth:`LogWriter.close` (clean engine shutdown, atexit) drains what is queued and writes
      the closing record (:class:`moeprof.schema.EndRecord`): routes on disk, routes dropped,
      why logging stopped (None when it did not), requests with routes, requests not reported
      finished at close, steps. A crash or SIGKILL writes none: the log is then "not closed
      cleanly", and it has lost at most the steps still queued (and, for Parquet, the open
      part).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:  # the writer process has no torch: it reads the ring through numpy
    from moeprof.hook.ring import HostRing, RingView
from moeprof.hook.rows import RowMapper, StepBatch
from moeprof.hook.sinks import PART_SEC, RouteColumns, Sink, open_sink, pause
from moeprof.layout import format_routes, route_template

__all__ = ["LogWriter", "StepItem", "format_routes", "route_template"]

logger = logging.getLogger("vllm.moeprof")
"""Under vLLM's logger, so the hook's lines reach the engine's output with vLLM's own."""

IDLE_FLUSH_SEC = 0.05
"""How often the writer thread looks at the queue."""
MAX_LAG_SEC = 0.2
"""The longest a queued step waits for the engine to go idle before it is rendered anyway."""
FLUSH_ROUTES = 1 << 16
"""Routes mapped and handed to the sink per piece when a flush has more."""


def leave_compute_cores(pid: int = 0) -> None:
    """Move a thread or process (``pid``; 0: the calling thread) onto the CPUs the calling
    thread is not bound to, if there are any.

    vLLM's CPU backend pins each worker process to the cores of its OpenMP compute threads
    (and keeps others free for the engine's own processes); a thread started in the worker
    inherits that pin, so without this the writer would format on the very core the model
    runs on. The writer process inherits it too: the worker moves it the moment it starts.
    Where the worker is not pinned (GPU workers) nothing changes.
    """
    if not hasattr(os, "sched_setaffinity"):
        return
    with contextlib.suppress(OSError):
        pinned = os.sched_getaffinity(0)
        others = set(range(os.cpu_count() or 0)) - pinned
        if others:
            os.sched_setaffinity(pid, others)  # on Linux, pid 0 is the calling thread only


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
    """Owns the sink, the host ring and the thread; also the per-request state of mapping rows.

    The sink is chosen by the path (:func:`moeprof.hook.sinks.open_sink`): a ``.parquet``
    path is a Parquet log directory, anything else a JSONL file.
    """

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        layers: Sequence[int],
        top_k: int,
        external_id: Callable[[str], str],
        overwrite: bool,
        ring: HostRing | RingView,
        part_sec: float = PART_SEC,
        cpu_clock: Callable[[], float] = time.thread_time,
        in_worker: bool = True,
    ) -> None:
        """``cpu_clock``: what the writer's CPU time is read from (``time.process_time`` in
        the writer process, where everything the process does is the writer's);
        ``in_worker``: the thread runs inside vLLM's worker, so it leaves the worker's compute
        cores (:func:`leave_compute_cores`; the writer process has left them already)."""
        self.path = path
        self._sink: Sink = open_sink(path, meta, top_k, overwrite, part_sec)
        self.ring = ring
        self._layers = np.asarray(layers, dtype=np.int64)
        """The logged layers in ring order: a token's row holds them side by side."""
        self.device_bytes = 0
        """The device buffer's size, for the closing stats line (set by the collector)."""
        self.cpu_sec = 0.0
        """CPU time the writer thread has used (mapping, formatting, writing)."""
        self._cpu_clock = cpu_clock
        self._in_worker = in_worker
        self._write_end = True
        self._external_id = external_id
        self._ext_of: dict[str, str] = {}
        self._mapper = RowMapper()
        self._mapped = 0
        """Routes mapped (or given up) by the writer thread; only that thread adds to it."""
        self._refused = 0
        """Routes of steps refused once logging stopped; only the model's thread adds to it."""
        self.recomputed_skipped = 0
        self.failed = False
        self.stopped: str | None = None
        """Why logging stopped before the engine did, or None."""
        self._live: set[str] = set()
        """Requests with routes in the log that the engine has not reported finished."""
        self.requests = 0
        """Requests with at least one route in the log."""
        self._items: deque[StepItem] = deque()
        self._submitted = 0
        self._wake = threading.Event()
        self._closed = False
        self._halted = False
        self._thread = threading.Thread(target=self._run, name="moeprof-writer", daemon=True)
        self._thread.start()

    @property
    def routes_written(self) -> int:
        """Routes in the log: on disk (Parquet: on disk once the open part closes)."""
        return self._sink.routes

    @property
    def captured(self) -> int:
        """Routes handed over by the engine (recomputed tokens not counted): written or not."""
        return self._mapped + self._refused

    @property
    def dropped(self) -> int:
        """Routes handed over but not in the log (logging stopped early)."""
        return max(0, self.captured - self._sink.routes)

    def submit(self, item: StepItem) -> None:
        """Queue a step; called on the model's thread, so it wakes nobody."""
        if self.failed or self._closed or self._halted:
            self.ring.release(item.start + item.batch.num_tokens)
            self._refused += item.batch.num_tokens * len(self._layers)
            self._submitted += 1
            return
        self._items.append(item)
        self._submitted += 1

    def drop(self, num_tokens: int) -> None:
        """Count a step that is not logged because logging has stopped (model's thread)."""
        self._refused += num_tokens * len(self._layers)
        self._submitted += 1

    def halt(self, reason: str) -> None:
        """Stop logging for a reason found outside the writer (model's thread); what is
        queued is still written, and the closing record says ``reason``."""
        if self.stopped is None:
            self.stopped = reason
        self._halted = True

    def wake(self) -> None:
        """Have the thread look at the queue now instead of at its next tick."""
        self._wake.set()

    def close(self, timeout: float = 60.0, *, end_record: bool = True) -> None:
        """Drain what is queued, write the closing record and close the log; safe to call
        more than once. ``end_record=False``: close without the closing record (the engine
        went away without closing the log, so the log must not read as closed cleanly)."""
        if self._closed:
            return
        self._write_end = end_record
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():  # the writer is stuck (a hung disk): leave the log to it
            logger.error(
                "moeprof: the writer did not finish in %.0f s; %s is not closed", timeout, self.path
            )
            return
        logger.info("moeprof: stats %s", json.dumps(self.stats(), separators=(", ", ": ")))

    def _finish(self) -> None:
        """On the writer thread, after the last flush: the closing record, then the log is
        closed (so the writer's CPU time includes closing the last part)."""
        if not self.failed:
            with contextlib.suppress(OSError):  # removed after the last flush
                self._check_not_removed()
        for item in self._items:  # queued after the thread's last look
            self._mapped += item.batch.num_tokens * len(self._layers)
            self.ring.release(item.start + item.batch.num_tokens)
        self._items.clear()
        removed = self.stopped == "log removed"  # said once already; nothing to write to
        problem = self._sink.close(self.end_record() if self._write_end and not removed else None)
        if problem is not None and self._write_end and not removed:
            logger.error(
                "moeprof: the closing record could not be written to %s: %s; the log reads "
                "as not closed cleanly",
                self.path,
                problem,
            )

    def end_record(self) -> dict[str, Any]:
        """The closing record (:class:`moeprof.schema.EndRecord`) as of now."""
        return {
            "type": "end",
            "routes": self._sink.routes,
            "dropped": self.dropped,
            "stopped": self.stopped,
            "requests": self.requests,
            # vLLM tells the worker that a request finished only at its next step, so the
            # requests that finished in the last steps before a clean close count here too:
            # an upper bound on the requests cut off by the shutdown (0: none was)
            "requests_unfinished": len(self._live),
            "steps": self._submitted,
            "closed": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    def stats(self) -> dict[str, Any]:
        """What logging cost and produced, for the line the writer logs when it closes."""
        return {
            "routes": self.routes_written,
            "dropped": self.dropped,
            "layers": len(self._layers),
            "writer_cpu_sec": round(self.cpu_sec, 6),
            "ring_bytes": self.ring.nbytes,
            "device_bytes": self.device_bytes,
            "steps": self._submitted,
            "recomputed_skipped": self.recomputed_skipped,
        }

    def _run(self) -> None:
        if self._in_worker:
            leave_compute_cores()
        cpu_start = self._cpu_clock()
        try:
            self._loop()
        finally:
            self.cpu_sec = self._cpu_clock() - cpu_start

    def _loop(self) -> None:
        """Every ``IDLE_FLUSH_SEC`` (or when woken) decide whether to render what is queued.

        Rendering happens when the engine is idle (no step since the last look), the ring is
        half full, the oldest queued step has waited ``MAX_LAG_SEC``, or the log is closing.
        """
        seen = 0
        waiting_since: float | None = None
        while True:
            self._wake.wait(IDLE_FLUSH_SEC)
            self._wake.clear()
            closing = self._closed
            now = time.monotonic()
            submitted = self._submitted
            idle = submitted == seen
            seen = submitted
            if not self._items:
                waiting_since = None
            elif waiting_since is None:
                waiting_since = now
            late = waiting_since is not None and now - waiting_since >= MAX_LAG_SEC
            if closing or idle or late or self.ring.backlog * 2 >= self.ring.capacity:
                self._flush()
                waiting_since = None
            if not self.failed:
                try:
                    self._sink.tick(time.monotonic())
                except Exception as e:
                    self._fail(e)
            if closing:
                self._finish()
                return

    def _flush(self) -> None:
        """Map every queued step and write it, ``FLUSH_ROUTES`` at a time; free the rows."""
        items: list[StepItem] = []
        with contextlib.suppress(IndexError):
            while True:
                items.append(self._items.popleft())
        if not items:
            return
        last = items[-1]
        end = last.start + last.batch.num_tokens
        num_layers = len(self._layers)
        try:
            if self.failed or self._check_not_removed():
                self._mapped += sum(it.batch.num_tokens for it in items) * num_layers
                return
            if last.ready is not None:
                last.ready.synchronize()  # copies run in stream order: the last one ends last
            group: list[StepItem] = []
            routes = 0
            for i, item in enumerate(items):
                group.append(item)
                routes += item.batch.num_tokens * num_layers
                if routes >= FLUSH_ROUTES or i == len(items) - 1:
                    try:
                        self._write(group)
                    except Exception:
                        rest = items[i + 1 :]
                        self._mapped += sum(it.batch.num_tokens for it in rest) * num_layers
                        raise
                    group, routes = [], 0
        except Exception as e:  # never let logging take the engine down
            self._fail(e)
        finally:
            self.ring.release(end)

    def _write(self, items: list[StepItem]) -> None:
        cols = self._columns(items)
        self._mapped += cols.num_routes
        self._sink.write(cols)

    def _columns(self, items: list[StepItem]) -> RouteColumns:
        """The routes of ``items``: per token, one route per logged layer, in step order."""
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
        live, ext_of = self._live, self._ext_of
        for rid in mapped.seg_req:
            if rid not in live:
                live.add(rid)
                self.requests += 1
        seg_req = [
            ext_of.get(r) or ext_of.setdefault(r, self._external_id(r)) for r in mapped.seg_req
        ]
        for it in items:
            for rid in it.finished:
                ext_of.pop(rid, None)
                live.discard(rid)
        k = self.ring.ids_np.shape[2]
        pause()
        return RouteColumns(
            seg_req=seg_req,
            seg_routes=mapped.seg_len * num_layers,
            token_idx=np.repeat(mapped.token_idx, num_layers),
            layer=np.tile(self._layers, len(mapped.rows)),
            ids=self.ring.ids_np[mapped.rows].reshape(routes, k),
            weights=self.ring.weights_np[mapped.rows].reshape(routes, k),
            prefill=np.repeat(mapped.prefill, num_layers),
            step=np.repeat(mapped.step, num_layers),
        )

    def _check_not_removed(self) -> bool:
        """Whether the log has lost its last name (file or directory removed); says so once.

        Writes to such a file succeed but reach nothing anyone can read, so logging stops.
        """
        if not self._sink.removed():
            return False
        self.failed = True
        self.stopped = "log removed"
        logger.error(
            "moeprof: the log file %s was removed (or its directory): logging stopped after "
            "%d routes; the engine goes on",
            self.path,
            self.routes_written,
        )
        return True

    def _fail(self, exc: Exception) -> None:
        self.failed = True
        self.stopped = f"{type(exc).__name__}: {exc}"
        logger.error(
            "moeprof: logging to %s stopped after %d routes on disk (%d dropped): %s "
            "(the engine goes on)",
            self.path,
            self.routes_written,
            self.dropped,
            self.stopped,
        )
