"""Host memory where captured rows wait until the writer thread renders them.

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
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch


class RingFull(RuntimeError):
    """The writer did not free room for a step in time."""


class HostRing:
    def __init__(self, capacity: int, num_layers: int, top_k: int, pin: bool) -> None:
        self.capacity = capacity
        # zeros, not empty: every page is touched now, instead of a page fault every few steps
        self.rows = torch.zeros(
            (capacity, num_layers * 2 * top_k), dtype=torch.int32, pin_memory=pin
        )
        """One row per token: the logged layers side by side, each as
        :class:`~moeprof.hook.capture.RouteCapture` lays it out (k ids, k float32 weights)."""
        self.rows_np: np.ndarray = self.rows.numpy()
        by_layer = self.rows_np.reshape(capacity, num_layers, 2 * top_k)
        self.ids_np = by_layer[:, :, :top_k]
        """``(capacity, num_layers, top_k)`` expert ids."""
        self.weights_np = by_layer[:, :, top_k:].view(np.float32)
        """``(capacity, num_layers, top_k)`` router weights."""
        self.head = 0
        self.tail = 0
        self._freed = threading.Condition()

    @property
    def nbytes(self) -> int:
        return self.rows_np.nbytes

    @property
    def backlog(self) -> int:
        """Rows reserved and not yet released (skipped rows included)."""
        return self.head - self.tail

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
            with self._freed:
                if not self._freed.wait_for(lambda: end - self.tail <= self.capacity, timeout):
                    raise RingFull(f"the writer has not freed host memory in {timeout:.0f} s")
        self.head = end
        return start

    def release(self, upto: int) -> None:
        """Hand every row before position ``upto`` back to the model's thread."""
        with self._freed:
            self.tail = max(self.tail, upto)
            self._freed.notify_all()
