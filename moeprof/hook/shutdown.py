"""Closing the log when vLLM stops: the hook's part in the engine's shutdown.

How vLLM 0.32 stops a server (``vllm serve`` / ``python -m vllm.entrypoints.openai.api_server``;
read in ``entrypoints/launchers/launcher.py``, ``v1/engine/core_client.py``,
``v1/engine/utils.py``, ``v1/utils.py``, ``v1/engine/core.py``,
``v1/executor/multiproc_executor.py``, and seen on the CPU build):

- ``kill PID`` (SIGTERM) or SIGINT to the API server process reaches that process only. Its
  asyncio handler calls ``engine_client.shutdown(timeout=shutdown_timeout)`` (default 0, "abort"
  mode) -> ``MPClient.shutdown`` -> ``CoreEngineProcManager.shutdown`` -> ``v1.utils.shutdown``,
  which sends SIGTERM to EngineCore and waits ``get_engine_process_shutdown_timeout(...)``
  seconds, 0 by default, so it at once SIGKILLs the whole EngineCore tree, workers first: the
  worker never runs another line, and whatever the writer still held was lost.
- Given time, EngineCore's SIGTERM handler aborts the requests in flight, leaves its busy loop
  and shuts its executor down: it closes each worker's death pipe, the worker leaves its busy
  loop and runs ``WorkerProc.shutdown`` -> ``Worker.shutdown`` (wrapped by the hook), and the
  executor waits ``VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS`` (5) before SIGTERM, then 4 s more
  before SIGKILL.
- SIGTERM or SIGINT to a worker itself (Ctrl-C reaches every process of the terminal's
  process group; so does a stop that signals a whole cgroup) makes vLLM's worker handler raise
  ``SystemExit`` once; ``worker_main``'s ``finally`` then runs ``WorkerProc.shutdown`` too.
- Spawned workers (the CPU build always spawns) leave through ``sys.exit``, so ``atexit`` runs.

So, with logging on, the hook (1) gives EngineCore :data:`STOP_GRACE_SEC` to exit in abort
mode instead of 0, the same kind of window vLLM itself gives ROCm, so the shutdown above reaches
the worker; (2) drains the writer and writes the closing record from ``Worker.shutdown`` and
from ``atexit``, whichever comes first, within :data:`DRAIN_SEC`. Neither blocks a stop for
longer than that: the grace ends as soon as EngineCore has exited (usually well under a second),
and a drain that is not done in time is left behind. A SIGKILL (or ``--shutdown-timeout`` running
out mid-request) still gives the worker no chance: then the log holds what the writer had
written (every step within about half a second) and no closing record.
"""

from __future__ import annotations

import atexit
import functools
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("vllm.moeprof")

STOP_GRACE_SEC = 5.0
"""Seconds the API server waits for EngineCore to exit after SIGTERM in abort mode
(``--shutdown-timeout 0``, vLLM's default), instead of vLLM's 0."""
DRAIN_SEC = 3.0
"""Seconds a stopping worker waits for the writer to write what it holds and close the log."""

ENGINE_UTILS = "vllm.v1.engine.utils"
GRACE_FUNCTION = "get_engine_process_shutdown_timeout"
GRACE_USERS = ("vllm.entrypoints.launchers.dp_supervisor",)
"""Modules that import :data:`GRACE_FUNCTION` by name (patched too when already imported)."""


def stop_grace(request_timeout: float | None, process_timeout: float | None) -> float | None:
    """The hook's rule on top of vLLM's: an abort-mode stop (both timeouts 0) gets
    ``STOP_GRACE_SEC`` for EngineCore to exit; any other value is kept (a positive
    ``--shutdown-timeout`` is the user's drain deadline, None is vLLM's own 5 s default)."""
    if request_timeout == 0 and process_timeout == 0:
        return STOP_GRACE_SEC
    return process_timeout


def extend_abort_grace(module: Any) -> None:
    """Wrap ``module.get_engine_process_shutdown_timeout`` (``vllm.v1.engine.utils``) with
    :func:`stop_grace`; a vLLM without it is left alone (its stop is whatever it is)."""
    original = getattr(module, GRACE_FUNCTION, None)
    if original is None or getattr(original, "_moeprof_grace", False):
        return

    @functools.wraps(original)
    def with_grace(request_timeout: float | None, process_timeout: float | None) -> Any:
        value = original(request_timeout, process_timeout)
        ours = stop_grace(request_timeout, process_timeout)
        if value is None or ours is None or value >= ours:
            return value
        logger.info(
            "moeprof: giving EngineCore up to %.0f s to exit (instead of %s s) so that the "
            "worker can close the MoE log; vLLM's next line calls this a ROCm cleanup grace",
            ours,
            value,
        )
        return ours

    with_grace._moeprof_grace = True  # type: ignore[attr-defined]
    setattr(module, GRACE_FUNCTION, with_grace)
    for name in GRACE_USERS:  # already imported: they hold the original by name
        user = sys.modules.get(name)
        if user is not None and getattr(user, GRACE_FUNCTION, None) is original:
            setattr(user, GRACE_FUNCTION, with_grace)


class Drain:
    """Close one collector once, from whichever path comes first, within ``timeout``.

    Thread-safe and idempotent: a second caller waits (at most ``timeout``) for the first one's
    close to finish instead of returning while the log is still being written.
    """

    def __init__(self, close: Callable[[float], None], timeout: float = DRAIN_SEC) -> None:
        self._close = close
        self.timeout = timeout
        self._lock = threading.Lock()
        self._started = False
        self._done = threading.Event()

    def __call__(self) -> None:
        with self._lock:
            first = not self._started
            self._started = True
        if not first:
            self._done.wait(self.timeout)
            return
        try:
            self._close(self.timeout)
        except Exception as e:  # never let logging stand in the way of a stop
            logger.error("moeprof: closing the log failed: %s: %s", type(e).__name__, e)
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()


def close_on_stop(collector: Any, timeout: float = DRAIN_SEC) -> Drain:
    """Register the collector's bounded close to run at interpreter exit; return it so that
    the worker's ``shutdown`` runs the same one (whichever runs first closes, the other waits).
    """
    drain = Drain(functools.partial(_close_collector, collector), timeout)
    atexit.register(drain)
    return drain


def _close_collector(collector: Any, timeout: float) -> None:
    """The writer first, with the time limit (it drains and writes the closing record), then
    whatever else the collector closes (the writer's second close is a no-op)."""
    writer = getattr(collector, "writer", None)
    if writer is not None:
        writer.close(timeout=timeout)
    collector.close()
