"""An ordinary server stop keeps the log (#15, defect 1), reproduced with a real OpenAI server.

The server (``python -m vllm.entrypoints.openai.api_server``, tiny model, every layer logged) has
requests that finished (200 OK received at least a second before the stop) and long ones in
flight; then it is stopped the two ordinary ways, with vLLM's default ``--shutdown-timeout 0``:

- SIGTERM to the server process only (``kill PID``, ``docker stop``): before the fix vLLM
  SIGKILLed the worker at once and the log had no closing record (what the writer still held
  was lost);
- SIGINT to the server's whole process group (Ctrl-C in a terminal): every vLLM process gets it,
  the worker included.

Either way the log must hold every finished request's routes exactly (prompt + completion - 1
per layer, from the response's usage), the in-flight ones as a contiguous prefix, and the
closing record with the true route count and the in-flight requests as unfinished.

The unit tests at the end pin :mod:`moeprof.hook.shutdown`'s rules without vLLM.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from moeprof.hook import shutdown

_PATH = Path(__file__).resolve().parent.parent / "bench" / "soak.py"
_spec = importlib.util.spec_from_file_location("bench_soak", _PATH)
assert _spec is not None and _spec.loader is not None
soak = importlib.util.module_from_spec(_spec)
sys.modules["bench_soak"] = soak
_spec.loader.exec_module(soak)

LONG_TOKENS = 1800
"""In flight at the stop: ~20 s of decoding on the tiny model, far longer than the test waits."""


def _run_and_stop(tmp_path: Path, stop: str) -> tuple[list, Path]:
    """Finished and in-flight requests, then the stop; returns (outcomes, log)."""
    log = tmp_path / "log.jsonl"
    server = soak.start_server(tmp_path, log, max_model_len=2048)
    outcomes: list = []
    lock = threading.Lock()

    def send(kind: str, max_tokens: int, prompt: str) -> None:
        o = soak.completion(server.port, server.model, prompt, max_tokens, kind=kind)
        with lock:
            outcomes.append(o)

    try:
        soak.wait_ready(server)
        long = [
            threading.Thread(target=send, args=("long", LONG_TOKENS, soak.PROMPTS[i]))
            for i in range(3)
        ]
        for t in long:
            t.start()
        time.sleep(2.0)  # the long ones are decoding: the engine is never idle from here on
        short = [
            threading.Thread(target=send, args=("normal", 24, soak.PROMPTS[i])) for i in range(6)
        ]
        for t in short:
            t.start()
        for t in short:
            t.join()
        time.sleep(1.5)
        assert all(t.is_alive() for t in long), "the long requests ended before the stop"
        if stop == "SIGTERM to the server process":
            os.kill(server.pid, signal.SIGTERM)
        else:
            os.killpg(server.pid, signal.SIGINT)
        server.proc.wait(120)
        for t in long:
            t.join(60)
    finally:
        soak.kill_session(server)
    return outcomes, log


@pytest.mark.vllm
@pytest.mark.parametrize(
    "stop", ["SIGTERM to the server process", "SIGINT to the process group (Ctrl-C)"]
)
def test_a_server_stop_keeps_finished_requests_and_closes_the_log(
    tmp_path: Path, stop: str
) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")
    outcomes, log = _run_and_stop(tmp_path, stop)
    finished = [o for o in outcomes if o.status == "ok"]
    assert len(finished) == 6, [(o.kind, o.status, o.error) for o in outcomes]
    assert all(o.status != "ok" for o in outcomes if o.kind == "long")

    check = soak.check_log(log, outcomes)
    assert check.finished_exact == 6, check.problems
    assert check.duplicates == 0
    assert check.end is not None, "no closing record: the log was not closed cleanly"
    assert check.end["routes"] == check.routes
    # the three long requests were cut by the stop: logged as a contiguous prefix, and counted
    # as unfinished in the closing record
    assert check.cut_in_log == check.cut_contiguous == 3
    assert check.end["requests_unfinished"] == 3
    assert check.problems == []


# ------------------------------------------------------------------ the rules, without vLLM


def test_only_an_abort_mode_stop_gets_the_grace() -> None:
    assert shutdown.stop_grace(0, 0) == shutdown.STOP_GRACE_SEC
    assert shutdown.stop_grace(60, 60) == 60  # the user's drain deadline is kept
    assert shutdown.stop_grace(60, 0) == 0  # ... also when it has run out
    assert shutdown.stop_grace(0, None) is None  # vLLM's own default (5 s) applies


def test_the_grace_wraps_vllms_function_once_and_keeps_a_longer_value() -> None:
    module = SimpleNamespace(get_engine_process_shutdown_timeout=lambda r, p: 15.0 if r == 0 else p)
    shutdown.extend_abort_grace(module)
    wrapped = module.get_engine_process_shutdown_timeout
    shutdown.extend_abort_grace(module)
    assert module.get_engine_process_shutdown_timeout is wrapped
    assert wrapped(0, 0) == 15.0  # vLLM's ROCm window is longer: kept
    assert wrapped(30, 30) == 30
    module.get_engine_process_shutdown_timeout = lambda r, p: p
    shutdown.extend_abort_grace(module)
    assert module.get_engine_process_shutdown_timeout(0, 0) == shutdown.STOP_GRACE_SEC


def test_the_drain_closes_once_and_a_second_caller_waits_for_it() -> None:
    calls: list[float] = []
    release = threading.Event()

    def close(timeout: float) -> None:
        calls.append(timeout)
        release.wait(5)

    drain = shutdown.Drain(close, timeout=2.0)
    first = threading.Thread(target=drain)
    first.start()
    while not calls:
        time.sleep(0.01)
    second_done = threading.Event()
    threading.Thread(target=lambda: (drain(), second_done.set())).start()
    assert not second_done.wait(0.2)  # still closing: the second caller waits
    release.set()
    first.join(5)
    assert second_done.wait(5)
    drain()
    assert calls == [2.0]
    assert drain.done


def test_a_drain_that_fails_or_hangs_does_not_hold_the_stop() -> None:
    def fail(timeout: float) -> None:
        raise OSError("disk gone")

    failing = shutdown.Drain(fail, timeout=0.1)
    failing()  # logged, not raised
    assert failing.done

    hang = threading.Event()
    stuck = shutdown.Drain(lambda timeout: hang.wait(10), timeout=0.2)
    threading.Thread(target=stuck, daemon=True).start()
    time.sleep(0.05)
    t0 = time.monotonic()
    stuck()  # the second caller gives up after the timeout
    assert time.monotonic() - t0 < 5
    hang.set()


def test_the_collector_is_closed_writer_first_with_the_time_limit() -> None:
    seen: list[str] = []

    class Writer:
        def close(self, timeout: float = 60.0) -> None:
            seen.append(f"writer {timeout}")

    class Collector:
        writer = Writer()

        def close(self) -> None:
            seen.append("collector")

    drain = shutdown.Drain(lambda t: shutdown._close_collector(Collector(), t), timeout=1.5)
    drain()
    assert seen == ["writer 1.5", "collector"]
