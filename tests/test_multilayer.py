"""Logs of many MoE layers (24 for Qwen1.5-MoE, 26 from layer 1 for DeepSeek-V2-Lite, 60 for
larger models): ``analyze`` prints one summary row per layer and names the most skewed layers,
the markdown note summarises the layers and tables them, ``plot`` draws one layer x expert
figure; ``layers`` picks layers; a log of one layer reads exactly as before."""

from __future__ import annotations

import io
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from logfactory import DECODE, PREFILL, meta, route, run_cli, skewed_routes, write_log
from rich.console import Console
from rich.table import Table

from moeprof.analysis import plots
from moeprof.analysis.analyze import AnalysisReport, analyze_logs, chosen_layers
from moeprof.cli import app
from moeprof.errors import UserError
from moeprof.render.analyze import print_report, summary_table
from moeprof.render.note import markdown_note

GOLDEN = Path(__file__).parent / "golden"
HOT = 14
"""The layer of :func:`layered_log` whose routing is far more skewed than the others'."""


def layered_log(
    path: Path,
    layers: Sequence[int],
    *,
    experts: int = 60,
    k: int = 4,
    hot: int | None = HOT,
    seed: int = 0,
) -> Path:
    """A log of ``layers``, each with its own skewed routing (3 requests, 51 tokens a layer);
    layer ``hot`` sends every token to experts 0..k only."""
    body: list[dict[str, Any]] = []
    for i, layer in enumerate(layers):
        if layer == hot:
            for r in range(3):
                for t in range(17):
                    ids = [(t + j) % (k + 1) for j in range(k)]
                    w = [0.5 / (j + 1) for j in range(k)]
                    body.append(route(str(r), t, layer, ids, w, PREFILL if t < 12 else DECODE))
        else:
            body += skewed_routes(
                n_requests=3,
                prompt=12,
                generated=6,
                experts=experts,
                k=k,
                seed=seed * 1000 + i,
                layers=(layer,),
            )
    header = meta(layers_logged=list(layers), num_experts=experts, top_k=k)
    return write_log(path, body, header)


def render(report: AnalysisReport, **kwargs: Any) -> str:
    buf = io.StringIO()
    print_report(report, Console(file=buf, width=120, color_system=None), **kwargs)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


def cells(table: Table) -> list[dict[str, str]]:
    """The table's rows as {header: cell text}."""
    columns = {str(c.header): [str(v) for v in c.cells] for c in table.columns}
    return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]


@pytest.fixture(scope="module")
def log24(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return layered_log(tmp_path_factory.mktemp("logs") / "qwen24.jsonl", range(24))


@pytest.fixture(scope="module")
def report24(log24: Path) -> AnalysisReport:
    return analyze_logs([log24])


# --------------------------------------------------------------------------- one layer: as before


def fixed_body(shift: int) -> list[dict[str, Any]]:
    """A deterministic skewed layer 12 (4 requests x 30 tokens, prefill then decode)."""
    out = []
    for r in range(4):
        for t in range(30):
            a = (t * t + 3 * r + shift) % 60
            ids = [(a + 5 * j) % 60 for j in range(4)]
            w = [0.5 - 0.01 * (t % 7), 0.2, 0.1, 0.05]
            out.append(route(str(r), t, 12, ids, w, PREFILL if t < 20 else DECODE))
    return out


def test_a_one_layer_log_reads_exactly_as_before(tmp_path: Path) -> None:
    """The terminal table and the note of one log of one layer, and of two such logs, are the
    text moeprof printed before logs had several layers (tests/golden, from that version)."""
    one = write_log(tmp_path / "one.jsonl", fixed_body(0))
    two = write_log(tmp_path / "two.jsonl", fixed_body(11))
    for name, paths in (("one_layer", [one]), ("two_one_layer_logs", [one, two])):
        report = analyze_logs(paths)
        assert not report.multi_layer
        assert render(report) == (GOLDEN / f"{name}.analyze.txt").read_text()
        assert render(report, details=True) == render(report)
        assert markdown_note(report) == (GOLDEN / f"{name}.note.md").read_text()


# --------------------------------------------------------------------------- analyze: terminal


def test_summary_table_has_one_row_per_layer_with_its_numbers(report24: AnalysisReport) -> None:
    rows = cells(summary_table(report24))
    layers = report24.logs[0].layers
    assert (
        [r["layer"] for r in rows]
        == [str(la.layer) for la in layers]
        == [str(i) for i in range(24)]
    )
    assert list(rows[0]) == [
        "layer",
        "tokens",
        "entropy/max",
        "CV",
        "max/mean",
        "unused",
        "top expert",
        "JSD prefill/decode",
    ]
    for row, la in zip(rows, layers, strict=True):
        s = la.stats
        assert row["tokens"] == "51"
        assert row["entropy/max"] == f"{100 * s.entropy_ratio:.1f}%"
        assert row["max/mean"] == f"{s.max_over_mean:.2f}"
        assert row["unused"] == str(len(s.never_used))
        assert row["top expert"] == f"{s.top[0].expert} {100 * s.top[0].share:.1f}%"
        assert la.phase_jsd is not None and row["JSD prefill/decode"] == f"{la.phase_jsd:.4f}"
    assert rows[HOT]["unused"] == "55"  # the hot layer uses experts 0-4 only


def test_many_layers_print_a_summary_that_names_the_most_skewed_layers(
    report24: AnalysisReport,
) -> None:
    out = render(report24)
    lines = out.splitlines()
    assert len(lines) < 24 + 15  # the table's rows, a few notes: not 3 rows + 2 notes a layer
    assert "│ prefill" not in out and "most co-selected" not in out  # those are --details
    ranked = sorted(report24.logs[0].layers, key=lambda la: la.stats.entropy_ratio)
    assert ranked[0].layer == HOT
    skewed = next(ln for ln in lines if "most skewed layers:" in ln)
    assert skewed.split(": ", 1)[1].startswith(f"{HOT} (")
    for la in ranked[:3]:
        assert f"{la.layer} ({100 * la.stats.entropy_ratio:.1f}%" in skewed
    balanced = next(ln for ln in lines if "most balanced layers:" in ln)
    assert balanced.split(": ", 1)[1].startswith(f"{ranked[-1].layer} (")
    assert "qwen24.jsonl: test/tiny-moe, 1,224 routes, E=60 (meta), top-4, 24 layers (0-23)" in out
    ratios = [la.stats.entropy_ratio for la in ranked]
    assert f"median {100 * statistics.median(ratios):.1f}%" in out
    assert lines[-1] == (
        "per-phase rows, router weights and co-selected pairs: add --details (every layer) "
        f"or --layer {HOT} (one layer)"
    )


def test_details_print_the_full_table_for_every_layer(report24: AnalysisReport) -> None:
    out = render(report24, details=True)
    assert out.startswith("expert routing (shares are of all top-k selections)")
    for layer in (0, HOT, 23):
        for phase in ("all", "prefill", "decode"):
            assert f"│ {layer:5d} │ {phase:7s} │" in out
        assert f"layer {layer}: most co-selected pairs" in out


def test_several_multi_layer_logs_sit_together_by_layer_with_their_jsd(tmp_path: Path) -> None:
    a = layered_log(tmp_path / "a.jsonl", range(4), hot=2)
    b = layered_log(tmp_path / "b.jsonl", range(4), hot=None, seed=1)
    report = analyze_logs([a, b])
    rows = cells(summary_table(report))
    assert [(r["log"], r["layer"]) for r in rows] == [
        (name, str(layer)) for layer in range(4) for name in ("a.jsonl", "b.jsonl")
    ]
    for r in rows:
        jsd = report.jsd(str(a), str(b), int(r["layer"]))
        assert jsd is not None
        assert r["JSD vs a.jsonl"] == ("" if r["log"] == "a.jsonl" else f"{jsd:.4f}")
    out = render(report)
    biggest = max(report.comparisons, key=lambda c: c.jsd)
    assert (
        f"JSD between a.jsonl and b.jsonl over 4 shared layers: median "
        f"{statistics.median(c.jsd for c in report.comparisons):.4f} bits, largest "
        f"{biggest.jsd:.4f} at layer {biggest.layer}"
    ) in out
    assert biggest.layer == 2  # the hot layer differs most


# --------------------------------------------------------------------------- choosing layers


def test_chosen_layers_are_the_only_ones_reported(log24: Path, tmp_path: Path) -> None:
    one = analyze_logs([log24], layers=[HOT])
    assert [la.layer for la in one.logs[0].layers] == [HOT] and not one.multi_layer
    assert render(one).startswith("expert routing (shares are of all top-k selections)")
    assert f"│ {HOT:5d} │ decode  │" in render(one)  # the full form of one layer
    assert markdown_note(one).startswith(f"## MoE routing: test/tiny-moe, layer {HOT}\n")
    full = analyze_logs([log24]).logs[0].layers[HOT]
    assert one.logs[0].layers[0].stats == full.stats

    some = analyze_logs([log24], layers=[3, HOT, 30])
    assert [la.layer for la in some.logs[0].layers] == [3, HOT]
    assert f"{log24}: layer 30 was not logged" in some.logs[0].warnings
    with pytest.raises(UserError, match=r"qwen24.jsonl: no layer 30-31 in this log; it logged "):
        analyze_logs([log24], layers=[30, 31])


def test_layer_selections_parse_like_the_hooks() -> None:
    assert chosen_layers(None) is None and chosen_layers("all") is None
    assert chosen_layers("0-2, 12") == (0, 1, 2, 12)
    with pytest.raises(UserError, match="--layer 'twelve' is not a layer selection"):
        chosen_layers("twelve")


# --------------------------------------------------------------------------- markdown note


def test_note_of_many_layers_summarises_them_and_tables_each(report24: AnalysisReport) -> None:
    note = markdown_note(report24)
    lines = note.splitlines()
    layers = report24.logs[0].layers
    assert lines[0] == "## MoE routing: test/tiny-moe, 24 layers (0-23)"
    assert lines[1] == (
        "- Log `qwen24.jsonl`: 51 tokens routed per layer, top-4 of 60 experts (vLLM 0.32.0, cpu)."
    )
    assert lines[3].startswith(f"- Most skewed: layer {HOT} (entropy ")
    hot = layers[HOT].stats
    assert f"top-3 experts {', '.join(str(t.expert) for t in hot.top[:3])} take" in lines[3]
    assert lines[4].startswith("- Most balanced: layer ")
    assert lines[5].startswith("- Of 24 layers, ")
    table = lines[lines.index("") + 1 :]
    assert table[0].startswith("| layer | tokens | entropy | max/mean |")
    assert len(table) == 2 + 24
    for line, la in zip(table[2:], layers, strict=True):
        s = la.stats
        assert line.startswith(
            f"| {la.layer} | 51 | {100 * s.entropy_ratio:.1f}% | {s.max_over_mean:.2f} |"
        )
        assert line.endswith(
            f"{s.top[0].expert} ({100 * s.top[0].share:.1f}%), "
            f"{s.top[1].expert} ({100 * s.top[1].share:.1f}%), "
            f"{s.top[2].expert} ({100 * s.top[2].share:.1f}%) |"
        )
    assert len(lines) < 8 + 1 + 2 + 24


def test_note_of_deepseek_like_layers_names_the_logged_range(tmp_path: Path) -> None:
    log = layered_log(tmp_path / "ds.jsonl", range(1, 27), experts=64, k=6, hot=None)
    note = markdown_note(analyze_logs([log]))
    assert note.startswith("## MoE routing: test/tiny-moe, 26 layers (1-26)\n")
    assert "top-6 of 64 experts" in note and "a uniform router gives each expert 1.6%" in note
    assert "\n| 1 | 51 |" in note and "\n| 26 | 51 |" in note and "\n| 0 |" not in note


# --------------------------------------------------------------------------- plots


def _ticks(labels: list[Any]) -> list[str]:
    return [t.get_text() for t in labels]


def test_heatmap_of_many_layers_is_one_figure_of_each_layers_shares(
    report24: AnalysisReport,
) -> None:
    fig = plots.figure(report24)  # the default kind: a histogram of 24 layers is this heatmap
    ax, profile, colorbar = fig.axes
    layers = report24.logs[0].layers
    expected = [[100 * p for p in la.stats.distribution] for la in layers]
    np.testing.assert_allclose(ax.images[0].get_array(), expected)
    assert _ticks(ax.get_yticklabels()) == [f"layer {i}" for i in range(24)]
    assert _ticks(ax.get_xticklabels()) == [str(e) for e in range(60)]
    assert colorbar.get_ylabel() == "share of selections (%); uniform = 1.67%"
    # the right-hand panel: each layer's entropy, the hot layer far left
    (line,) = profile.get_lines()
    np.testing.assert_allclose(line.get_ydata(), range(24))
    np.testing.assert_allclose(line.get_xdata(), [100 * la.stats.entropy_ratio for la in layers])
    assert int(np.argmin(line.get_xdata())) == HOT
    assert profile.get_xlabel() == "entropy (% of max)"


def test_heatmap_of_sixty_layers_stays_within_a_page(tmp_path: Path) -> None:
    log = layered_log(tmp_path / "big.jsonl", range(60), experts=64, k=6)
    report = analyze_logs([log])
    fig = plots.figure(report, kind="heatmap")
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (60, 64)
    assert _ticks(ax.get_yticklabels())[-1] == "layer 59"
    width, height = fig.get_size_inches()
    assert height <= 16 and width <= 20
    out = plots.plot(report, tmp_path / "big.png")
    assert out.read_bytes().startswith(b"\x89PNG")


def test_heatmap_of_several_logs_groups_rows_by_layer_and_greys_missing_experts(
    tmp_path: Path,
) -> None:
    a = layered_log(tmp_path / "qwen.jsonl", range(3), hot=None)
    b = layered_log(tmp_path / "ds.jsonl", range(1, 4), experts=64, k=6, hot=None)
    report = analyze_logs([a, b])
    fig = plots.figure(report)
    ax, profile, colorbar = fig.axes
    assert _ticks(ax.get_yticklabels()) == [
        "qwen L0", "qwen L1", "ds L1", "qwen L2", "ds L2", "ds L3"
    ]  # fmt: skip
    grid = ax.images[0].get_array()
    rows = sorted(report.rows(), key=lambda r: r[1].layer)
    for r, (_, la) in enumerate(rows):
        e = la.stats.num_experts
        np.testing.assert_allclose(grid[r, :e], [100 * p for p in la.stats.distribution])
        assert bool(np.ma.getmaskarray(grid)[r, e:].all()) or np.isnan(grid[r, e:]).all()
    separators = [ln.get_ydata()[0] for ln in ax.get_lines()]
    assert separators == [0.5, 2.5, 4.5]  # between layers 0|1, 1|2, 2|3
    assert colorbar.get_ylabel() == (
        "share of selections (%); uniform = 1.67% (60 experts), 1.56% (64 experts)"
    )
    assert [t.get_text() for t in profile.get_legend().get_texts()] == ["qwen", "ds"]


def test_one_chosen_layer_plots_its_histogram_and_coselection(log24: Path) -> None:
    report = analyze_logs([log24], layers=[HOT])
    ax = plots.figure(report).axes[0]
    assert "| layer 14 | 51 tokens, top-4 of 60 experts" in ax.get_title()
    fig = plots.figure(report, kind="coselect")
    assert fig.get_suptitle() == ""
    assert fig.axes[0].get_title().startswith("test/tiny-moe | layer 14 | 51 tokens")


def test_coselect_of_many_layers_says_which_it_shows(report24: AnalysisReport) -> None:
    fig = plots.figure(report24, kind="coselect")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert [t.split(" | ")[1] for t in titles] == [f"layer {i}" for i in range(6)]
    assert fig.get_suptitle() == (
        "co-selection of the first 6 of 24 layers (0, 1, 2, 3, 4, 5); choose others with --layer"
    )


# --------------------------------------------------------------------------- command line


def test_cli_prints_the_summary_and_plots_one_heatmap(log24: Path, tmp_path: Path) -> None:
    code, out = run_cli("analyze", str(log24))
    assert code == 0 and "expert routing per layer" in out and "most skewed layers: 14" in out
    png = tmp_path / "all.png"
    code, out = run_cli("plot", str(log24), "--out", str(png))
    assert code == 0 and png.read_bytes().startswith(b"\x89PNG")


def _has_option(command: str, option: str) -> bool:
    from typer.main import get_command

    group: Any = get_command(app)
    return any(option in p.opts for p in group.commands[command].params)


@pytest.mark.skipif(
    not (_has_option("analyze", "--layer") and _has_option("plot", "--layer")),
    reason="the CLI has no --layer option yet",
)
def test_cli_layer_and_details_options(log24: Path, tmp_path: Path) -> None:
    code, out = run_cli("analyze", str(log24), "--layer", str(HOT))
    assert code == 0 and f"│ {HOT:5d} │ prefill │" in out and "per layer" not in out
    code, out = run_cli("analyze", str(log24), "--details")
    assert code == 0 and "│    23 │ decode  │" in out
    code, out = run_cli("analyze", str(log24), "--layer", "40")
    assert code == 2 and "no layer 40 in this log; it logged layers 0-23" in out
    code, out = run_cli("analyze", str(log24), "--layer", "x")
    assert code == 2 and "--layer 'x' is not a layer selection" in out
    png = tmp_path / "one.png"
    code, out = run_cli("plot", str(log24), "--layer", str(HOT), "--out", str(png))
    assert code == 0 and png.read_bytes().startswith(b"\x89PNG")
