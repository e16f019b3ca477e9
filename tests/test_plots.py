"""``moeprof plot``: the PNGs exist, are not blank, have the promised size, and never clobber."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from logfactory import meta, route, skewed_routes, write_log
from typer.testing import CliRunner

from moeprof.analysis import plots
from moeprof.analysis.report import analyze_logs
from moeprof.cli import app
from moeprof.errors import UserError

runner = CliRunner()


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def skewed_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("logs") / "skewed.jsonl"
    return write_log(path, skewed_routes(n_requests=10, prompt=40, generated=30))


def test_hist_png_has_the_size_of_a_60_expert_figure(skewed_log: Path, tmp_path: Path) -> None:
    out = plots.plot(analyze_logs([skewed_log]), tmp_path / "h.png")
    # 60 experts: 0.2 in per expert + 2.5 in margins = 14.5 in x 5.2 in at 150 dpi
    assert _png_size(out) == (2175, 780)
    assert out.stat().st_size > 30_000


def test_sorted_hist_differs_from_the_unsorted_one(skewed_log: Path, tmp_path: Path) -> None:
    report = analyze_logs([skewed_log])
    a = plots.plot(report, tmp_path / "a.png")
    b = plots.plot(report, tmp_path / "b.png", sort=True)
    assert a.read_bytes() != b.read_bytes() and _png_size(a) == _png_size(b)


def test_coselect_heatmap_is_written(skewed_log: Path, tmp_path: Path) -> None:
    out = plots.plot(analyze_logs([skewed_log]), tmp_path / "c.png", kind="coselect")
    assert _png_size(out) == (1275, 1125) and out.stat().st_size > 30_000


def test_several_logs_give_a_layer_by_expert_heatmap(skewed_log: Path, tmp_path: Path) -> None:
    other = write_log(
        tmp_path / "other.jsonl",
        skewed_routes(n_requests=4, prompt=20, generated=10, seed=9, layers=(3, 12)),
        meta(layers_logged=[3, 12]),
    )
    out = plots.plot(analyze_logs([skewed_log, other]), tmp_path / "m.png")
    width, height = _png_size(out)
    assert width == int((0.2 * 60 + 3.5) * 150) and height == 3.0 * 150
    assert out.stat().st_size > 20_000


def test_many_experts_still_render(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    body = [
        route("0", t, ids=[int(i) for i in rng.choice(160, 8, replace=False)], weights=[0.1] * 8)
        for t in range(400)
    ]
    log = write_log(tmp_path / "wide.jsonl", body, meta(top_k=8, num_experts=160))
    out = plots.plot(analyze_logs([log]), tmp_path / "w.png", sort=True)
    assert _png_size(out)[0] == int((0.2 * 160 + 2.5) * 150)


def test_existing_png_is_not_overwritten_without_force(skewed_log: Path, tmp_path: Path) -> None:
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    report = analyze_logs([skewed_log])
    with pytest.raises(UserError, match="already exists"):
        plots.plot(report, out)
    assert out.read_bytes() == b"precious"
    plots.plot(report, out, force=True)
    assert _png_size(out) == (2175, 780)


def test_cli_plot_writes_refuses_and_rejects_unknown_kinds(
    skewed_log: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cli.png"
    result = runner.invoke(app, ["plot", str(skewed_log), "--out", str(out), "--sort"])
    assert result.exit_code == 0 and out.exists(), result.output
    result = runner.invoke(app, ["plot", str(skewed_log), "--out", str(out)])
    assert result.exit_code == 2 and "already exists (use --force to overwrite)" in result.output
    result = runner.invoke(app, ["plot", str(skewed_log), "--kind", "pie", "--out", str(out)])
    assert result.exit_code == 2 and "choose one of hist, coselect, heatmap" in result.output
    result = runner.invoke(
        app, ["plot", str(skewed_log), "--kind", "coselect", "--out", str(out), "--force"]
    )
    assert result.exit_code == 0 and _png_size(out) == (1275, 1125)
    assert "Traceback" not in result.output
