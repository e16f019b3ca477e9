"""Host memory where captured rows wait until the writer renders them.

One ring instead of a slot per step: the model's thread copies a step's rows in and moves on;
the writer takes them out in batches, when the engine is idle, the ring is half full, or the
oldest step has waited ``writer.MAX_LAG_SEC``. So the model's thread never wakes the writer for
a step (on a small model a thread wake-up and the GIL hand-off that follows cost more than the
copy itself), and only waits when the writer is a whole ring behind.

Memory: ``capacity`` rows of ``layers x 2 x top_k`` int32 (ids and float32 weights),
``collector.RING_BYTES`` (4 MiB) unless two of the largest steps need more; allocated once,
never grown. Rows still here when the process is killed are lost (not yet in the log); a clean
close writes them first.

Invariants:
    - Positions count rows from the start of the log and never wrap; ``pos % capacity`` is the
      row in memory. A step's rows are contiguous in memory: a step that would cross the end
      starts at row 0 instead, and the rows it skips count as used.
    - Only the model's thread moves ``head`` (in :meth:`reserve`); only the writer moves
      ``tail`` (in :meth:`release`). Rows in ``[tail, head)`` belong to the writer.
    - A *shared* ring (``shared=True``, the writer in its own process: see
      :mod:`moeprof.hook.writer_process`) lives in one anonymous shared-memory file (a memfd):
      a header of int64 counters (``head``, ``tail``, the writer's ``failed`` flag), then the
      rows. The writer process maps the same file (:class:`RingView`, numpy only); each counter
      has one writer, and an aligned 8-byte store is atomic, so no lock crosses processes.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

HEADER_BYTES = 64
"""Bytes before the rows in a shared ring: int64 counters, padded to a cache line."""
HEAD, TAIL, FAILED = 0, 1, 2
"""Which header int64 holds what."""
POLL_SEC = 0.0005
"""How often a step waiting for room in a shared ring looks at the writer's ``tail``."""


class RingFull(RuntimeError):
    """The writer did not free room for a step in time."""


class _Rows:
    """The numpy views of a ring's memory and its counters: what both sides of a ring read."""

    capacity: int
    rows_np: np.ndarray
    ids_np: np.ndarray
    """``(capacity, num_layers, top_k)`` expert ids."""
    weights_np: np.ndarray
    """``(capacity, num_layers, top_k)`` router weights."""
    _counters: np.ndarray

    def _views(self, rows_np: np.ndarray, num_layers: int, top_k: int) -> None:
        self.rows_np = rows_np
        by_layer = rows_np.reshape(self.capacity, num_layers, 2 * top_k)
        self.ids_np = by_layer[:, :, :top_k]
        self.weights_np = by_layer[:, :, top_k:].view(np.float32)

    @property
    def head(self) -> int:
        return int(self._counters[HEAD])

    @head.setter
    def head(self, value: int) -> None:
        self._counters[HEAD] = value

    @property
    def tail(self) -> int:
        return int(self._counters[TAIL])

    @property
    def nbytes(self) -> int:
        return self.rows_np.nbytes

    @property
    def backlog(self) -> int:
        """Rows reserved and not yet released (skipped rows included)."""
        return self.head - self.tail


def _shared_memory(size: int) -> tuple[int, mmap.mmap]:
    """An anonymous shared-memory file of ``size`` bytes (zeros) and its mapping: nothing to
    name, unlink or leak; the writer process gets the descriptor."""
    fd = os.memfd_create("moeprof-ring", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


class HostRing(_Rows):
    def __init__(
        self, capacity: int, num_layers: int, top_k: int, pin: bool, shared: bool = False
    ) -> None:
        import torch  # not at module level: the writer process reads a ring without torch

        self.capacity = capacity
        row_ints = num_layers * 2 * top_k
        self.fd: int | None = None
        """The shared ring's memory file, for the writer process (None: not shared)."""
        self._mapping: mmap.mmap | None = None
        if shared:
            self.fd, self._mapping = _shared_memory(HEADER_BYTES + capacity * row_ints * 4)
            self._counters = np.frombuffer(self._mapping, np.int64, HEADER_BYTES // 8)
            self.rows = torch.frombuffer(
                self._mapping, dtype=torch.int32, count=capacity * row_ints, offset=HEADER_BYTES
            ).view(capacity, row_ints)
            if pin:
                _pin(self.rows)
        else:
            self._counters = np.zeros(HEADER_BYTES // 8, np.int64)
            self.rows = torch.zeros((capacity, row_ints), dtype=torch.int32, pin_memory=pin)
        """One row per token: the logged layers side by side, each as
        :class:`~moeprof.hook.capture.RouteCapture` lays it out (k ids, k float32 weights)."""
        rows_np = self.rows.numpy()
        # zeros, and touched now: a page fault every few steps would land on the model's thread
        rows_np.fill(0)
        self._views(rows_np, num_layers, top_k)
        self._freed = threading.Condition()

    @property
    def writer_failed(self) -> bool:
        """Set by a writer process whose log failed (disk full, removed): steps need no copy."""
        return bool(self._counters[FAILED])

    def reserve(self, n: int, wake_writer: Callable[[], None], timeout: float) -> int:
        """The position of ``n`` free contiguous rows, now owned by the caller's step.

        When the ring is full, wake the writer and wait for it up to ``timeout`` seconds.
        """
        if n > self.capacity:
            raise ValueError(f"a step of {n} rows does not fit a ring of {self.capacity}")
        start = self.head
        row = start % self.capacity
        if row + n > self.capacity:
            start += self.capacity - row
        end = start + n
        if end - self.tail > self.capacity:
            wake_writer()
            if self.fd is None:
                with self._freed:
                    if not self._freed.wait_for(lambda: end - self.tail <= self.capacity, timeout):
                        raise self._full(timeout)
            else:  # the writer is another process: watch its counter
                deadline = time.monotonic() + timeout
                while end - self.tail > self.capacity:
                    if time.monotonic() > deadline:
                        raise self._full(timeout)
                    time.sleep(POLL_SEC)
        self.head = end
        return start

    @staticmethod
    def _full(timeout: float) -> RingFull:
        return RingFull(f"the writer has not freed host memory in {timeout:.0f} s")

    def release(self, upto: int) -> None:
        """Hand every row before position ``upto`` back to the model's thread."""
        with self._freed:
            self._counters[TAIL] = max(self.tail, upto)
            self._freed.notify_all()

    def close(self) -> None:
        """Let go of a shared ring's file (the writer process keeps its own mapping)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class RingView(_Rows):
    """The writer process's side of a shared ring: the same rows and counters, numpy only."""

    def __init__(self, fd: int, capacity: int, num_layers: int, top_k: int) -> None:
        self.capacity = capacity
        row_ints = num_layers * 2 * top_k
        self._mapping = mmap.mmap(fd, HEADER_BYTES + capacity * row_ints * 4)
        self._counters = np.frombuffer(self._mapping, np.int64, HEADER_BYTES // 8)
        rows_np = np.frombuffer(
            self._mapping, np.int32, capacity * row_ints, offset=HEADER_BYTES
        ).reshape(capacity, row_ints)
        self._views(rows_np, num_layers, top_k)

    def release(self, upto: int) -> None:
        self._counters[TAIL] = max(self.tail, upto)

    def set_failed(self) -> None:
        self._counters[FAILED] = 1


def _pin(rows: Any) -> None:
    """Page-lock a shared ring for the GPU, so that the device-to-host copies stay
    asynchronous (``cudaHostRegister``; a ring that cannot be pinned is still correct, its
    copies just wait for the device)."""
    import logging

    import torch

    err = torch.cuda.cudart().cudaHostRegister(rows.data_ptr(), rows.numel() * 4, 0)
    if int(getattr(err, "value", err)) != 0:
        logging.getLogger("vllm.moeprof").warning(
            "moeprof: cudaHostRegister failed (%s); the host ring is not pinned, so each "
            "step's copy waits for the device",
            err,
        )
