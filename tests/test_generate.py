"""``moeprof generate`` without an engine: checks before the runs, files after them."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from moeprof import engine_run, generate
from moeprof.errors import UserError
from moeprof.layers import parse_layers
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
        prompts_file, out_dir=out, log=None, model=str(model_dir), **({"layer": 2} | kw)
    )


def test_prepare_builds_the_settings_and_runs_and_makes_the_folder(
    prompts_file: Path, model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "run1"
    job = _prepare(prompts_file, model_dir, out, num_prompts=2, repeat=3, max_tokens=16)
    assert out.is_dir()
    assert job.settings.prompts == ["What is 2+2?", "What is 3+3?"]
    assert job.settings.model == str(model_dir.absolute())
    assert (job.settings.max_tokens, job.settings.repeat, str(job.layers)) == (16, 3, "2")
    assert job.settings.prefix_caching is False
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


@pytest.mark.parametrize(
    ("layer", "canonical"),
    [
        (0, "0"),
        (12, "12"),
        ("1", "1"),
        ("23, 0,12", "0,12,23"),
        ("0-11,23", "0-11,23"),
        (" ALL ", "all"),
        (parse_layers("3-4"), "3-4"),
    ],
)
def test_layer_selections_are_parsed_up_front_and_passed_on_in_canonical_form(
    prompts_file: Path, model_dir: Path, tmp_path: Path, layer: Any, canonical: str
) -> None:
    job = _prepare(prompts_file, model_dir, tmp_path / "out", layer=layer)
    assert str(job.layers) == canonical
    env = generate._engine_env(job.settings, tmp_path / "l.jsonl", job.layers, False)
    assert env["VLLM_MOE_LAYER"] == canonical
    assert "VLLM_MOE_LAYER" not in generate._engine_env(job.settings, None, job.layers, False)


def test_the_default_layer_is_0(prompts_file: Path, model_dir: Path, tmp_path: Path) -> None:
    job = generate.prepare(prompts_file, out_dir=tmp_path / "out", log=None, model=str(model_dir))
    assert str(job.layers) == "0"


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        ("1-x", "--log-layer: '1-x' is not a layer selection"),
        ("5-2", "--log-layer: '5-2': range 5-2 runs backwards"),
        ("", "--log-layer: no layer given"),
        (-1, "--log-layer: '-1' is not a layer selection"),
        (True, "--log-layer: True is not a layer selection"),
    ],
)
def test_a_bad_layer_selection_is_refused_before_anything_else(
    model_dir: Path, tmp_path: Path, layer: Any, reason: str
) -> None:
    """Even before a missing prompts file: the typo is in the same command line."""
    with pytest.raises(UserError, match="^" + reason.replace("(", r"\(")):
        _prepare(tmp_path / "nope.txt", model_dir, tmp_path / "out", layer=layer)
    assert not (tmp_path / "out").exists()


def test_run_engine_refuses_a_bad_layer_before_starting_a_process(tmp_path: Path) -> None:
    settings = generate.Settings(model="m", model_label="m", prompts=["x"])
    with pytest.raises(UserError, match="not a layer selection"):
        generate.run_engine(
            "logged",
            settings,
            log=tmp_path / "l.jsonl",
            layer="twelve",
            vllm_log=tmp_path / "vllm.txt",
            on_event=lambda *_: None,
        )
    assert not (tmp_path / "vllm.txt").exists()


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
    layers: list[str] = []

    def fake_engine(name: str, settings: generate.Settings, **kw: Any) -> dict[str, Any]:
        calls.append((name, kw["log"], kw["vllm_log"]))
        layers.append(str(kw["layer"]))
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
    assert layers == ["2", "2"]
    assert json.loads((out / "timing.json").read_text()) == report
    assert report["log"]["layers"] == "2" and report["prefix_caching"] is False
    assert report["log"]["routes"] == 5 and report["identical_tokens"] is True
    assert report["overhead_pct"] == pytest.approx(10.0)
    (line,) = (out / "outputs.jsonl").read_text().splitlines()
    assert OutputRecord.model_validate_json(line).output_token_ids == [5, 6]
    assert sorted(p.name for p in out.iterdir()) == [
        "moe_routes.jsonl",
        "outputs.jsonl",
        "timing.json",
    ]


# --------------------------------------------------------------------------- prefix caching


def _request_output(req: str, prompt: list[int], generated: list[int], cached: int | None) -> Any:
    """What vLLM's ``RequestOutput`` gives ``engine_run``: the fields it reads."""
    out = SimpleNamespace(token_ids=generated, text="t", finish_reason="length")
    fields = {"request_id": req, "prompt_token_ids": prompt, "outputs": [out]}
    if cached is not None:
        fields["num_cached_tokens"] = cached
    return SimpleNamespace(**fields)


def test_outputs_record_the_cached_prompt_tokens_and_the_prompt_ids(tmp_path: Path) -> None:
    results = [
        _request_output("0", [5, 6, 7, 8], [1, 2], 0),
        _request_output("1", [5, 6, 7, 8], [1, 2], 2),
    ]
    records = engine_run._output_records(results, rep=1)
    assert [(r["num_cached_tokens"], r["prompt_token_ids"]) for r in records] == [
        (0, [5, 6, 7, 8]),
        (2, [5, 6, 7, 8]),
    ]
    path = tmp_path / "outputs.jsonl"
    generate.write_outputs(path, {"outputs": records})
    loaded = [OutputRecord.model_validate_json(line) for line in path.read_text().splitlines()]
    assert [(o.num_cached_tokens, o.expected_routes) for o in loaded] == [(0, 5), (2, 3)]
    assert loaded[1].prompt_token_ids == [5, 6, 7, 8] and loaded[1].output_token_ids == [1, 2]


def test_outputs_without_a_cached_count_leave_it_out_and_old_files_still_load(
    tmp_path: Path,
) -> None:
    (record,) = engine_run._output_records([_request_output("0", [5, 6], [1], None)], rep=0)
    path = tmp_path / "outputs.jsonl"
    generate.write_outputs(path, {"outputs": [record]})
    assert "num_cached_tokens" not in path.read_text()
    old = '{"req_id":"0","prompt_idx":0,"repeat":0,"prompt_tokens":4,"generated_tokens":3}'
    rec = OutputRecord.model_validate_json(old)
    assert (rec.num_cached_tokens, rec.prompt_token_ids, rec.expected_routes) == (None, None, 6)


@pytest.mark.parametrize("caching", [False, True])
def test_the_engine_gets_prefix_caching_as_the_settings_say(
    monkeypatch: pytest.MonkeyPatch, caching: bool
) -> None:
    seen: dict[str, Any] = {}

    class FakeLLM:
        def __init__(self, **kw: Any) -> None:
            seen.update(kw)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM))
    settings = generate.Settings(model="m", model_label="m", prompts=["x"], prefix_caching=caching)
    spec = dataclasses.asdict(settings)
    engine_run._start_engine(spec, engine_run._Events(-1))
    assert seen["enable_prefix_caching"] is caching
    spec.pop("prefix_caching")  # a spec from before the setting: off
    engine_run._start_engine(spec, engine_run._Events(-1))
    assert seen["enable_prefix_caching"] is False


def test_timing_says_whether_prefix_caching_was_on() -> None:
    settings = generate.Settings(model="m", model_label="m", prompts=["x"], prefix_caching=True)
    report = generate.timing_report(settings, _result([1], 1.0), None, None, None)
    assert report["prefix_caching"] is True and report["settings"]["prefix_caching"] is True


def test_the_summary_names_the_layers_and_the_cached_prompt_tokens(tmp_path: Path) -> None:
    from rich.console import Console

    from moeprof.render.generate import print_generate_summary

    settings = generate.Settings(model="m", model_label="m", prompts=["x"], prefix_caching=True)
    logged = _result([1, 2], 1.0)
    logged["passes"] = [dict(logged["passes"][0], cached_prompt_tokens=n) for n in (0, 256)]
    report = generate.timing_report(settings, None, logged, tmp_path / "l.jsonl", 9)
    report["log"]["layers"] = "0-3"
    console = Console(record=True, width=200)
    paths = generate.output_paths(tmp_path, None)
    print_generate_summary(console, report, paths)
    text = console.export_text()
    assert "prompt tokens served from the cache per pass: 0, 256 (of 4;" in text
    assert "(9 routes, layers 0-3)" in text


# --------------------------------------------------------------------------- the hook's lines

REFUSAL_OUTPUT = """\
(EngineCore pid=1) ERROR 11-30 08:00:00 [core.py:1] EngineCore failed to start.
Traceback (most recent call last):
  File "x.py", line 1, in <module>
(Worker pid=2) ERROR 11-30 08:00:00 [x.py:9] moeprof.errors.HookRefusal: moeprof: /l.jsonl \
is being written by another process (pid 7); stop it or choose another log path
RuntimeError: Engine core initialization failed. See root cause above.
"""


def test_a_refusal_in_engine_output_is_the_hooks_one_line() -> None:
    assert generate.hook_refusal(REFUSAL_OUTPUT.splitlines()) == (
        "moeprof: /l.jsonl is being written by another process (pid 7); stop it or choose "
        "another log path"
    )
    assert generate.hook_refusal(["RuntimeError: out of memory"]) is None


def test_logging_stopped_is_found_in_engine_output_and_stats_lines_are_not_it() -> None:
    lines = [
        'INFO [writer.py:1] moeprof: stats {"routes": 5, "stopped": "OSError"}',
        "ERROR [writer.py:2] moeprof: logging to /l.jsonl stopped after 5 routes on disk "
        "(9 dropped): OSError: [Errno 28] No space left on device (the engine goes on)",
    ]
    assert generate.stopped_line(lines[:1]) is None
    assert generate.stopped_line(lines) == lines[1][lines[1].index("moeprof:") :]


def test_a_log_the_hook_would_refuse_is_refused_before_any_engine(
    prompts_file: Path, model_dir: Path, tmp_path: Path
) -> None:
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "nowhere" / "x.jsonl")

    def prepare(log: Path, **kw: Any) -> generate.Job:
        return generate.prepare(
            prompts_file, out_dir=tmp_path / "out", log=log, model=str(model_dir), **kw
        )

    with pytest.raises(UserError, match="dangling symbolic link"):
        prepare(dangling)
    with pytest.raises(UserError, match="does not exist"):
        prepare(tmp_path / "no" / "x.jsonl")
    assert prepare(dangling, baseline_only=True).arms == (("baseline", None),)


def test_routes_are_counted_from_the_closing_record_else_from_the_lines(tmp_path: Path) -> None:
    log = tmp_path / "routes.jsonl"
    log.write_text('{"type":"meta"}\n{"r":1}\n{"r":2}\n')
    assert generate.count_routes(log) == 2
    log.write_text('{"type":"meta"}\n{"r":1}\n{"r":2}\n{"type":"end","routes":2}\n')
    assert generate.count_routes(log) == 2
    assert generate.closing_record(log) == {"type": "end", "routes": 2}


def test_the_engine_gets_the_hooks_settings_and_keeps_vllms_own_moe_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_LOG_MOE", "/elsewhere.jsonl")
    monkeypatch.setenv("VLLM_LOG_MOE_OVERWRITE", "1")
    monkeypatch.setenv("VLLM_MOE_LAYER", "7")
    monkeypatch.setenv("VLLM_MOE_USE_DEEP_GEMM", "0")
    env = generate.hook_env(tmp_path / "r.jsonl", parse_layers("0-2"), overwrite=False)
    assert env["VLLM_LOG_MOE"] == str((tmp_path / "r.jsonl").absolute())
    assert env["VLLM_MOE_LAYER"] == "0-2"
    assert "VLLM_LOG_MOE_OVERWRITE" not in env
    assert env["VLLM_MOE_USE_DEEP_GEMM"] == "0"
    off = generate.hook_env(None, parse_layers("0"), overwrite=True)
    assert not any(k.startswith("VLLM_LOG_MOE") or k == "VLLM_MOE_LAYER" for k in off)


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


def test_with_a_pass_gate_each_pass_waits_for_its_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    monkeypatch.setenv(engine_run.PASS_GATE, str(gate))
    events = _Recorder()
    waiter = threading.Thread(target=engine_run._wait_for_turn, args=(events, 2))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # held at the gate until the go
    assert events.events == [("pass_waiting", {"index": 2})]
    with open(gate, "wb") as fh:
        fh.write(b"g")
    waiter.join(5)
    assert not waiter.is_alive()


def test_without_a_pass_gate_passes_do_not_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(engine_run.PASS_GATE, raising=False)
    events = _Recorder()
    engine_run._wait_for_turn(events, 0)
    assert events.events == []
