"""Turning captured rows into JSONL, on a background thread, so the engine never waits on I/O.

The model's thread only hands over a step (host buffers + the batch layout) through a queue;
this thread waits for the device-to-host copy, maps rows to requests, formats and writes.
A failing write (disk full, file removed) turns logging off with one error message: the
engine keeps serving, and the log keeps ending on a complete line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from moeprof.hook.rows import StepBatch, map_rows

logger = logging.getLogger("moeprof.hook")

IDLE_FLUSH_SEC = 0.05
FLUSH_ROUTES = 65536
FORMAT_CHUNK = 1024
_IDLE = object()


def route_template(layer: int, top_k: int) -> str:
    """One route line as a %-format: ids as ints, weights to float32 precision (7 digits)."""
    ids = ",".join(["%d"] * top_k)
    weights = ",".join(["%.7g"] * top_k)
    return (
        '{"type":"route","req_id":%s,"token_idx":%d,'
        f'"layer":{layer},"topk_ids":[{ids}],"topk_weights":[{weights}],'
        '"phase":"%s"}\n'
    )


def format_routes(
    template: str,
    req_json: list[str],
    token_idx: np.ndarray,
    ids: np.ndarray,
    weights: np.ndarray,
    prefill: np.ndarray,
) -> str:
    """All rows of a step in one %-format call: about 1.5 us a route, none of it per field."""
    n, k = ids.shape
    if n == 0:
        return ""
    cells = np.empty((n, 2 * k + 3), dtype=object)
    cells[:, 0] = req_json
    cells[:, 1] = token_idx
    cells[:, 2 : 2 + k] = ids
    w64 = weights.astype(np.float64)
    cells[:, 2 + k : 2 + 2 * k] = w64
    cells[:, -1] = np.where(prefill, "prefill", "decode")
    flat = cells.ravel().tolist()
    width = 2 * k + 3
    text = "".join(
        (template * min(FORMAT_CHUNK, n - start))
        % tuple(flat[start * width : min(start + FORMAT_CHUNK, n) * width])
        for start in range(0, n, FORMAT_CHUNK)
    )
    if not np.isfinite(w64).all():
        # Spell non-finite weights as Python's json does, so readers name the problem.
        text = text.replace("-inf", "-Infinity").replace("inf", "Infinity").replace("nan", "NaN")
    return text


@dataclass
class StepItem:
    """What the model's thread hands over for one real step."""

    batch: StepBatch
    ids: Any
    weights: Any
    ready: Any
    """A CUDA event recorded after the device-to-host copy, or None when already on the host."""
    new_prompt_lens: dict[str, int] = field(default_factory=dict)
    finished: frozenset[str] = frozenset()
    release: Callable[[], None] | None = None


class LogWriter:
    """Owns the file and the thread; also the per-request state that mapping rows needs."""

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        layer: int,
        top_k: int,
        external_id: Callable[[str], str],
        overwrite: bool,
    ) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            self._fd: int | None = os.open(path, flags, 0o644)
        except FileExistsError:
            raise RuntimeError(
                f"moeprof: {path} already exists; remove it or set VLLM_LOG_MOE_OVERWRITE=1"
            ) from None
        except OSError as e:
            raise RuntimeError(f"moeprof: cannot open {path} for writing: {e}") from None
        self._template = route_template(layer, top_k)
        self._external_id = external_id
        self._req_json: dict[str, str] = {}
        self._prompt_len: dict[str, int] = {}
        self._logged_upto: dict[str, int] = {}
        self.routes_written = 0
        self.recomputed_skipped = 0
        self.failed = False
        self._size = 0
        self._queue: queue.SimpleQueue[StepItem | None] = queue.SimpleQueue()
        self._write(json.dumps(meta, separators=(",", ":")) + "\n")
        self._thread = threading.Thread(target=self._run, name="moeprof-writer", daemon=True)
        self._thread.start()
        self._closed = False

    def submit(self, item: StepItem) -> None:
        if self.failed or self._closed:
            if item.release:
                item.release()
            return
        self._queue.put(item)

    def close(self, timeout: float = 60.0) -> None:
        """Drain what is queued, then close the file; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _run(self) -> None:
        """Take each step off its host slot at once; render and write in batches.

        Rendering waits until the engine is idle (no step for ``IDLE_FLUSH_SEC``), the backlog
        reaches ``FLUSH_ROUTES`` rows, or the log is closed: on a busy machine the formatting
        then costs the engine no CPU time while it generates, and is done in fewer, larger
        calls. The GIL is handed back between chunks of ``FORMAT_CHUNK`` rows.
        """
        pending: list[StepItem] = []
        backlog = 0
        while True:
            try:
                item = self._queue.get(timeout=IDLE_FLUSH_SEC if pending else None)
            except queue.Empty:
                item = _IDLE
            if item is None or item is _IDLE or backlog >= FLUSH_ROUTES:
                self._flush(pending)
                pending, backlog = [], 0
                if item is None:
                    return
                if item is _IDLE:
                    continue
            try:
                pending.append(self._take(item))
                backlog += item.batch.num_tokens
            except Exception as e:  # never let logging take the engine down
                self._fail(e)

    def _take(self, item: StepItem) -> StepItem:
        """Copy the step's rows out of its host slot and give the slot back."""
        try:
            if item.ready is not None:
                item.ready.synchronize()
            n = item.batch.num_tokens
            return replace(
                item,
                ids=np.array(item.ids[:n]),
                weights=np.array(item.weights[:n]),
                ready=None,
                release=None,
            )
        finally:
            if item.release:
                item.release()

    def _flush(self, pending: list[StepItem]) -> None:
        if self.failed or not pending:
            return
        try:
            for item in pending:
                self._write(self._render(item))
        except Exception as e:  # never let logging take the engine down
            self._fail(e)

    def _render(self, item: StepItem) -> str:
        for rid, n in item.new_prompt_lens.items():
            self._prompt_len[rid] = n
        batch = item.batch
        upto = np.fromiter(
            (self._logged_upto.get(r, 0) for r in batch.req_ids), np.int64, len(batch.req_ids)
        )
        mapped = map_rows(batch, upto)
        rows = mapped.rows
        if len(rows) < batch.num_tokens:
            if not self.recomputed_skipped:
                logger.warning(
                    "moeprof: vLLM preempted a request and recomputes its tokens; "
                    "tokens recomputed after preemption are logged once, not again"
                )
            self.recomputed_skipped += batch.num_tokens - len(rows)
        ids = item.ids[rows]  # already the step's own rows, copied off the slot by _take
        weights = item.weights[rows]
        req_json = [self._json_id(r) for r in batch.req_ids]
        prompt_len = np.fromiter(
            (self._prompt_len.get(r, -1) for r in batch.req_ids), np.int64, len(batch.req_ids)
        )
        prefill = mapped.token_idx < prompt_len[mapped.req_index]
        text = format_routes(
            self._template,
            [req_json[j] for j in mapped.req_index.tolist()],
            mapped.token_idx,
            ids,
            weights,
            prefill,
        )
        if len(rows):
            ends = np.zeros(len(batch.req_ids), dtype=np.int64)
            np.maximum.at(ends, mapped.req_index, mapped.token_idx + 1)
            for j, rid in enumerate(batch.req_ids):
                if ends[j] > self._logged_upto.get(rid, 0):
                    self._logged_upto[rid] = int(ends[j])
        for rid in item.finished:
            self._logged_upto.pop(rid, None)
            self._prompt_len.pop(rid, None)
            self._req_json.pop(rid, None)
        self.routes_written += len(rows)
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

    def _fail(self, exc: Exception) -> None:
        self.failed = True
        logger.error(
            "moeprof: logging to %s stopped after %d routes: %s: %s (the engine goes on)",
            self.path,
            self.routes_written,
            type(exc).__name__,
            exc,
        )
