"""``moeprof plot``: each figure shows the analysis' numbers (bar heights, cell colours) under
labels that name the model, the layer and the experts; files are PNGs and never clobbered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from logfactory import meta, route, skewed_routes, write_log
from matplotlib.axes import Axes
from typer.testing import CliRunner

from moeprof.analysis import plots
from moeprof.analysis.analyze import AnalysisReport, analyze_logs
from moeprof.cli import app
from moeprof.errors import UserError

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def skewed_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("logs") / "skewed.jsonl"
    return write_log(path, skewed_routes(n_requests=10, prompt=40, generated=30))


@pytest.fixture(scope="module")
def report(skewed_log: Path) -> AnalysisReport:
    return analyze_logs([skewed_log])


def _ticks(ax: Axes, axis: str = "x") -> list[str]:
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in labels]


def _stacked_heights(ax: Axes) -> np.ndarray:
    """Total bar height at each x position, over all stacked bar groups."""
    return np.sum([[p.get_height() for p in bars.patches] for bars in ax.containers], axis=0)


# --------------------------------------------------------------------------- histogram


def test_hist_bars_are_each_phases_counts_stacked_to_the_total(report: AnalysisReport) -> None:
    _, la = report.rows()[0]
    ax = plots.figure(report).axes[0]
    assert [bars.get_label() for bars in ax.containers] == ["prefill", "decode"]
    for bars in ax.containers:
        heights = [p.get_height() for p in bars.patches]
        assert heights == la.by_phase[bars.get_label()].counts
    assert _stacked_heights(ax).tolist() == la.stats.counts
    assert _ticks(ax) == [str(e) for e in range(60)]


def test_hist_labels_name_the_model_layer_experts_and_headline_numbers(
    report: AnalysisReport,
) -> None:
    _, la = report.rows()[0]
    s = la.stats
    ax = plots.figure(report).axes[0]
    title = ax.get_title()
    assert "test/tiny-moe | layer 12 | 690 tokens, top-4 of 60 experts" in title
    assert f"entropy {s.entropy_bits:.2f} of {s.max_entropy_bits:.2f} bits" in title
    assert ax.get_xlabel() == "expert id"
    assert ax.get_ylabel() == "selections (tokens choosing the expert, top-4)"
    assert [a.get_ylabel() for a in ax.child_axes] == ["share of selections (%)"]
    uniform = ax.get_lines()[0]
    assert uniform.get_ydata()[0] == pytest.approx(s.selections / 60)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "uniform share (1/60 = 1.67%)" in legend
    labels = {t.get_text() for t in ax.texts}
    assert {f"{t.expert}: {100 * t.share:.1f}%" for t in s.top} <= labels


def test_sorted_hist_puts_the_most_loaded_expert_first(report: AnalysisReport) -> None:
    _, la = report.rows()[0]
    counts = la.stats.counts
    ax = plots.figure(report, sort=True).axes[0]
    order = sorted(range(60), key=lambda e: (-counts[e], e))
    assert _ticks(ax) == [str(e) for e in order]
    assert _stacked_heights(ax).tolist() == [counts[e] for e in order]
    assert _ticks(ax)[0] == str(la.stats.top[0].expert)
    assert ax.get_xlabel() == "expert id (sorted by load)"


def test_many_experts_get_a_wider_figure_and_every_third_tick(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    body = [
        route("0", t, ids=[int(i) for i in rng.choice(160, 8, replace=False)], weights=[0.1] * 8)
        for t in range(400)
    ]
    log = write_log(tmp_path / "wide.jsonl", body, meta(top_k=8, num_experts=160))
    report = analyze_logs([log])
    fig = plots.figure(report)
    ax = fig.axes[0]
    assert len(ax.containers[0].patches) == 160
    assert _stacked_heights(ax).tolist() == report.logs[0].layers[0].stats.counts
    assert _ticks(ax) == [str(e) for e in range(0, 160, 3)]
    narrow = plots.figure(analyze_logs([write_log(tmp_path / "n.jsonl", skewed_routes())]))
    assert fig.get_size_inches()[0] > narrow.get_size_inches()[0]


def test_hist_of_a_contaminated_log_says_so_unless_suspects_are_excluded(tmp_path: Path) -> None:
    dummy = [route("0", t, ids=[1, 2, 3, 4], weights=[0.4, 0.3, 0.2, 0.1]) for t in range(1500)]
    clean = skewed_routes(n_requests=8, prompt=50, generated=30, seed=5)
    dirty = write_log(tmp_path / "dirty.jsonl", dummy + clean)
    warning = "warning: 70% of records look like dummy/warm-up batches"
    ax = plots.figure(analyze_logs([dirty])).axes[0]
    assert warning in [t.get_text() for t in ax.texts]
    ax = plots.figure(analyze_logs([dirty], exclude_suspect=True)).axes[0]
    assert not any(t.get_text().startswith("warning") for t in ax.texts)


# --------------------------------------------------------------------------- heatmaps


def test_coselect_cells_are_the_share_of_tokens_choosing_both(report: AnalysisReport) -> None:
    _, la = report.rows()[0]
    fig = plots.figure(report, kind="coselect")
    ax = fig.axes[0]
    assert la.coselection is not None
    expected = 100 * la.coselection / la.stats.tokens
    np.fill_diagonal(expected, np.nan)
    shown = np.ma.filled(ax.images[0].get_array().astype(np.float64), np.nan)
    np.testing.assert_allclose(shown, expected)
    top = la.stats.top_pairs[0]
    assert ax.get_title().startswith("test/tiny-moe | layer 12 | 690 tokens")
    assert f"top pair {top.experts[0]}+{top.experts[1]}" in ax.get_title()
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("expert id", "expert id")
    assert _ticks(ax) == _ticks(ax, "y") == [str(e) for e in range(60)]
    assert fig.axes[1].get_ylabel() == "% of tokens choosing both"  # the colorbar


def test_several_logs_give_a_layer_by_expert_heatmap(skewed_log: Path, tmp_path: Path) -> None:
    other = write_log(
        tmp_path / "other.jsonl",
        skewed_routes(n_requests=4, prompt=20, generated=10, seed=9, layers=(3, 12)),
        meta(layers_logged=[3, 12]),
    )
    report = analyze_logs([skewed_log, other])
    fig = plots.figure(report)  # a histogram of three (log, layer) rows: a heatmap instead
    ax, profile, colorbar = fig.axes
    assert _ticks(ax, "y") == ["other L3", "skewed L12", "other L12"]  # by layer, then log
    assert _ticks(ax) == [str(e) for e in range(60)]
    rows = [report.rows()[i] for i in (1, 0, 2)]
    expected = [[100 * p for p in la.stats.distribution] for _, la in rows]
    np.testing.assert_allclose(ax.images[0].get_array(), expected)
    assert ax.get_title() == "expert load per layer: test/tiny-moe"
    assert colorbar.get_ylabel() == "share of selections (%); uniform = 1.67%"
    points = np.concatenate([line.get_xydata() for line in profile.get_lines()])  # one a log
    points = points[np.argsort(points[:, 1])]
    np.testing.assert_allclose(
        points, [(100 * la.stats.entropy_ratio, r) for r, (_, la) in enumerate(rows)]
    )


def test_sorted_heatmap_orders_experts_by_total_load(skewed_log: Path) -> None:
    report = analyze_logs([skewed_log])
    ax = plots.figure(report, kind="heatmap", sort=True).axes[0]
    counts = report.logs[0].layers[0].stats.counts
    assert _ticks(ax) == [str(e) for e in sorted(range(60), key=lambda e: (-counts[e], e))]
    assert _ticks(ax, "y") == ["layer 12"]
    assert ax.get_xlabel() == "expert id (sorted by total load)"


def test_unknown_kind_is_refused(report: AnalysisReport) -> None:
    with pytest.raises(UserError, match="choose one of hist, coselect, heatmap"):
        plots.figure(report, kind="pie")


# --------------------------------------------------------------------------- files


def test_existing_png_is_not_overwritten_without_force(
    report: AnalysisReport, tmp_path: Path
) -> None:
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    with pytest.raises(UserError, match="already exists"):
        plots.plot(report, out)
    assert out.read_bytes() == b"precious"
    assert plots.plot(report, out, force=True) == out
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]  # no temporary file left


def test_only_png_file_names_are_accepted(report: AnalysisReport, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"use a \.png file name"):
        plots.plot(report, tmp_path / "plot.jpg")
    assert not any(tmp_path.iterdir())


def test_cli_plot_writes_refuses_and_rejects_unknown_kinds(
    skewed_log: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cli.png"
    result = runner.invoke(app, ["plot", str(skewed_log), "--out", str(out), "--sort"])
    assert result.exit_code == 0 and out.read_bytes().startswith(PNG_SIGNATURE), result.output
    hist = out.read_bytes()
    result = runner.invoke(app, ["plot", str(skewed_log), "--out", str(out)])
    assert result.exit_code == 2 and "already exists (use --force to overwrite)" in result.output
    result = runner.invoke(app, ["plot", str(skewed_log), "--kind", "pie", "--out", str(out)])
    assert result.exit_code == 2 and "Invalid value for '--kind'" in result.output
    assert "'pie'" in result.output and not out.with_name("pie.png").exists()
    result = runner.invoke(
        app, ["plot", str(skewed_log), "--kind", "coselect", "--out", str(out), "--force"]
    )
    assert result.exit_code == 0 and out.read_bytes().startswith(PNG_SIGNATURE)
    assert out.read_bytes() != hist
    assert "Traceback" not in result.output
