"""``moeprof prompts``: the GSM8K slice, the prompts file format, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeprof import prompts
from moeprof.cli import app
from moeprof.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"
needs_shared = pytest.mark.skipif(
    not SHARED.is_file(), reason=f"the shared GSM8K file {SHARED} is absent"
)
runner = CliRunner()


def _first_questions(n: int) -> list[str]:
    with SHARED.open() as fh:
        return [json.loads(next(fh))["question"] for _ in range(n)]


@needs_shared
def test_prompts_from_the_shared_file_are_the_first_25_questions_in_order(tmp_path: Path) -> None:
    out = tmp_path / "prompts.txt"
    result = runner.invoke(app, ["prompts", "--source", str(SHARED), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert prompts.read_prompts(out) == [q.strip() for q in _first_questions(25)]


@needs_shared
def test_jsonl_prompts_keep_index_and_text(tmp_path: Path) -> None:
    out, jsonl = tmp_path / "p.txt", tmp_path / "p.jsonl"
    result = runner.invoke(
        app, ["prompts", "-n", "3", "--source", str(SHARED), "-o", str(out), "--jsonl", str(jsonl)]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["idx"] for r in rows] == [0, 1, 2]
    assert [r["prompt"] for r in rows] == _first_questions(3)
    assert prompts.read_prompts(jsonl) == _first_questions(3)


def test_an_existing_prompts_file_is_not_overwritten_without_force(tmp_path: Path) -> None:
    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps({"question": "What is 2+2?"}) + "\n")
    out = tmp_path / "prompts.txt"
    out.write_text("mine\n")
    result = runner.invoke(app, ["prompts", "-n", "1", "--source", str(src), "-o", str(out)])
    assert result.exit_code == 2
    assert "already exists" in result.output and out.read_text() == "mine\n"
    result = runner.invoke(
        app, ["prompts", "-n", "1", "--source", str(src), "-o", str(out), "--force"]
    )
    assert result.exit_code == 0 and out.read_text() == "What is 2+2?\n"


def test_when_either_target_exists_neither_is_written(tmp_path: Path) -> None:
    out, jsonl = tmp_path / "p.txt", tmp_path / "p.jsonl"
    jsonl.write_text("mine\n")
    with pytest.raises(UserError, match=r"p\.jsonl: already exists \(use --force to overwrite\)"):
        prompts.write_prompts(["q"], out, jsonl)
    assert not out.exists() and jsonl.read_text() == "mine\n"
    assert prompts.write_prompts(["q"], out, jsonl, force=True) == [out, jsonl]
    assert prompts.read_prompts(jsonl) == prompts.read_prompts(out) == ["q"]


def test_a_bad_source_line_is_named_with_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps({"question": "ok"}) + "\n" + '{"answer": 1}\n')
    with pytest.raises(UserError, match=r"src\.jsonl:2: no 'question' field"):
        prompts.load_gsm8k(2, src)


def test_too_few_questions_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps({"question": "only one"}) + "\n")
    with pytest.raises(UserError, match="only 1 questions, 5 asked for"):
        prompts.load_gsm8k(5, src)


def test_an_unreachable_hub_points_to_source(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    result = runner.invoke(app, ["prompts", "-o", "unused.txt"])
    assert result.exit_code == 2
    assert "--source" in result.output and "Traceback" not in result.output
