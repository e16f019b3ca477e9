"""The command line's declarations: shared options, --kind choices, help text as written."""

from __future__ import annotations

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
    [("force", 4), ("num_experts", 2), ("exclude_suspect", 2), ("as_json", 2)],
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
