"""``moeprof generate`` end to end on the tiny model: files, fields, exact accounting, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")

pytestmark = pytest.mark.vllm

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"
NEW_TOKENS = 64
FALLBACK_QUESTIONS = [
    "Janet's ducks lay 16 eggs per day. How much does she make every day?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts?",
    "Josh buys a house for $80,000 and puts in $50,000 in repairs. What is his profit?",
]


def _questions() -> list[str]:
    """25 GSM8K questions x 64 tokens: enough bf16 decoding for a changed kernel to flip a token
    (inline capture copies once did, in 2 of these 25 requests); 3 built-in ones without it."""
    if not SHARED.is_file():
        return FALLBACK_QUESTIONS
    with SHARED.open() as fh:
        return [json.loads(next(fh))["question"] for _ in range(25)]


QUESTIONS = _questions()


def moeprof(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moeprof", *args], capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("generate")
    (out / "prompts.txt").write_text("\n\n---\n\n".join(QUESTIONS) + "\n")
    proc = moeprof(
        "generate",
        "--model",
        "tiny",
        "--prompts",
        str(out / "prompts.txt"),
        "--out-dir",
        str(out),
        "--log-layer",
        "2",
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--ignore-eos",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_generate_writes_timing_with_both_runs_and_their_overhead(run: Path) -> None:
    timing = json.loads((run / "timing.json").read_text())
    for section in ("no_log", "log"):
        s = timing[section]
        assert s["tokens_generated"] == len(QUESTIONS) * NEW_TOKENS
        assert s["prompt_tokens"] > 3
        assert s["wall_time_sec"] > 0 and s["engine_start_sec"] > 0
        assert s["tokens_per_sec"] == pytest.approx(s["tokens_generated"] / s["wall_time_sec"])
    expected = timing["log"]["prompt_tokens"] + len(QUESTIONS) * (NEW_TOKENS - 1)
    assert timing["log"]["routes"] == expected
    assert isinstance(timing["overhead_pct"], float)
    assert timing["identical_tokens"] is True
    assert timing["prefix_caching"] is False
    assert timing["log"]["layers"] == "2"
    assert timing["log"]["cached_prompt_tokens"] == [0]
    assert timing["settings"]["max_tokens"] == NEW_TOKENS and timing["settings"]["seed"] == 1234


def test_generate_writes_one_output_record_per_request(run: Path) -> None:
    records = [json.loads(line) for line in (run / "outputs.jsonl").read_text().splitlines()]
    assert [r["prompt_idx"] for r in records] == list(range(len(QUESTIONS)))
    assert all(len(r["output_token_ids"]) == r["generated_tokens"] == NEW_TOKENS for r in records)
    assert all(isinstance(r["text"], str) and r["req_id"] for r in records)
    # prefix caching off: nothing cached, and the prompt's ids are there to compare runs with
    assert all(r["num_cached_tokens"] == 0 for r in records)
    assert all(len(r["prompt_token_ids"]) == r["prompt_tokens"] for r in records)


def test_the_log_passes_validate_with_the_outputs_exactly(run: Path) -> None:
    proc = moeprof(
        "validate", str(run / "moe_routes.jsonl"), "--outputs", str(run / "outputs.jsonl")
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_second_run_into_the_same_folder_needs_force(run: Path) -> None:
    before = (run / "moe_routes.jsonl").read_bytes()
    proc = moeprof(
        "generate", "--model", "tiny", "--prompts", str(run / "prompts.txt"), "--out-dir", str(run)
    )
    assert proc.returncode == 2
    assert "already exist" in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run / "moe_routes.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    ("content", "reason"), [(None, "no such prompts file"), ("\n\n", "the prompts file is empty")]
)
def test_a_missing_or_empty_prompts_file_is_a_one_line_error(
    tmp_path: Path, content: str | None, reason: str
) -> None:
    prompts = tmp_path / "prompts.txt"
    if content is not None:
        prompts.write_text(content)
    proc = moeprof("generate", "--prompts", str(prompts), "--out-dir", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert reason in proc.stderr and str(prompts) in proc.stderr
    assert "Traceback" not in proc.stderr


def _lines_without_progress(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_hook_refusal_is_the_one_moeprof_line_and_exit_1(tmp_path: Path) -> None:
    """A real refusal that only the hook can make: another process holds the log's lock (as a
    second engine writing it would), so the engine refuses at start; generate prints the
    hook's one line, no traceback, and leaves the other writer's file alone."""
    import fcntl

    (tmp_path / "prompts.txt").write_text(QUESTIONS[0] + "\n")
    log = tmp_path / "held.jsonl"
    log.write_text("held by another writer\n")
    with open(log, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = moeprof(
            "generate",
            "--model",
            "tiny",
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--out-dir",
            str(tmp_path / "out"),
            "--log",
            str(log),
            "--no-baseline",
            "--force",
            "--max-new-tokens",
            "2",
        )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = _lines_without_progress(proc.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: moeprof: "), proc.stderr
    assert str(log) in errors[0] and "another process" in errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert log.read_text() == "held by another writer\n"


def test_logging_stopped_by_a_full_disk_is_printed_and_exits_3(tmp_path: Path) -> None:
    """The log on a real 100 KiB tmpfs (a private mount namespace): the hook stops logging when
    it is full and the engine goes on; generate finishes the run, prints the hook's line and
    exits 3, with timing.json and outputs.jsonl written."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (a private mount namespace) is not available here")
    (tmp_path / "prompts.txt").write_text("\n\n---\n\n".join(QUESTIONS[:3] * 3) + "\n")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "moeprof",
        "generate",
        "--model",
        "tiny",
        "--prompts",
        str(tmp_path / "prompts.txt"),
        "--out-dir",
        str(out),
        "--log",
        str(disk / "routes.jsonl"),
        "--log-layer",
        "all",
        "--no-baseline",
        "--max-new-tokens",
        "48",
        "--ignore-eos",
    ]
    script = f'mount -t tmpfs -o size=100k tmpfs {disk} && exec "$@"'
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", *command],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "moeprof: " in errors[0] and "stopped" in errors[0], proc.stderr
    assert (out / "timing.json").is_file() and (out / "outputs.jsonl").is_file()
    timing = json.loads((out / "timing.json").read_text())
    assert "stopped" in timing["log"]["stopped"]
