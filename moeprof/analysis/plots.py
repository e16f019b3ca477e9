"""``moeprof plot``: PNGs from an :class:`~moeprof.analysis.report.AnalysisReport`.

Plots draw from the analysis (per-expert counts, co-selection matrix), never from the log, so a
plot always shows exactly the numbers ``analyze`` prints. Figures are built with matplotlib's
object API (no pyplot): no global figure state, no GUI backend, PNGs rendered by Agg.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from moeprof.analysis.report import AnalysisReport, LayerAnalysis, LogAnalysis
from moeprof.errors import UserError

KINDS = ("hist", "coselect", "heatmap")
PHASE_COLORS = {"prefill": "#4C72B0", "decode": "#DD8452", "unknown": "#8C8C8C"}
DPI = 150


def check_writable(out: Path, force: bool) -> None:
    """Refuse to clobber: called before the (possibly long) analysis, and again at save."""
    if out.exists() and not force:
        raise UserError(f"{out}: already exists (use --force to overwrite)")
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: plots are written as PNG; use a .png file name")


def _save(fig: Figure, out: Path, force: bool) -> Path:
    check_writable(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=DPI)
    except OSError as e:
        raise UserError(f"{out}: cannot write: {e.strerror or e}") from e
    return out


def plot(
    report: AnalysisReport,
    out: Path,
    *,
    kind: str = "hist",
    sort: bool = False,
    force: bool = False,
) -> Path:
    """Draw ``kind``; a histogram of several (log, layer) rows becomes a layer x expert heatmap,
    because 24 overlaid histograms are unreadable."""
    if kind not in KINDS:
        raise UserError(f"unknown plot kind {kind!r}: choose one of {', '.join(KINDS)}")
    rows = report.rows()
    if not rows:
        raise UserError("nothing to plot: no logs")
    if kind == "coselect":
        return plot_coselect(report, out, sort=sort, force=force)
    if kind == "heatmap" or len(rows) > 1:
        return plot_layer_heatmap(report, out, sort=sort, force=force)
    return plot_expert_hist(rows[0][0], rows[0][1], out, sort=sort, force=force)


def _expert_ticks(ax: Axes, labels: list[int], axis: str = "x") -> None:
    """Every expert labelled up to 128 experts (small, rotated), else every n-th."""
    n = len(labels)
    step = 1 if n <= 128 else math.ceil(n / 64)
    pos = np.arange(0, n, step)
    size = 8 if n <= 32 else 6.5 if n <= 72 else 5
    text = [str(labels[i]) for i in pos]
    if axis == "x":
        ax.set_xticks(pos, text, fontsize=size, rotation=90 if n > 32 else 0)
    else:
        ax.set_yticks(pos, text, fontsize=size)


def plot_expert_hist(
    log: LogAnalysis, layer: LayerAnalysis, out: Path, *, sort: bool = False, force: bool = False
) -> Path:
    """Selections per expert (stacked by phase when the log has phases), the uniform share as a
    line, the top experts annotated, and the headline numbers in the title."""
    s = layer.stats
    e = s.num_experts
    counts = np.array(s.counts, dtype=np.float64)
    order = np.lexsort((np.arange(e), -counts)) if sort else np.arange(e)
    width = min(max(8.0, 0.2 * e + 2.5), 40.0)
    fig = Figure(figsize=(width, 5.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(e)
    parts = {name: np.array(p.counts, np.float64) for name, p in layer.by_phase.items()}
    if not parts:
        parts = {"all": counts}
    bottom = np.zeros(e)
    for name, c in parts.items():
        ax.bar(
            x,
            c[order],
            0.8,
            bottom=bottom,
            label=name if len(parts) > 1 else None,
            color=PHASE_COLORS.get(name, "#4C72B0"),
            edgecolor="none",
        )
        bottom += c[order]
    if s.selections:
        uniform = s.selections / e
        ax.axhline(
            uniform,
            color="#C44E52",
            linestyle="--",
            linewidth=1.2,
            label=f"uniform share (1/{e} = {100 / e:.2f}%)",
        )
        where = {int(exp): i for i, exp in enumerate(order)}
        for t in s.top:
            ax.annotate(
                f"{t.expert}: {100 * t.share:.1f}%",
                (where[t.expert], counts[t.expert]),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                rotation=90,
                fontsize=8,
                fontweight="bold",
            )
        ax.set_ylim(0, counts.max() * 1.3)
        share = ax.secondary_yaxis(
            "right", functions=(lambda c: 100 * c / s.selections, lambda p: p * s.selections / 100)
        )
        share.set_ylabel("share of selections (%)")
    _expert_ticks(ax, [int(i) for i in order])
    ax.set_xlim(-0.7, e - 0.3)
    ax.set_xlabel("expert id" + (" (sorted by load)" if sort else ""))
    ax.set_ylabel(f"selections (tokens choosing the expert, top-{log.top_k})")
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    title = (
        f"{log.model_id} | layer {layer.layer} | {s.tokens:,} tokens, top-{log.top_k} of {e} "
        f"experts\nentropy {s.entropy_bits:.2f} of {s.max_entropy_bits:.2f} bits "
        f"({100 * s.entropy_ratio:.1f}%), max/mean load {s.max_over_mean:.2f}"
    )
    ax.set_title(title, fontsize=11)
    c = log.contamination
    if c.suspicious and not log.excluded:
        ax.text(
            0.01,
            0.97,
            f"warning: {100 * c.suspect_share:.0f}% of records look like dummy/warm-up batches",
            transform=ax.transAxes,
            color="#C44E52",
            fontsize=9,
            va="top",
        )
    return _save(fig, out, force)


def plot_layer_heatmap(
    report: AnalysisReport, out: Path, *, sort: bool = False, force: bool = False
) -> Path:
    """One row per (log, layer), one column per expert, colour = share of selections."""
    rows = report.rows()
    e = max(la.stats.num_experts for _, la in rows)
    several = len(report.logs) > 1
    grid = np.zeros((len(rows), e))
    labels = []
    for r, (log, la) in enumerate(rows):
        d = np.array(la.stats.distribution)
        grid[r, : d.size] = 100 * d
        labels.append(f"{Path(log.path).stem} L{la.layer}" if several else f"layer {la.layer}")
    order = np.lexsort((np.arange(e), -grid.sum(axis=0))) if sort else np.arange(e)
    width = min(max(8.0, 0.2 * e + 3.5), 40.0)
    height = min(max(3.0, 0.32 * len(rows) + 2.0), 30.0)
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(grid[:, order], aspect="auto", cmap="viridis", interpolation="nearest")
    _expert_ticks(ax, [int(i) for i in order])
    ax.set_yticks(np.arange(len(rows)), labels, fontsize=8 if len(rows) <= 30 else 6)
    ax.set_xlabel("expert id" + (" (sorted by total load)" if sort else ""))
    fig.colorbar(im, ax=ax, label=f"share of selections (%); uniform = {100 / e:.2f}%", pad=0.01)
    models = sorted({log.model_id for log, _ in rows})
    ax.set_title(f"expert load per layer: {', '.join(models)}", fontsize=11)
    return _save(fig, out, force)


def plot_coselect(
    report: AnalysisReport, out: Path, *, sort: bool = False, force: bool = False
) -> Path:
    """Expert x expert: share of tokens that chose both experts (diagonal hidden). Up to six
    (log, layer) rows side by side."""
    rows = [(log, la) for log, la in report.rows() if la.coselection is not None]
    if not rows:
        raise UserError("no co-selection matrix: too many experts, or no routes")
    rows = rows[:6]
    cols = min(len(rows), 2)
    nrows = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(8.5 * cols, 7.5 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax in axes.ravel()[len(rows) :]:
        ax.axis("off")
    for ax, (log, la) in zip(axes.ravel(), rows, strict=False):
        s = la.stats
        m = la.coselection.astype(np.float64)
        e = m.shape[0]
        order = np.lexsort((np.arange(e), -np.diag(m))) if sort else np.arange(e)
        share = 100 * m / max(s.tokens, 1)
        np.fill_diagonal(share, np.nan)
        share = share[np.ix_(order, order)]
        im = ax.imshow(share, cmap="magma", interpolation="nearest")
        _expert_ticks(ax, [int(i) for i in order], "x")
        _expert_ticks(ax, [int(i) for i in order], "y")
        ax.set_xlabel("expert id" + (" (sorted by load)" if sort else ""))
        ax.set_ylabel("expert id")
        fig.colorbar(im, ax=ax, label="% of tokens choosing both", shrink=0.85, pad=0.01)
        top = s.top_pairs[0] if s.top_pairs else None
        pair = (
            f"\ntop pair {top.experts[0]}+{top.experts[1]}: {100 * top.share:.1f}% of tokens, "
            f"lift {top.lift:.2f}"
            if top
            else ""
        )
        ax.set_title(f"{log.model_id} | layer {la.layer} | {s.tokens:,} tokens{pair}", fontsize=10)
    return _save(fig, out, force)
