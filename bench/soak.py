"""Soak: a logged vLLM OpenAI server under mixed concurrent load, then a graceful stop; is the log
exact, and does the worker's memory stay flat?

What it does (127.0.0.1 only, bounded in time and count):

1. Starts ``python -m vllm.entrypoints.openai.api_server`` on the tiny embedded model with
   ``VLLM_LOG_MOE`` set and ``VLLM_MOE_LAYER=all``, prefix caching off, and a KV cache of
   ``--kv-blocks`` blocks (``--num-gpu-blocks-override``), small enough that the scheduler
   preempts requests under load.
2. Runs ``--clients`` client threads for ``--duration`` seconds (at most ``--max-requests``
   requests in all). Each request is one of four kinds, in a fixed rotation: ``normal`` (a
   completion of 16-64 tokens), ``stream`` (the same, streamed, usage in the last chunk),
   ``abort`` (streamed; the client closes the connection after a few chunks, so vLLM aborts the
   request) and ``long`` (a completion of 300-600 tokens). Every request sets ``ignore_eos`` so
   its length is its ``max_tokens``.
3. Samples the worker process's RSS (``psutil``) every ``--rss-every`` seconds.
4. Stops the server with SIGTERM (vLLM's default shutdown) while the last requests are still in
   flight, and waits for it to exit.
5. Reads the log (``moeprof.analysis.reader``) and checks, per request and logged layer:
   - finished (200 OK with usage): positions exactly ``0 .. prompt + completion - 2``
     (prompt + completion - 1 routes: the last sampled token is never fed back);
   - aborted by the client: a contiguous prefix ``0 .. m-1``, the same m at every layer, at
     least what the client saw generated (``prompt + chunks - 1``) and at most
     ``prompt + max_tokens - 1``;
   - cut by the stop (in flight at SIGTERM): a contiguous prefix from 0 as well, and exactly
     ``prompt + completion - 1`` routes a layer when the server still sent the response
     (``finish_reason`` ``abort`` with usage);
   - no duplicate (request, position, layer), no request the clients did not send (requests
     in flight at the stop whose id the client never saw are counted as cut);
   - the closing record: present, its route count equals the routes in the log, and
     ``requests_unfinished`` equals the requests cut by the stop.
   RSS: the slope of a least-squares line through the second half of the samples, in MiB per
   minute, and the growth from the first to the last sample of that half; "flat" when the
   second half grew by less than ``--rss-flat-mib`` MiB.

The table is printed; ``--json PATH`` writes every number. Exit code: 0 when every check passed,
1 when a check failed, 2 when the server failed to start or stop.

    python bench/soak.py --duration 600 --clients 8 --json bench/results/soak_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HOST = "127.0.0.1"
BLOCK_SIZE = 32
"""KV cache block size (tokens) when ``--kv-blocks`` is given (the CPU build's default is 128)."""
DEFAULT_KV_BLOCKS = 40
"""40 blocks of 32 tokens: one 1,024-token request fits, eight concurrent clients do not."""
KINDS = ("normal", "stream", "abort", "long")
PROMPTS = (
    "A farmer has 12 cows and buys 7 more. How many cows does he have?",
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning.",
    "A robe takes 2 bolts of blue fiber and half that much white fiber.",
    "Josh decides to try flipping a house. He buys a house for $80,000.",
    "James decides to run 3 sprints 3 times a week.",
    "Every day, Wendi feeds each of her chickens three cups of mixed chicken feed.",
    "Kylar went to the store to buy glasses for his new apartment.",
    "Toulouse has twice as many sheep as Charleston.",
)


# ---------------------------------------------------------------------------------- the server


@dataclass
class Server:
    """A ``vllm.entrypoints.openai.api_server`` process (its own session) and where it writes."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    output: Path
    model: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output_text(self) -> str:
        return self.output.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(
    workdir: Path,
    log: Path,
    *,
    layers: str = "all",
    kv_blocks: int | None = None,
    max_model_len: int = 1024,
    extra_args: Sequence[str] = (),
    logging_on: bool = True,
) -> Server:
    """Start a server on the tiny model (127.0.0.1, a free port), output to ``workdir``."""
    from moeprof.tiny import tiny_model_path

    model = str(tiny_model_path())
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_LOG_MOE", "_MOEPROF"))}
    env |= {"VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
    if logging_on:
        env |= {"VLLM_LOG_MOE": str(log), "VLLM_MOE_LAYER": layers}
    args = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        HOST,
        "--port",
        str(port),
        "--enforce-eager",
        "--max-model-len",
        str(max_model_len),
        "--no-enable-prefix-caching",
        "--seed",
        "1234",
        "--disable-uvicorn-access-log",
    ]
    if kv_blocks is not None:
        args += ["--num-gpu-blocks-override", str(kv_blocks), "--block-size", str(BLOCK_SIZE)]
    args += list(extra_args)
    output = workdir / f"server-{port}.txt"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(proc, port, log, output, model)


def wait_ready(server: Server, timeout: float = 600.0) -> None:
    """Wait until ``/health`` answers 200; raise RuntimeError (with the output's tail) if the
    server exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited ({server.proc.returncode}):\n" + _tail(server))
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection(HOST, server.port, timeout=5)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            finally:
                conn.close()
        if time.monotonic() > deadline:
            raise RuntimeError("server did not come up in time:\n" + _tail(server))
        time.sleep(1.0)


def stop_server(server: Server, sig: int = signal.SIGTERM, timeout: float = 120.0) -> float:
    """Send ``sig`` to the server process only (as ``kill PID`` does) and wait for it to exit;
    return the seconds it took. Whatever is left of its session is SIGKILLed after ``timeout``.
    """
    t0 = time.monotonic()
    if server.proc.poll() is None:
        os.kill(server.pid, sig)
    try:
        server.proc.wait(timeout)
    finally:
        kill_session(server)
    return time.monotonic() - t0


def kill_session(server: Server) -> None:
    """SIGKILL what is left of the server's session (its engine core and workers included)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(10)


def _tail(server: Server, n: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return server.output_text()[-n:]
    return ""


def process_tree(pid: int) -> list[dict[str, Any]]:
    """The process and its descendants: pid, parent pid, name (vLLM sets process titles)."""
    import psutil

    root = psutil.Process(pid)
    rows = []
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            rows.append({"pid": p.pid, "ppid": p.ppid(), "name": p.name(), "cmd": p.cmdline()[:3]})
    return rows


def worker_pid(server: Server) -> int | None:
    """The model worker: the server's descendant that holds the log open for writing, or, with
    logging off, the one vLLM titles ``VLLM::Worker``."""
    import psutil

    target = str(server.log)
    with contextlib.suppress(psutil.Error):
        children = psutil.Process(server.pid).children(recursive=True)
        for p in children:
            with contextlib.suppress(psutil.Error):
                if any(f.path == target for f in p.open_files()):
                    return p.pid
        for p in children:
            with contextlib.suppress(psutil.Error):
                if p.name().startswith("VLLM::Worker"):
                    return p.pid
    return None


# ---------------------------------------------------------------------------------- requests


@dataclass
class Outcome:
    """One request as its client saw it."""

    kind: str
    max_tokens: int
    status: str = "pending"
    """``ok`` (complete response with usage), ``aborted`` (the client hung up on purpose),
    ``cut`` (the server's stop aborted it: ``finish_reason`` ``abort``, a 5xx, or the
    connection dropped), ``error`` (anything else)."""
    completion_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    """``length`` for a request that ran to ``max_tokens``; ``abort`` when the server aborted it
    (its stop): such a response is complete (200 OK, usage) but the request was cut; None when
    the stop aborted a stream before its first token (only the usage chunk came)."""
    chunks: int = 0
    """Streamed chunks with text received (one token each on this server)."""
    sent_at: float | None = None
    """``time.monotonic()`` when the request was sent."""
    done_at: float | None = None
    """``time.monotonic()`` when the last byte of a complete response arrived."""
    error: str | None = None

    @property
    def req_id(self) -> str | None:
        """The log's req_id: the completion id plus ``-0`` (the sub-request index, n=1)."""
        return None if self.completion_id is None else f"{self.completion_id}-0"


def completion(
    port: int,
    model: str,
    prompt: str,
    max_tokens: int,
    *,
    kind: str = "normal",
    abort_after: int = 0,
    timeout: float = 300.0,
) -> Outcome:
    """One ``/v1/completions`` request (streamed for ``stream``/``abort``)."""
    stream = kind in ("stream", "abort")
    out = Outcome(kind, max_tokens)
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    out.sent_at = time.monotonic()
    try:
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        if resp.status != 200:
            # a 5xx is what a request in flight gets when the engine stops under it
            out.status = "cut" if resp.status >= 500 else "error"
            out.error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
            return out
        if not stream:
            data = json.loads(resp.read())
            out.completion_id = data["id"]
            out.finish_reason = data["choices"][0].get("finish_reason")
            _take_usage(out, data["usage"])
            return out
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                break
            chunk = json.loads(line[6:])
            out.completion_id = out.completion_id or chunk.get("id")
            if chunk.get("choices"):
                out.chunks += 1
                out.finish_reason = chunk["choices"][0].get("finish_reason") or out.finish_reason
            if chunk.get("usage") and not chunk.get("choices"):
                _take_usage(out, chunk["usage"])
                return out
            if kind == "abort" and out.chunks >= abort_after:
                out.status = "aborted"
                return out
        out.status, out.error = "cut", "stream ended without usage"
        return out
    except (OSError, http.client.HTTPException, ValueError) as e:
        out.status, out.error = "cut", f"{type(e).__name__}: {e}"
        return out
    finally:
        conn.close()  # for ``abort``: the server sees the disconnect and aborts the request


def _take_usage(out: Outcome, usage: dict[str, Any]) -> None:
    out.prompt_tokens = int(usage["prompt_tokens"])
    out.completion_tokens = int(usage["completion_tokens"])
    # ``abort``: the stop aborted it; None: aborted before its first token (a stream then gets
    # only the usage chunk, completion_tokens 0)
    out.status = "ok" if out.finish_reason in ("length", "stop") else "cut"
    out.done_at = time.monotonic()


@dataclass
class Load:
    """Client threads that send requests until told to stop (or ``max_requests`` are sent)."""

    port: int
    model: str
    clients: int
    max_requests: int
    seed: int = 0
    short_tokens: tuple[int, int] = (16, 64)
    long_tokens: tuple[int, int] = (300, 600)
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _sent: int = 0

    def start(self) -> None:
        for i in range(self.clients):
            t = threading.Thread(target=self._client, args=(i,), daemon=True, name=f"client-{i}")
            t.start()
            self._threads.append(t)

    def stop_sending(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        turn = index
        while not self._stop.is_set():
            with self._lock:
                if self._sent >= self.max_requests:
                    return
                self._sent += 1
            kind = KINDS[turn % len(KINDS)]
            turn += 1
            lo, hi = self.long_tokens if kind == "long" else self.short_tokens
            max_tokens = rng.randint(lo, hi)
            prompt = " ".join(rng.choice(PROMPTS) for _ in range(rng.randint(1, 3)))
            outcome = completion(
                self.port,
                self.model,
                prompt,
                max_tokens,
                kind=kind,
                abort_after=rng.randint(2, max(2, max_tokens // 3)),
            )
            with self._lock:
                self.outcomes.append(outcome)


# ---------------------------------------------------------------------------------- the log


@dataclass
class LogCheck:
    """What the log holds against what the clients saw (see the module docstring)."""

    routes: int = 0
    layers: list[int] = field(default_factory=list)
    requests_in_log: int = 0
    finished: int = 0
    finished_exact: int = 0
    aborted: int = 0
    aborted_ok: int = 0
    """Client-aborted requests whose routes are a contiguous prefix of plausible length."""
    cut: int = 0
    """Requests the stop cut, as the clients saw them."""
    cut_in_log: int = 0
    """Requests in the log that were in flight at the stop (their id known to a client or not:
    a request cut before its first response byte is known only by its routes)."""
    cut_contiguous: int = 0
    """Of ``cut_in_log``, those whose routes are a contiguous prefix at every layer."""
    cut_exact: int = 0
    """Requests cut by the stop whose response still came back (``finish_reason`` ``abort``, with
    usage) and whose routes are exactly prompt + completion - 1 at every layer."""
    missing: int = 0
    """Requests with a complete response and no route at all."""
    duplicates: int = 0
    unknown_in_log: int = 0
    """Requests in the log that no client made (their id not seen and not in flight)."""
    end: dict[str, Any] | None = None
    """The closing record, or None when the log has none (not closed cleanly)."""
    problems: list[str] = field(default_factory=list)
    """The first problems found, one line each."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)
        else:
            self.problems[-1] = "(more problems not shown)"


@dataclass(frozen=True)
class RequestPositions:
    """Per logged layer (meta order): distinct positions, lowest, highest, and rows."""

    count: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    rows: np.ndarray


def read_positions(path: Path) -> tuple[list[int], dict[str, RequestPositions], int, list[str]]:
    """(layers, req_id -> positions per layer, routes, reader issues) of a JSONL log.

    A closing ``end`` record on the last line is not a route; any reader issue about another
    line is returned.
    """
    from moeprof.analysis.reader import open_log

    log = open_log(path)
    layers = log.layers
    issues: list[str] = []
    last_line = _last_line_number(path)
    reqs: list[np.ndarray] = []
    slots: list[np.ndarray] = []
    toks: list[np.ndarray] = []

    def on_issue(issue: Any) -> None:
        if issue.severity == "error" and not (issue.line == last_line and _is_end_line(path)):
            issues.append(f"line {issue.line}: {issue.message}")

    for chunk in log.chunks(on_issue):
        reqs.append(chunk.req)
        slots.append(log.layer_slot(chunk.layer))
        toks.append(chunk.token_idx)
    if not reqs:
        return layers, {}, 0, issues
    req = np.concatenate(reqs)
    slot = np.concatenate(slots)
    tok = np.concatenate(toks)
    n_layers = len(layers)
    group = req * n_layers + slot
    order = np.lexsort((tok, group))
    group, tok = group[order], tok[order]
    # distinct (group, position): rows minus repeats
    first = np.ones(group.size, bool)
    first[1:] = (group[1:] != group[:-1]) | (tok[1:] != tok[:-1])
    n_groups = len(log.req_ids) * n_layers
    rows = np.bincount(group, minlength=n_groups)
    count = np.bincount(group[first], minlength=n_groups)
    lo = np.full(n_groups, -1, np.int64)
    hi = np.full(n_groups, -1, np.int64)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ends = np.r_[starts[1:], group.size] - 1
    lo[group[starts]] = tok[starts]
    hi[group[ends]] = tok[ends]
    shape = (len(log.req_ids), n_layers)
    count, lo, hi, rows = (a.reshape(shape) for a in (count, lo, hi, rows))
    by_req = {
        name: RequestPositions(count[i], lo[i], hi[i], rows[i])
        for i, name in enumerate(log.req_ids)
    }
    return layers, by_req, int(req.size), issues


def _last_line_number(path: Path) -> int:
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def read_end(path: Path) -> dict[str, Any] | None:
    """The closing record of a JSONL log (its last line when that is ``{"type":"end",...}``)."""
    line = _last_line(path)
    with contextlib.suppress(ValueError):
        record = json.loads(line)
        if isinstance(record, dict) and record.get("type") == "end":
            return record
    return None


def _is_end_line(path: Path) -> bool:
    return read_end(path) is not None


def _last_line(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 65536))
        tail = f.read()
    lines = tail.rstrip(b"\n").rsplit(b"\n", 1)
    return lines[-1]


def _ago(o: Outcome, outcomes: Sequence[Outcome]) -> str:
    """When ``o`` was sent and ended, in seconds before the last response of the run."""
    last = max((x.done_at or 0.0) for x in outcomes)
    sent = f"sent {last - o.sent_at:.1f} s" if o.sent_at else "sent ?"
    done = f"done {last - o.done_at:.1f} s" if o.done_at else "not done"
    return f"{sent}, {done} before the last response"


def contiguous(p: RequestPositions) -> bool:
    """Every layer holds positions 0..m-1 without a hole or a repeat, the same m at each."""
    m = int(p.count[0])
    return (
        m > 0
        and bool((p.count == m).all())
        and bool((p.lo == 0).all())
        and bool((p.hi == m - 1).all())
        and bool((p.rows == m).all())
    )


def check_log(path: Path, outcomes: Sequence[Outcome]) -> LogCheck:
    """Check the log against the clients' outcomes (rules in the module docstring)."""
    result = LogCheck()
    result.end = read_end(path)
    layers, by_req, routes, issues = read_positions(path)
    result.layers, result.routes, result.requests_in_log = layers, routes, len(by_req)
    for issue in issues[:5]:
        result.problem(f"reader: {issue}")
    dup = sum(int((p.rows - p.count).sum()) for p in by_req.values())
    result.duplicates = dup
    if dup:
        result.problem(f"{dup} duplicate (request, position, layer) routes")
    seen: set[str] = set()
    for o in outcomes:
        rid = o.req_id
        if rid is not None:
            seen.add(rid)
        p = by_req.get(rid) if rid is not None else None
        if o.status == "ok":
            result.finished += 1
            expect = (o.prompt_tokens or 0) + (o.completion_tokens or 0) - 1
            if p is None:
                result.missing += 1
                result.problem(
                    f"{rid}: finished ({o.kind}, {expect} routes a layer, "
                    f"{_ago(o, outcomes)}) but not in the log"
                )
            elif contiguous(p) and int(p.count[0]) == expect:
                result.finished_exact += 1
            else:
                result.problem(
                    f"{rid}: finished, expected positions 0..{expect - 1} at every layer, "
                    f"found counts {p.count.tolist()} lo {p.lo.tolist()} hi {p.hi.tolist()}"
                )
        elif o.status == "aborted":
            result.aborted += 1
            if p is None:  # aborted before its prompt ran: nothing to log
                result.aborted_ok += 1
                continue
            m = int(p.count[0])
            if contiguous(p):
                result.aborted_ok += 1
            else:
                result.problem(f"{rid}: aborted, routes not a contiguous prefix (m={m})")
        elif o.status == "cut":
            result.cut += 1
            if p is None:
                continue
            result.cut_in_log += 1
            if contiguous(p):
                result.cut_contiguous += 1
            else:
                result.problem(f"{rid}: cut by the stop, routes not a contiguous prefix")
            if o.completion_tokens is not None:
                expect = (o.prompt_tokens or 0) + o.completion_tokens - 1
                if contiguous(p) and int(p.count[0]) == expect:
                    result.cut_exact += 1
                else:
                    result.problem(
                        f"{rid}: cut by the stop after {o.completion_tokens} tokens, expected "
                        f"positions 0..{expect - 1}, found counts {p.count.tolist()}"
                    )
    unseen = [name for name in by_req if name not in seen]
    cut_unknown = sum(1 for o in outcomes if o.status == "cut" and o.req_id is None)
    for name in unseen:
        if contiguous(by_req[name]):
            result.cut_contiguous += 1
        else:
            result.problem(f"{name}: in the log but unknown, routes not a contiguous prefix")
    result.unknown_in_log = max(0, len(unseen) - cut_unknown)
    result.cut_in_log += len(unseen) - result.unknown_in_log
    if result.unknown_in_log:
        result.problem(f"{result.unknown_in_log} requests in the log that no client made")
    if result.end is None:
        result.problem("no closing record: the log was not closed cleanly")
    else:
        if result.end.get("routes") != routes:
            result.problem(
                f"closing record says {result.end.get('routes')} routes, log has {routes}"
            )
        unfinished = result.end.get("requests_unfinished")
        # an upper bound: requests that finished in the engine's last step count too (vLLM
        # tells a worker a request finished only with the next step), so only fewer is wrong
        if unfinished is not None and unfinished < result.cut_in_log:
            result.problem(
                f"closing record: requests_unfinished={unfinished}, but {result.cut_in_log} "
                "requests in the log were in flight at the stop"
            )
    return result


# ---------------------------------------------------------------------------------- memory


def rss_trend(samples: Sequence[tuple[float, int]]) -> dict[str, float | int | None]:
    """Slope (MiB/min, least squares) and growth (MiB, last - first) of the RSS samples'
    second half (``(seconds, bytes)`` pairs); the first half is the warm-up."""
    half = list(samples[len(samples) // 2 :])
    if len(half) < 2:
        return {"samples": len(samples), "slope_mib_per_min": None, "growth_mib": None}
    t = np.array([s[0] for s in half], float)
    r = np.array([s[1] for s in half], float) / 2**20
    slope = float(np.polyfit(t, r, 1)[0]) * 60 if np.ptp(t) > 0 else 0.0
    return {
        "samples": len(samples),
        "first_mib": round(float(samples[0][1]) / 2**20, 1),
        "half_start_mib": round(float(r[0]), 1),
        "last_mib": round(float(r[-1]), 1),
        "max_mib": round(max(s[1] for s in samples) / 2**20, 1),
        "slope_mib_per_min": round(slope, 3),
        "growth_mib": round(float(r[-1] - r[0]), 1),
    }


class RssSampler:
    """Samples a process's RSS every ``every`` seconds on a thread until stopped."""

    def __init__(self, pid: int, every: float) -> None:
        self.pid = pid
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss")
        self._thread.start()

    def _run(self) -> None:
        import psutil

        proc = psutil.Process(self.pid)
        while not self._stop.is_set():
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                return
            self.samples.append((time.monotonic() - self._t0, rss))
            self._stop.wait(self.every)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(5)
        return self.samples


# ---------------------------------------------------------------------------------- the run


@dataclass
class SoakResult:
    duration_s: float
    clients: int
    kv_blocks: int | None
    requests: dict[str, int]
    """Outcomes by status."""
    by_kind: dict[str, int]
    generated_tokens: int
    preemptions_logged: bool
    """The hook said vLLM preempted and recomputed a request (a sign the small cache bit)."""
    stop_signal: str
    stop_s: float
    """Seconds from the stop signal to the server's exit."""
    server_rc: int | None
    check: dict[str, Any]
    rss: dict[str, Any]
    processes: list[dict[str, Any]]
    ok: bool


def run_soak(
    workdir: Path,
    *,
    duration: float,
    clients: int,
    max_requests: int,
    kv_blocks: int | None,
    rss_every: float,
    rss_flat_mib: float,
    stop_signal: int = signal.SIGTERM,
    seed: int = 0,
    log_progress: bool = False,
    logging_on: bool = True,
) -> SoakResult:
    """One soak run (see the module docstring). ``logging_on=False`` runs the same load on a
    server without the hook, for the RSS baseline; its log checks are then skipped."""
    log = workdir / "soak.jsonl"
    server = start_server(workdir, log, kv_blocks=kv_blocks, logging_on=logging_on)
    try:
        wait_ready(server)
        processes = process_tree(server.pid)
        pid = worker_pid(server)
        sampler = RssSampler(pid, rss_every) if pid else None
        load = Load(server.port, server.model, clients, max_requests, seed=seed)
        t0 = time.monotonic()
        load.start()
        while time.monotonic() - t0 < duration and any(t.is_alive() for t in load._threads):
            time.sleep(1.0)
            if log_progress:
                print(
                    f"  {time.monotonic() - t0:5.0f} s  {len(load.outcomes)} requests done",
                    file=sys.stderr,
                )
        load.stop_sending()
        elapsed = time.monotonic() - t0
        samples = sampler.stop() if sampler else []
        stop_s = stop_server(server, stop_signal)
        load.join()
    finally:
        kill_session(server)
    outcomes = list(load.outcomes)
    with (workdir / "outcomes.jsonl").open("w") as f:
        for o in outcomes:
            f.write(json.dumps(asdict(o)) + "\n")
    check = check_log(log, outcomes) if logging_on else LogCheck()
    rss = rss_trend(samples)
    rss_flat = rss.get("growth_mib") is not None and abs(float(rss["growth_mib"])) < rss_flat_mib
    rss["flat"] = rss_flat
    statuses: dict[str, int] = {}
    kinds: dict[str, int] = {}
    for o in outcomes:
        statuses[o.status] = statuses.get(o.status, 0) + 1
        kinds[o.kind] = kinds.get(o.kind, 0) + 1
    return SoakResult(
        duration_s=round(elapsed, 1),
        clients=clients,
        kv_blocks=kv_blocks,
        requests=statuses,
        by_kind=kinds,
        generated_tokens=sum(o.completion_tokens or o.chunks for o in outcomes),
        preemptions_logged="preempted a request" in server.output_text(),
        stop_signal=signal.Signals(stop_signal).name,
        stop_s=round(stop_s, 2),
        server_rc=server.proc.returncode,
        check=asdict(check),
        rss=rss,
        processes=processes,
        ok=check.ok,
    )


def table(result: SoakResult) -> str:
    c, r = result.check, result.rss
    rows = [
        (
            "duration (s), clients, KV blocks",
            f"{result.duration_s}, {result.clients}, {result.kv_blocks}",
        ),
        ("requests by status", json.dumps(result.requests, sort_keys=True)),
        ("requests by kind", json.dumps(result.by_kind, sort_keys=True)),
        ("generated tokens", str(result.generated_tokens)),
        ("preemption seen (hook's warning)", str(result.preemptions_logged)),
        ("routes in log / layers", f"{c['routes']} / {c['layers']}"),
        ("finished: exact / all", f"{c['finished_exact']} / {c['finished']}"),
        ("aborted: contiguous prefix / all", f"{c['aborted_ok']} / {c['aborted']}"),
        (
            "cut by stop: in log / contiguous / exact (with usage)",
            f"{c['cut_in_log']} / {c['cut_contiguous']} / {c['cut_exact']}",
        ),
        (
            "duplicates, missing, unknown",
            f"{c['duplicates']}, {c['missing']}, {c['unknown_in_log']}",
        ),
        ("closing record", json.dumps(c["end"]) if c["end"] else "MISSING"),
        (
            f"stop ({result.stop_signal}) took (s), server rc",
            f"{result.stop_s}, {result.server_rc}",
        ),
        (
            "worker RSS first / 2nd half start / last / max (MiB)",
            " / ".join(
                str(r.get(k)) for k in ("first_mib", "half_start_mib", "last_mib", "max_mib")
            ),
        ),
        (
            "worker RSS 2nd half slope (MiB/min), growth (MiB)",
            f"{r.get('slope_mib_per_min')}, {r.get('growth_mib')} "
            f"({'flat' if r.get('flat') else 'NOT flat'})",
        ),
        ("verdict", "PASS" if result.ok else "FAIL: " + "; ".join(c["problems"][:3])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--max-requests", type=int, default=5000, help="requests in all, at most")
    p.add_argument(
        "--kv-blocks",
        type=int,
        default=DEFAULT_KV_BLOCKS,
        help=f"KV cache blocks of {BLOCK_SIZE} tokens (--num-gpu-blocks-override; small forces "
        f"preemption; default {DEFAULT_KV_BLOCKS})",
    )
    p.add_argument("--rss-every", type=float, default=2.0, help="RSS sample period (s)")
    p.add_argument(
        "--rss-flat-mib",
        type=float,
        default=16.0,
        help="2nd-half RSS growth under which memory counts as flat (MiB)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-log",
        action="store_true",
        help="the same load without the hook (RSS baseline; no log checks)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="keep the log and output here")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import tempfile

    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            result = run_soak(
                workdir,
                duration=args.duration,
                clients=args.clients,
                max_requests=args.max_requests,
                kv_blocks=args.kv_blocks,
                rss_every=args.rss_every,
                rss_flat_mib=args.rss_flat_mib,
                seed=args.seed,
                log_progress=True,
                logging_on=not args.no_log,
            )
        except RuntimeError as e:
            print(f"soak: {e}", file=sys.stderr)
            return 2
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0 if result.ok else 1


@contextlib.contextmanager
def running_server(workdir: Path, log: Path, **kwargs: Any) -> Iterator[Server]:
    """A started, ready server that is killed (its whole session) on the way out."""
    server = start_server(workdir, log, **kwargs)
    try:
        wait_ready(server)
        yield server
    finally:
        kill_session(server)


if __name__ == "__main__":
    sys.exit(main())
