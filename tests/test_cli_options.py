"""The command line's declarations: shared options, --kind choices, help text as written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer.core import TyperOption
from typer.testing import CliRunner

from moeprof.analysis.plots import KINDS
from moeprof.cli import PlotKind, app

runner = CliRunner()
COMMAND: Any = typer.main.get_command(app)


def _options(name: str) -> list[TyperOption]:
    """Every option of every command called ``name`` (``--force``, ``--json`` ...)."""
    found = []
    for command in COMMAND.commands.values():
        found += [p for p in command.params if isinstance(p, TyperOption) and p.name == name]
    return found


@pytest.mark.parametrize(
    ("name", "commands"),
    [
        ("force", 6),
        ("num_experts", 4),
        ("exclude_suspect", 2),
        ("as_json", 4),
        ("ep_ranks", 2),
        ("redundant_experts", 2),
    ],
)
def test_shared_options_are_the_same_flag_everywhere(name: str, commands: int) -> None:
    options = _options(name)
    assert len(options) == commands
    first = options[0]
    for option in options[1:]:
        assert (option.opts, option.secondary_opts) == (first.opts, first.secondary_opts)
        assert (option.type_descriptor.annotation, option.default) == (
            first.type_descriptor.annotation,
            first.default,
        )
        assert (option.is_flag, option.min) == (first.is_flag, first.min)
    assert all(o.help for o in options)


def test_every_help_text_prints_as_written() -> None:
    """Rich reads ``[...]`` in help as markup and drops it ("Routing log to write ."); defaults
    that are not values go to ``show_default`` instead."""
    for command in COMMAND.commands.values():
        for param in command.params:
            text = getattr(param, "help", None) or ""
            assert "[" not in text and " ." not in text, (command.name, param.name, text)
    (log,) = [p for p in COMMAND.commands["generate"].params if p.name == "log"]
    assert log.show_default == "OUT_DIR/moe_routes.jsonl"


def test_plot_kinds_are_the_ones_plots_draws() -> None:
    assert tuple(k.value for k in PlotKind) == KINDS


def test_an_unknown_plot_kind_is_refused_before_any_log_is_read() -> None:
    result = runner.invoke(app, ["plot", "no-such-log.jsonl", "--kind", "pie"])
    assert result.exit_code == 2
    assert "Invalid value for '--kind'" in result.output and "'heatmap'" in result.output
    assert "no-such-log" not in result.output


# --------------------------------------------------------------------------- generate's layers


def _generate_option(name: str) -> TyperOption:
    (option,) = [p for p in COMMAND.commands["generate"].params if p.name == name]
    assert isinstance(option, TyperOption)
    return option


def test_log_layer_help_documents_every_form_and_the_default_stays_0() -> None:
    option = _generate_option("log_layer")
    assert option.default == "0"
    for form in ("(12)", "(0,12,23)", "(0-11,23)", "'all'"):
        assert form in (option.help or ""), form
    caching = _generate_option("prefix_caching")
    assert (caching.opts, caching.secondary_opts, caching.default) == (
        ["--prefix-caching"],
        ["--no-prefix-caching"],
        False,
    )


@pytest.mark.parametrize("bad", ["1-x", "5-2", "twelve", "-1", "1,,2"])
def test_a_bad_log_layer_is_one_line_and_exit_2_before_any_file_is_read(bad: str) -> None:
    result = runner.invoke(
        app, ["generate", "--prompts", "no-such-prompts.txt", "--log-layer", bad]
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --log-layer: "), result.output
    assert "no-such-prompts" not in result.output


@pytest.mark.parametrize(
    ("args", "layers", "said"),
    [
        ([], "0", "layer 0, prefix caching off"),
        (["--log-layer", "1"], "1", "layer 1, prefix caching off"),
        (["--log-layer", "3,0-1", "--prefix-caching"], "0-1,3", "layers 0-1,3, prefix caching on"),
        (
            ["--log-layer", "all", "--no-prefix-caching"],
            "all",
            "every MoE layer, prefix caching off",
        ),
    ],
)
def test_generate_passes_the_selection_and_prefix_caching_to_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], layers: str, said: str
) -> None:
    from moeprof import generate
    from moeprof.errors import UserError

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2+2?\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8, "num_hidden_layers": 2}')
    jobs: list[generate.Job] = []

    def no_engine(job: generate.Job, on_event: Any) -> dict[str, Any]:
        jobs.append(job)
        raise UserError("stopped before the engine")

    monkeypatch.setattr(generate, "run_job", no_engine)
    result = runner.invoke(
        app,
        [
            "generate",
            *("--prompts", str(prompts), "--model", str(model), "--out-dir", str(tmp_path)),
            *args,
        ],
    )
    assert result.exit_code == 2 and "stopped before the engine" in result.output
    (job,) = jobs
    assert str(job.layers) == layers
    assert job.settings.prefix_caching is ("--prefix-caching" in args)
    assert said in " ".join(result.output.split())
