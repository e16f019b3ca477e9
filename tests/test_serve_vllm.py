"""``moeprof serve`` on the tiny model: one real OpenAI-compatible server for every assertion.

The server is started as a user would (``python -m moeprof serve tiny --log ... [vLLM options]``)
on 127.0.0.1, answers a completion, a completion of two prompts, a completion with ``n=2`` and a
chat completion, and is stopped with SIGINT sent to moeprof (which forwards it). The log must
then hold exactly those requests under the ids the README's rule gives, end with its closing
record, and pass ``validate``.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")

from moeprof.serve import logged_req_ids

pytestmark = pytest.mark.vllm

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
"""The tiny model's tokenizer has no chat template; this one goes through ``--chat-template``,
a vLLM option moeprof passes on."""
PROMPT = "A farmer has 12 cows and buys 7 more."
NEW_TOKENS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except OSError:
        return 0


def _post(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{path}: {e.code} {e.read()[:500]!r}") from None


@dataclass
class Served:
    log: Path
    returncode: int
    output: str
    """moeprof's own lines (stderr) and the server's (stdout)."""
    responses: dict[str, dict[str, Any]]
    routes: list[dict[str, Any]]
    end: dict[str, Any] | None


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    tmp = tmp_path_factory.mktemp("serve")
    log = tmp / "routes.jsonl"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_LOG_MOE", "_MOEPROF"))}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    out = open(tmp / "serve.txt", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moeprof",
            "serve",
            "tiny",
            "--log",
            str(log),
            "--log-layer",
            "all",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--enforce-eager",
            "--max-model-len",
            "256",
            "--no-enable-prefix-caching",
            "--seed",
            "1234",
            "--chat-template",
            CHAT_TEMPLATE,
        ],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    responses: dict[str, dict[str, Any]] = {}
    try:
        deadline = time.monotonic() + 400
        while _get(f"http://127.0.0.1:{port}/health") != 200:
            assert proc.poll() is None, (tmp / "serve.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "moeprof serve did not come up"
            time.sleep(2)
        common = {"model": "tiny", "max_tokens": NEW_TOKENS, "temperature": 0.0}
        responses["completion"] = _post(port, "/v1/completions", {**common, "prompt": PROMPT})
        responses["two_prompts"] = _post(
            port, "/v1/completions", {**common, "prompt": [PROMPT, "Two trains leave at noon."]}
        )
        responses["n2"] = _post(
            port,
            "/v1/completions",
            {**common, "prompt": PROMPT, "n": 2, "temperature": 1.0, "seed": 7},
        )
        responses["chat"] = _post(
            port,
            "/v1/chat/completions",
            {**common, "messages": [{"role": "user", "content": PROMPT}]},
        )
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # moeprof only: it forwards to the server
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines[1:]]
    end = records.pop() if records and records[-1].get("type") == "end" else None
    return Served(log, proc.returncode, (tmp / "serve.txt").read_text(), responses, records, end)


def _by_request(routes: list[dict[str, Any]]) -> dict[str, collections.Counter[int]]:
    """req_id -> how many routes each position has (one per logged layer)."""
    out: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for r in routes:
        out[r["req_id"]][r["token_idx"]] += 1
    return out


def test_serve_says_where_the_log_goes_and_that_it_is_complete(served: Served) -> None:
    assert f"to {served.log}" in served.output.replace("\n", "")
    assert "SIGINT: stopping the server" in served.output
    assert "log complete" in served.output, served.output[-3000:]
    assert served.returncode == 0, served.output[-3000:]


def test_the_log_ends_with_its_closing_record_counting_every_route(served: Served) -> None:
    assert served.end is not None
    assert served.end["routes"] == len(served.routes)


def test_requests_are_logged_under_the_documented_ids_and_nothing_else(served: Served) -> None:
    """The rule README states: completions ``{id}-{prompt index}``, chat ``{id}``, and with
    n > 1 ``{choice index}_`` before either."""
    r = served.responses
    assert logged_req_ids("cmpl-x", prompts=2) == ["cmpl-x-0", "cmpl-x-1"]
    assert logged_req_ids("cmpl-x", n=2) == ["0_cmpl-x-0", "1_cmpl-x-0"]
    assert logged_req_ids("chatcmpl-x", chat=True) == ["chatcmpl-x"]
    expected = {
        *logged_req_ids(r["completion"]["id"]),
        *logged_req_ids(r["two_prompts"]["id"], prompts=2),
        *logged_req_ids(r["n2"]["id"], n=2),
        *logged_req_ids(r["chat"]["id"], chat=True),
    }
    assert set(_by_request(served.routes)) == expected


def test_a_completion_has_one_route_per_layer_for_every_token_but_the_last(
    served: Served,
) -> None:
    layers = len(json.loads(served.log.read_text().splitlines()[0])["layers_logged"])
    for name in ("completion", "chat"):
        response = served.responses[name]
        usage = response["usage"]
        chat = name == "chat"
        (req,) = logged_req_ids(response["id"], chat=chat)
        positions = _by_request(served.routes)[req]
        total = usage["prompt_tokens"] + usage["completion_tokens"] - 1
        assert positions == dict.fromkeys(range(total), layers), name


def test_each_choice_of_n2_is_logged_from_its_own_prefill(served: Served) -> None:
    """Each choice is its own engine request: prompt prefilled once per choice."""
    response = served.responses["n2"]
    usage = response["usage"]
    by_req = _by_request(served.routes)
    generated = 0
    for req in logged_req_ids(response["id"], n=2):
        positions = sorted(by_req[req])
        assert positions == list(range(len(positions)))
        generated += len(positions) - usage["prompt_tokens"] + 1
    assert generated == usage["completion_tokens"]


def test_the_log_validates_clean_after_shutdown(served: Served) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "moeprof", "validate", str(served.log), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["valid"] and not report["errors"]


def test_a_hook_refusal_ends_serve_with_its_one_line_and_exit_1(tmp_path: Path) -> None:
    """Another process holds the log's lock (as a second server writing it would): the hook
    refuses when the engine starts, the server exits, and moeprof's last line is the hook's
    reason (the server's traceback above it is vLLM's own output, passed through)."""
    import fcntl

    log = tmp_path / "held.jsonl"
    log.write_text("held by another writer\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_LOG_MOE", "_MOEPROF"))}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    with open(log, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "moeprof",
                "serve",
                "tiny",
                "--log",
                str(log),
                "--force",
                "--host",
                "127.0.0.1",
                "--port",
                str(_free_port()),
                "--enforce-eager",
                "--max-model-len",
                "128",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: moeprof: ") and "another process" in last, proc.stderr[-2000:]
    assert log.read_text() == "held by another writer\n"
