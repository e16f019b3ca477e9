"""The log's sinks inside real vLLM (the CPU build) on the embedded tiny model, every layer.

Four engines, eager (the sinks do not care how the model runs; test_hook_vllm keeps the compiled
path): a JSONL and a Parquet run of the same prompts (same routes, closing records), a run
whose log sits on a real 300 KB tmpfs (a full disk), and a Parquet run killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")

from tiny_engine import PROMPTS, run_tiny

from moeprof import generate
from moeprof.analysis.reader import open_log
from moeprof.analysis.validate import validate_log
from moeprof.columns import END_KEY, META_KEY
from moeprof.export import export
from moeprof.hook.sinks import part_names
from moeprof.tiny import CONFIG, tiny_model_path

pytestmark = pytest.mark.vllm

NUM_LAYERS = CONFIG["num_hidden_layers"]
SAME_SCHEDULE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
"""The engine core in the caller's process: every prompt is queued before the first step, so
two runs batch the same tokens in the same steps (with the core in its own process, the first
steps start while requests still arrive, and step numbers and float rounding differ)."""


def _run(name: str, tmp: Path, log: Path, prompts: list[str], max_tokens: int, **env: str) -> dict:
    return run_tiny(
        name, tmp, log, prompts=prompts, max_tokens=max_tokens, enforce_eager=True, extra_env=env
    )


def _expected_routes(result: dict) -> int:
    """Every real token at every layer: prompt + generated - 1 tokens per request."""
    return NUM_LAYERS * sum(
        o["prompt_tokens"] + o["generated_tokens"] - 1 for o in result["outputs"]
    )


def _parquet_table(path: Path) -> dict[str, list]:
    columns: dict[str, list] = {}
    for name in part_names(path):
        for key, values in pq.read_table(path / name, use_threads=False).to_pydict().items():
            columns.setdefault(key, []).extend(values)
    return columns


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("sinks")
    jsonl, parquet = tmp / "routes.jsonl", tmp / "routes.parquet"
    by_process = tmp / "process.jsonl"
    return {
        "jsonl": jsonl,
        "parquet": parquet,
        "by_process": by_process,
        "jsonl_run": _run("jsonl", tmp, jsonl, PROMPTS, 12, **SAME_SCHEDULE),
        "parquet_run": _run("parquet", tmp, parquet, PROMPTS, 12, **SAME_SCHEDULE),
        # the engine core in its own process, as users run it: vLLM then pins the CPU
        # worker's compute core (and the writer process must leave it)
        "process_run": _run("process", tmp, by_process, PROMPTS, 12, VLLM_LOG_MOE_WRITER="process"),
        "process_output": tmp / "process.txt",
    }


def test_a_parquet_log_holds_the_routes_of_a_jsonl_log_of_the_same_prompts(pair: dict) -> None:
    assert generate.token_ids(pair["jsonl_run"]) == generate.token_ids(pair["parquet_run"])
    log = open_log(pair["jsonl"])
    chunks = list(log.chunks())
    req = np.concatenate([c.req for c in chunks])
    j = {
        "req_id": [log.req_ids[r] for r in req],
        "token_idx": np.concatenate([c.token_idx for c in chunks]).tolist(),
        "layer": np.concatenate([c.layer for c in chunks]).tolist(),
        "topk_ids": np.concatenate([c.ids for c in chunks]).tolist(),
        "phase": [("prefill", "decode")[p] for p in np.concatenate([c.phase for c in chunks])],
        "step": np.concatenate([c.step for c in chunks]).tolist(),
    }
    p = _parquet_table(pair["parquet"])
    assert len(p["req_id"]) == len(j["req_id"]) == _expected_routes(pair["parquet_run"])
    for key, values in j.items():
        assert p[key] == values, key
    # both logs hold the router's float32 weights bit for bit
    pw = np.array(p["topk_weights"], np.float32)
    jw = np.concatenate([c.weights for c in chunks]).astype(np.float32)
    assert pw.tobytes() == jw.tobytes()


def test_the_parquet_log_exported_to_jsonl_is_the_jsonl_log_line_for_line(
    pair: dict, tmp_path: Path
) -> None:
    exported = tmp_path / "exported.jsonl"
    export(pair["parquet"], exported)
    ours = exported.read_text().splitlines()
    theirs = pair["jsonl"].read_text().splitlines()
    # the route lines are byte-identical (weights bit-exact); meta and closing record differ
    # only in when they were written
    assert ours[1:-1] == theirs[1:-1]
    for a, b in ((ours[0], theirs[0]), (ours[-1], theirs[-1])):
        x, y = json.loads(a), json.loads(b)
        assert {**x, "created": 0, "closed": 0} == {**y, "created": 0, "closed": 0}


def test_the_writer_process_logs_a_real_engine_exactly(pair: dict, tmp_path: Path) -> None:
    """``VLLM_LOG_MOE_WRITER=process`` on vLLM's CPU worker, which pins its compute core and
    hands the writer process OpenMP's pinning variables: the writer starts (in the worker's
    session, off that core) and the log is exact."""
    result, log = pair["process_run"], pair["by_process"]
    outputs = tmp_path / "outputs.jsonl"
    generate.write_outputs(outputs, result)
    report = validate_log(log, outputs=outputs)
    assert report.valid and report.complete, report
    assert report.routes == _expected_routes(result)
    assert "(moeprof-writer pid=" in pair["process_output"].read_text()  # it was the process


def test_both_logs_end_with_the_same_closing_record(pair: dict) -> None:
    end_line = json.loads(pair["jsonl"].read_text().splitlines()[-1])
    last = part_names(pair["parquet"])[-1]
    kv = pq.ParquetFile(pair["parquet"] / last).metadata.metadata
    end_part = json.loads(kv[END_KEY])
    expected = _expected_routes(pair["jsonl_run"])
    for end in (end_line, end_part):
        assert end["type"] == "end"
        assert (end["routes"], end["dropped"], end["stopped"]) == (expected, 0, None)
        assert end["requests"] == len(PROMPTS)
        assert end["steps"] > 0
    assert {k: v for k, v in end_line.items() if k != "closed"} == {
        k: v for k, v in end_part.items() if k != "closed"
    }
    meta = json.loads(pair["jsonl"].read_text().splitlines()[0])
    for name in part_names(pair["parquet"]):
        part_meta = json.loads(pq.ParquetFile(pair["parquet"] / name).metadata.metadata[META_KEY])
        assert {k: v for k, v in part_meta.items() if k != "created"} == {
            k: v for k, v in meta.items() if k != "created"
        }


# --- a full disk: a real 300 KB tmpfs in a private mount namespace ------------------------------

_ON_TMPFS = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from test_sinks_vllm import _run
prompts = ["Question %d: Janet's ducks lay 16 eggs per day. How many do they lay in a week?" % i
           for i in range(16)]
result = _run("tmpfs", Path(sys.argv[1]), Path(sys.argv[2]), prompts, 48)
Path(sys.argv[3]).write_text(json.dumps(result))
"""


def test_a_full_disk_keeps_what_fit_and_the_engine_goes_on(tmp_path: Path) -> None:
    if not shutil.which("unshare"):
        pytest.skip("unshare is not installed: cannot mount a small tmpfs")
    mnt, out = tmp_path / "mnt", tmp_path / "routes.jsonl"
    mnt.mkdir()
    script = tmp_path / "on_tmpfs.py"
    script.write_text(_ON_TMPFS)
    result_path = tmp_path / "result.json"
    log = mnt / "routes.jsonl"
    cmd = (
        f"mount -t tmpfs -o size=300k tmpfs {mnt} && {sys.executable} {script} {tmp_path} {log} "
        f"{result_path} {Path(__file__).parent}; rc=$?; cp {log} {out}; exit $rc"
    )
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0 and not result_path.exists() and not out.exists():
        pytest.skip(f"cannot mount a tmpfs in a private namespace here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert len(result["outputs"]) == 16  # the engine went on and finished every request
    text = out.read_bytes()
    assert text.endswith(b"\n") and len(text) > 250_000
    lines = [json.loads(line) for line in text.splitlines()]
    end = lines[-1] if lines[-1]["type"] == "end" else None
    on_disk = sum(1 for r in lines if r["type"] == "route")
    engine_output = (tmp_path / "tmpfs.txt").read_text()
    stops = [line for line in engine_output.splitlines() if "stopped after" in line]
    assert len(stops) == 1, engine_output[-3000:]
    assert f"moeprof: logging to {log} stopped after {on_disk} routes on disk (" in stops[0]
    assert "No space left on device" in stops[0] and stops[0].endswith("(the engine goes on)")
    # the closing line fit (the cut left room for it): it accounts for every route routed
    assert end is not None, engine_output[-3000:]
    assert end["routes"] == on_disk and "No space left on device" in end["stopped"]
    assert end["routes"] + end["dropped"] == _expected_routes(result)


# --- SIGKILL: every closed part stays readable --------------------------------------------------

_GENERATE_FOREVER = """
import sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], enforce_eager=True, max_model_len=256, dtype="float32")
    prompts = ["Question %d: how many eggs do 16 ducks lay in a week?" % i for i in range(4000)]
    llm.generate(prompts, SamplingParams(max_tokens=200, ignore_eos=True), use_tqdm=False)
"""


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_sigkill_leaves_every_closed_parquet_part_readable(tmp_path: Path, writer: str) -> None:
    """SIGKILL to the whole engine (its process group). The writer thread dies with the worker:
    the log keeps every part it had closed. The writer process is not in that group (nor in a
    crash's way): it writes every step the worker had handed over, closes the log without a
    closing record, says how many routes it holds, and exits."""
    log = tmp_path / "routes.parquet"
    script = tmp_path / "forever.py"
    script.write_text(_GENERATE_FOREVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_LOG_MOE", "_MOEPROF"))}
    env |= {
        "VLLM_LOG_MOE": str(log),
        "VLLM_MOE_LAYER": "all",
        "VLLM_LOG_MOE_PART_SEC": "0.5",
        "VLLM_LOG_MOE_WRITER": writer,
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    engine_txt = tmp_path / "engine.txt"
    with open(engine_txt, "w") as output:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tiny_model_path())],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: the engine core and workers too
        )
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and proc.poll() is None:
                if log.is_dir() and len(part_names(log)) >= 2:
                    break
                time.sleep(0.1)
            assert proc.poll() is None, engine_txt.read_text()[-3000:]
            assert len(part_names(log)) >= 2, "no part was closed in time"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    kept = None
    if writer == "process":
        deadline = time.monotonic() + 60
        while kept is None and time.monotonic() < deadline:
            found = re.search(r"keeps the (\d+) routes it had handed over", engine_txt.read_text())
            kept = int(found.group(1)) if found else None
            time.sleep(0.1)
        assert kept is not None, engine_txt.read_text()[-3000:]
    names = part_names(log)
    assert names == [f"part-{i:05d}.parquet" for i in range(len(names))]
    total = 0
    for name in names:  # every part complete: footer, meta, rows
        f = pq.ParquetFile(log / name)
        assert META_KEY in f.metadata.metadata and END_KEY not in f.metadata.metadata
        table = pq.read_table(log / name, use_threads=False)
        total += table.num_rows
        assert table.num_rows > 0 and set(table.column("layer").to_pylist()) <= set(
            range(NUM_LAYERS)
        )
    assert total > 0
    if kept is not None:
        assert total == kept


# --- a log path that cannot be written: refused before the model loads (issue 15, defect 6) ----

_START = """
import sys
from vllm import LLM
if __name__ == "__main__":
    LLM(model=sys.argv[1], enforce_eager=True, max_model_len=256, dtype="float32")
    print("the engine started", flush=True)
"""


@pytest.mark.parametrize("kind", ["dangling-symlink", "parquet-file"])
def test_a_bad_log_path_is_refused_before_the_model_loads_in_the_last_line(
    tmp_path: Path, kind: str
) -> None:
    if kind == "dangling-symlink":
        log = tmp_path / "routes.jsonl"
        log.symlink_to(tmp_path / "gone" / "routes.jsonl")
        reason = f"moeprof: VLLM_LOG_MOE={log} is a dangling symbolic link"
    else:
        log = tmp_path / "routes.parquet"
        log.write_text("not a directory")
        reason = f"moeprof: {log} exists and is not a directory"
    script = tmp_path / "start.py"
    script.write_text(_START)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_LOG_MOE", "_MOEPROF"))}
    env |= {"VLLM_LOG_MOE": str(log), "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_model_path())],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "the engine started" not in output
    assert "Starting to load model" not in output  # refused in the first process
    last = proc.stderr.strip().splitlines()[-1]
    assert reason in last  # the reason is the last line of the error, one line
