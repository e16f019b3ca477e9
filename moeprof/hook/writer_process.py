"""The writer in a process of its own (``VLLM_LOG_MOE_WRITER=process``), so that logging never
holds the engine's GIL and a killed worker loses nothing it handed over.

A writer thread inside the worker (:class:`~moeprof.hook.writer.LogWriter` on its own) shares
the worker's GIL with vLLM's model thread: every microsecond it spends mapping rows and
formatting routes in Python is a microsecond the model's thread may wait for, and on a small
model the model's thread is mostly Python. Here the worker keeps only the capture, the copy of
each step's rows into a host ring in shared memory and one message per step; a child process
runs the very same :class:`LogWriter` on that ring.

Invariants:
    - The ring is one anonymous shared-memory file (:class:`moeprof.hook.ring.HostRing` with
      ``shared=True``); the child maps it (:class:`~moeprof.hook.ring.RingView`, numpy only:
      the child imports neither torch nor vLLM). The worker moves the ring's ``head``, the
      child its ``tail``; a step's rows are written before its message is sent, so the child
      never reads rows that are not there.
    - Messages go one way over a pipe, in step order: ``("step", batch, start, new_prompt_lens,
      finished, step)``, ``("drop", routes)``, ``("halt", reason)``, ``("wake",)`` and
      ``("close", device_bytes)``; the child answers twice: ``("ready", None)`` or
      ``("refused", reason)`` once its sink is open, and ``("closed", stats)`` after the close.
    - On a GPU a step's message waits until its device-to-host copy is done, so the child never
      needs CUDA: each step sends the steps before it whose CUDA events have completed
      (``query``, without blocking), and a small thread of the worker sends what is left
      within :data:`PENDING_SEC` when the engine goes idle (it waits on the event, with the
      GIL released).
    - The child runs in the worker's session but in a process group of its own, on the cores
      the worker is not pinned to (moved there the moment it starts, with OpenMP's pinning
      variables left out of its environment), and imports the worker's moeprof whatever the
      working directory holds.
    - The child ignores SIGINT and SIGTERM (Ctrl-C reaches a whole process group; vLLM stops
      its workers with SIGTERM) and lives until the worker closes the log or goes away. When
      the worker dies without closing (SIGKILL), the child still writes every step it was
      handed, then closes the log without a closing record: it reads as not closed cleanly.
    - The child's log lines go to the worker's stderr, prefixed ``(moeprof-writer pid=N)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from moeprof.errors import HookRefusal
from moeprof.hook.ring import HostRing, RingView
from moeprof.hook.writer import LogWriter, StepItem, leave_compute_cores

logger = logging.getLogger("vllm.moeprof")

START_TIMEOUT_SEC = 60.0
"""How long the worker waits for the writer process to open the log."""
PINNING_ENV = frozenset(("GOMP_CPU_AFFINITY", "KMP_AFFINITY", "OMP_PLACES", "OMP_PROC_BIND"))
"""OpenMP's pinning variables, which vLLM's CPU backend sets for its workers (with libgomp in
``LD_PRELOAD``): left out of the writer process's environment, or libgomp would pin it back
onto the worker's compute core as it loads."""
PIPE_BYTES = 1 << 20
"""The pipe's buffer (Linux's default is 64 KiB): a burst of steps never blocks the worker."""
PENDING_SEC = 0.05
"""GPU only: how often the worker looks for steps whose copies finished after the last step."""


class ProcessWriter:
    """The worker's end: what :class:`~moeprof.hook.collector.StepCollector` calls, as on a
    :class:`LogWriter`, with each call turned into a message to the writer process."""

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        layers: list[int],
        top_k: int,
        overwrite: bool,
        ring: HostRing,
        part_sec: float,
    ) -> None:
        if ring.fd is None:
            raise ValueError("the writer process needs a shared ring (HostRing(shared=True))")
        self.path = path
        self.ring = ring
        self.device_bytes = 0
        self._pending: deque[StepItem] = deque()
        """Steps whose device-to-host copy may still be running (GPU only)."""
        self._lock = threading.Lock()
        """Held while sending: the model's thread and the pending-steps thread both send."""
        self._pending_thread: threading.Thread | None = None
        self._closed = False
        self._dead = False
        child_in, to_child = os.pipe()
        from_child, child_out = os.pipe()
        with contextlib.suppress(OSError):  # the default size also works
            fcntl.fcntl(to_child, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        package_root = str(Path(__file__).resolve().parents[2])
        env = {k: v for k, v in os.environ.items() if k not in PINNING_ENV}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        # ``-m`` would put the working directory first on sys.path (before PYTHONPATH): a
        # moeprof checkout there would be the child's moeprof, not the worker's
        env["PYTHONSAFEPATH"] = "1"
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "moeprof.hook.writer_process",
                    str(child_in),
                    str(child_out),
                ],
                pass_fds=(child_in, child_out, ring.fd),
                stdin=subprocess.DEVNULL,
                env=env,
                # Out of the terminal's process group (no Ctrl-C), but in the worker's session:
                # a process in a session of its own is in a scheduler autogroup of its own,
                # which Linux starved on the worker's busy core for over 60 s while other
                # engines compiled (issue #11's bench: the writer never answered).
                process_group=0,
            )
        finally:
            os.close(child_in)
            os.close(child_out)
        leave_compute_cores(self._proc.pid)  # from its first instant, not after its imports
        self._send_conn = Connection(to_child, readable=False)
        self._recv_conn = Connection(from_child, writable=False)
        self._send(
            {
                "path": str(path),
                "meta": meta,
                "layers": list(layers),
                "top_k": top_k,
                "overwrite": overwrite,
                "part_sec": part_sec,
                "ring_fd": ring.fd,
                "capacity": ring.capacity,
            },
            quiet=True,
        )
        reply = None if self._dead else self._reply(START_TIMEOUT_SEC)
        if reply is None or reply[0] != "ready":
            self._dead = True
            silent = self._proc.poll() is None
            if silent:  # alive but silent: it will not open the log now
                self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):  # reaped later if not now
                self._proc.wait(5)
            if reply is not None and reply[0] == "refused":
                raise HookRefusal(reply[1])
            if silent:
                raise HookRefusal(
                    f"moeprof's writer process did not open {path} within "
                    f"{START_TIMEOUT_SEC:.0f} s (the machine may be overloaded); it was stopped"
                )
            raise HookRefusal(
                f"moeprof's writer process exited before it opened {path} "
                f"(exit code {self._proc.returncode}); see its lines above"
            )

    @property
    def failed(self) -> bool:
        """The log cannot take more routes (the writer said so, or is gone): steps need no
        copy, only counting (:meth:`drop`)."""
        return self._dead or self.ring.writer_failed

    def submit(self, item: StepItem) -> None:
        """Hand a step over (model's thread); on a GPU once its copy has finished."""
        with self._lock:
            if item.ready is None and not self._pending:
                self._step(item)
                return
            self._pending.append(item)
            self._send_copied(wait=False)
        if self._pending_thread is None:
            self._pending_thread = threading.Thread(
                target=self._send_pending, name="moeprof-pending", daemon=True
            )
            self._pending_thread.start()

    def _send_pending(self) -> None:
        """Every ``PENDING_SEC``, send the steps still waiting for their copies (the engine
        may have gone idle after them: no next step would send them)."""
        while not self._closed:
            time.sleep(PENDING_SEC)
            if self._pending:
                with self._lock:
                    self._send_copied(wait=True)

    def drop(self, num_tokens: int) -> None:
        with self._lock:
            self._send(("drop", num_tokens))

    def halt(self, reason: str) -> None:
        with self._lock:
            self._send(("halt", reason))

    def wake(self) -> None:
        """The ring is full: hand over every step (waiting for their copies), then wake the
        writer."""
        with self._lock:
            self._send_copied(wait=True)
            self._send(("wake",))

    def close(self, timeout: float = 60.0) -> None:
        """Hand over what is left, have the writer drain and write the closing record, and
        wait up to ``timeout`` seconds for it; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        with self._lock:
            self._send_copied(wait=True)
            self._send(("close", self.device_bytes))
        reply = None if self._dead else self._reply(timeout)
        if reply is None or reply[0] != "closed":
            if self._proc.poll() is None:
                logger.error(
                    "moeprof: the writer process did not finish in %.0f s; it goes on writing %s "
                    "on its own",
                    timeout,
                    self.path,
                )
            else:
                logger.error(
                    "moeprof: the writer process exited (code %s) before closing %s",
                    self._proc.returncode,
                    self.path,
                )
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(max(0.0, deadline - time.monotonic()))
        self._send_conn.close()
        self._recv_conn.close()
        self.ring.close()

    def _step(self, item: StepItem) -> None:
        self._send(("step", item.batch, item.start, item.new_prompt_lens, item.finished, item.step))

    def _send_copied(self, wait: bool) -> None:
        """Send the pending steps whose copies are done (all of them with ``wait``), in order."""
        pending = self._pending
        while pending:
            ready = pending[0].ready
            if ready is not None and not ready.query():
                if not wait:
                    return
                ready.synchronize()
            self._step(pending.popleft())

    def _send(self, message: Any, quiet: bool = False) -> None:
        if self._dead:
            return
        try:
            self._send_conn.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
        except OSError as e:  # the writer process is gone: logging stops, the engine goes on
            self._dead = True
            if quiet:
                return
            logger.error(
                "moeprof: the writer process is gone (%s: %s; exit code %s); logging stopped, "
                "%s keeps what it had written (the engine goes on)",
                type(e).__name__,
                e,
                self._proc.poll(),
                self.path,
            )

    def _reply(self, timeout: float) -> tuple[str, Any] | None:
        try:
            if not self._recv_conn.poll(timeout):
                return None
            return self._recv_conn.recv()
        except (EOFError, OSError):
            return None


# ---- the writer process --------------------------------------------------------------------


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            "(moeprof-writer pid=%(process)d) %(levelname)s %(asctime)s "
            "[%(filename)s:%(lineno)d] %(message)s",
            datefmt="%m-%d %H:%M:%S",
        )
    )
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def serve(conn_in: Connection, conn_out: Connection) -> int:
    """Run the writer on the messages of one worker until it closes the log or goes away."""
    from moeprof.hook.compat import external_request_id

    spec = conn_in.recv()
    ring = RingView(spec["ring_fd"], spec["capacity"], len(spec["layers"]), spec["top_k"])
    try:
        writer = LogWriter(
            Path(spec["path"]),
            spec["meta"],
            spec["layers"],
            spec["top_k"],
            external_request_id,
            spec["overwrite"],
            ring,
            spec["part_sec"],
            cpu_clock=time.process_time,
            in_worker=False,
        )
    except Exception as e:
        reason = e.reason if isinstance(e, HookRefusal) else f"{type(e).__name__}: {e}"
        conn_out.send(("refused", reason))
        return 1
    conn_out.send(("ready", None))
    while True:
        try:
            message = pickle.loads(conn_in.recv_bytes())
        except (EOFError, OSError):
            break
        kind = message[0]
        if kind == "step":
            writer.submit(StepItem(message[1], message[2], None, *message[3:]))
        elif kind == "drop":
            writer.drop(message[1])
        elif kind == "halt":
            writer.halt(message[1])
        elif kind == "wake":
            writer.wake()
        elif kind == "close":
            writer.device_bytes = message[1]
            writer.close()
            with contextlib.suppress(OSError):
                conn_out.send(("closed", writer.stats()))
            return 0
        if writer.failed:
            ring.set_failed()
    # The worker went away without closing the log (killed): write what it handed over.
    writer.close(end_record=False)
    logger.error(
        "moeprof: the engine's worker exited without closing the log; %s keeps the %d routes "
        "it had handed over, and has no closing record",
        spec["path"],
        writer.routes_written,
    )
    return 0


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _log_to_stderr()  # the worker has moved this process off its compute cores already
    conn_in = Connection(int(argv[0]), writable=False)
    conn_out = Connection(int(argv[1]), readable=False)
    return serve(conn_in, conn_out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
