"""``moeprof generate`` without an engine: checks before the runs, files after them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moeprof import generate
from moeprof.errors import UserError
from moeprof.schema import OutputRecord


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("What is 2+2?\n\n---\n\nWhat is 3+3?\n\n---\n\nWhat is 4+4?\n")
    return path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A local model folder small enough for a CPU."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"hidden_size": 8, "num_hidden_layers": 2}))
    return path


def _prepare(prompts_file: Path, model_dir: Path, out: Path, **kw: Any) -> generate.Job:
    return generate.prepare(
        prompts_file, out_dir=out, log=None, layer=2, model=str(model_dir), **kw
    )


def test_prepare_builds_the_settings_and_runs_and_makes_the_folder(
    prompts_file: Path, model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "run1"
    job = _prepare(prompts_file, model_dir, out, num_prompts=2, repeat=3, max_tokens=16)
    assert out.is_dir()
    assert job.settings.prompts == ["What is 2+2?", "What is 3+3?"]
    assert job.settings.model == str(model_dir.absolute())
    assert (job.settings.max_tokens, job.settings.repeat, job.layer) == (16, 3, 2)
    assert job.total_prompts == 6
    assert job.paths == {
        "log": out / "moe_routes.jsonl",
        "timing": out / "timing.json",
        "outputs": out / "outputs.jsonl",
    }
    assert job.arms == (("baseline", None), ("logged", out / "moe_routes.jsonl"))


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        ({}, ["baseline", "logged"]),
        ({"baseline": False}, ["logged"]),
        ({"baseline_only": True}, ["baseline"]),
        ({"baseline": False, "baseline_only": True}, ["baseline"]),
    ],
)
def test_the_runs_follow_the_baseline_flags(flags: dict[str, bool], names: list[str]) -> None:
    assert [name for name, _ in generate.arms(Path("log.jsonl"), **flags)] == names


def test_files_of_a_previous_run_are_refused_before_anything_starts(
    prompts_file: Path, model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "timing.json").write_text("{}")
    with pytest.raises(UserError, match=r"timing\.json: already exists \(use --force to overwr"):
        _prepare(prompts_file, model_dir, out)
    assert _prepare(prompts_file, model_dir, out, force=True).force


def test_a_missing_prompts_file_is_named_first(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such prompts file"):
        _prepare(tmp_path / "nope.txt", model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _result(tokens: list[int], wall: float) -> dict[str, Any]:
    return {
        "engine_start_sec": 1.0,
        "passes": [{"wall_time_sec": wall, "tokens_generated": len(tokens), "prompt_tokens": 4}],
        "outputs": [
            {
                "req_id": "0",
                "prompt_idx": 0,
                "repeat": 0,
                "prompt_tokens": 4,
                "generated_tokens": len(tokens),
                "output_token_ids": tokens,
                "text": "x",
                "finish_reason": "length",
            }
        ],
        "warmup_outputs": [],
        "vllm_version": "0.0.fake",
        "torch_version": "0.0.fake",
    }


def test_run_job_runs_each_arm_and_writes_timing_and_outputs(
    prompts_file: Path, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    job = _prepare(prompts_file, model_dir, out, num_prompts=1)
    calls: list[tuple[str, Path | None, Path]] = []

    def fake_engine(name: str, settings: generate.Settings, **kw: Any) -> dict[str, Any]:
        calls.append((name, kw["log"], kw["vllm_log"]))
        kw["on_event"](name, {"event": "engine_starting"})
        if kw["log"] is not None:
            kw["log"].write_text('{"type":"meta"}\n' + '{"type":"route"}\n' * 5)
        return _result([5, 6], 2.0 if name == "baseline" else 2.2)

    monkeypatch.setattr(generate, "run_engine", fake_engine)
    events: list[tuple[str, dict[str, Any]]] = []
    report = generate.run_job(job, on_event=lambda name, e: events.append((name, e)))
    assert calls == [
        ("baseline", None, out / "vllm-baseline.log"),
        ("logged", out / "moe_routes.jsonl", out / "vllm-logged.log"),
    ]
    assert [name for name, _ in events] == ["baseline", "logged"]
    assert json.loads((out / "timing.json").read_text()) == report
    assert report["log"]["routes"] == 5 and report["identical_tokens"] is True
    assert report["overhead_pct"] == pytest.approx(10.0)
    (line,) = (out / "outputs.jsonl").read_text().splitlines()
    assert OutputRecord.model_validate_json(line).output_token_ids == [5, 6]
    assert sorted(p.name for p in out.iterdir()) == [
        "moe_routes.jsonl",
        "outputs.jsonl",
        "timing.json",
    ]
