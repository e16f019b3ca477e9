"""``moeprof plot``: PNGs from an :class:`~moeprof.analysis.analyze.AnalysisReport`.

Plots draw from the analysis (per-expert counts, co-selection matrix), never from the log, so a
plot always shows exactly the numbers ``analyze`` prints. Figures are built with matplotlib's
object API (no pyplot): no global figure state, no GUI backend, PNGs rendered by Agg. Each
``*_figure`` function returns the :class:`~matplotlib.figure.Figure`; :func:`plot` builds one
and writes it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from moeprof.analysis.analyze import AnalysisReport, LayerAnalysis, LogAnalysis
from moeprof.analysis.crosslayer import CrossLayerResult, LayerPair
from moeprof.analysis.ep import EpAnalysis
from moeprof.analysis.reuse import ReuseResult
from moeprof.analysis.summary import ExpertStats
from moeprof.errors import UserError
from moeprof.layers import format_layers
from moeprof.outfiles import refuse_existing, replacing

KINDS = ("hist", "coselect", "heatmap", "transitions", "reuse", "ep")
ANALYSIS_OF_KIND = {"transitions": "cross_layer", "reuse": "reuse", "ep": "ep"}
"""Plot kinds drawn from an extra analysis (:mod:`moeprof.analysis.passes`): ``plot`` runs it."""
PHASE_COLORS = {"prefill": "#4C72B0", "decode": "#DD8452", "unknown": "#8C8C8C"}
ACCENT_COLOR = "#C44E52"
"""Red: the uniform-share line and the contamination warning."""
DPI = 150
MAX_PANELS = 6
"""Co-selection matrices drawn side by side at most."""


def check_writable(out: Path, force: bool) -> None:
    """Refuse to clobber, and refuse a name that is not a PNG's: called before the (possibly
    long) analysis, and again at save."""
    refuse_existing(out, force)
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: plots are written as PNG; use a .png file name")


def plot(
    report: AnalysisReport,
    out: Path,
    *,
    kind: str = "hist",
    sort: bool = False,
    force: bool = False,
) -> Path:
    """Draw ``kind`` (see :func:`figure`) and write it to ``out`` as a PNG."""
    return save(figure(report, kind=kind, sort=sort), out, force=force)


def figure(report: AnalysisReport, *, kind: str = "hist", sort: bool = False) -> Figure:
    """The figure of ``kind``; a histogram of several (log, layer) rows becomes a layer x expert
    heatmap, because 24 overlaid histograms are unreadable. ``sort`` orders experts by load."""
    if kind not in KINDS:
        raise UserError(f"unknown plot kind {kind!r}: choose one of {', '.join(KINDS)}")
    rows = report.rows()
    if not rows:
        raise UserError("nothing to plot: no logs")
    if kind == "coselect":
        return coselect_figure(report, sort=sort)
    if kind == "transitions":
        return transitions_figure(report, sort=sort)
    if kind == "reuse":
        return reuse_figure(report)
    if kind == "ep":
        return ep_figure(report)
    if kind == "heatmap" or len(rows) > 1:
        return heatmap_figure(report, sort=sort)
    return hist_figure(rows[0][0], rows[0][1], sort=sort)


def save(fig: Figure, out: Path, *, force: bool = False) -> Path:
    """Write ``fig`` to ``out`` as a PNG, never clobbering without ``force``, never half-written."""
    check_writable(out, force)
    with replacing(out, force=force) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return out


def _by_load(load: np.ndarray) -> np.ndarray:
    """Expert indices, most loaded first; ties go to the lower id."""
    return np.lexsort((np.arange(load.size), -load))


def _width(num_experts: int, margin: float) -> float:
    """Figure width in inches: 0.2 in per expert plus ``margin``, within 8..40 in."""
    return min(max(8.0, 0.2 * num_experts + margin), 40.0)


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


# --------------------------------------------------------------------------- histogram


def hist_figure(log: LogAnalysis, layer: LayerAnalysis, *, sort: bool = False) -> Figure:
    """Selections per expert (stacked by phase when the log has phases), the uniform share as a
    line, the top experts annotated, and the headline numbers in the title."""
    s = layer.stats
    counts = np.array(s.counts, dtype=np.float64)
    order = _by_load(counts) if sort else np.arange(s.num_experts)
    fig = Figure(figsize=(_width(s.num_experts, 2.5), 5.2), layout="constrained")
    ax = fig.subplots()
    _phase_bars(ax, layer, order)
    if s.selections:
        _uniform_line(ax, s)
        _annotate_top(ax, s, order)
        ax.set_ylim(0, counts.max() * 1.3)
        _share_axis(ax, s.selections)
    _hist_axes(ax, log, layer, order, sort)
    _contamination_warning(ax, log)
    return fig


def _phase_bars(ax: Axes, layer: LayerAnalysis, order: np.ndarray) -> None:
    """One bar per expert in ``order``, stacked by phase when the log has phases."""
    parts = {name: np.array(p.counts, np.float64) for name, p in layer.by_phase.items()}
    if not parts:
        parts = {"all": np.array(layer.stats.counts, np.float64)}
    x = np.arange(order.size)
    bottom = np.zeros(order.size)
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


def _uniform_line(ax: Axes, s: ExpertStats) -> None:
    e = s.num_experts
    ax.axhline(
        s.selections / e,
        color=ACCENT_COLOR,
        linestyle="--",
        linewidth=1.2,
        label=f"uniform share (1/{e} = {100 / e:.2f}%)",
    )


def _annotate_top(ax: Axes, s: ExpertStats, order: np.ndarray) -> None:
    """'expert: share' above each top expert's bar."""
    where = {int(exp): i for i, exp in enumerate(order)}
    for t in s.top:
        ax.annotate(
            f"{t.expert}: {100 * t.share:.1f}%",
            (where[t.expert], t.count),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            rotation=90,
            fontsize=8,
            fontweight="bold",
        )


def _share_axis(ax: Axes, selections: int) -> None:
    """A right-hand axis reading the same bars as % of all selections."""
    share = ax.secondary_yaxis(
        "right", functions=(lambda c: 100 * c / selections, lambda p: p * selections / 100)
    )
    share.set_ylabel("share of selections (%)")


def _hist_axes(
    ax: Axes, log: LogAnalysis, layer: LayerAnalysis, order: np.ndarray, sort: bool
) -> None:
    """Ticks, labels, legend, grid and the title with the headline numbers."""
    s = layer.stats
    _expert_ticks(ax, [int(i) for i in order])
    ax.set_xlim(-0.7, s.num_experts - 0.3)
    ax.set_xlabel("expert id" + (" (sorted by load)" if sort else ""))
    ax.set_ylabel(f"selections (tokens choosing the expert, top-{log.top_k})")
    ax.legend(loc="best", fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(
        f"{log.model_id} | layer {layer.layer} | {s.tokens:,} tokens, top-{log.top_k} of "
        f"{s.num_experts} experts\nentropy {s.entropy_bits:.2f} of {s.max_entropy_bits:.2f} bits "
        f"({100 * s.entropy_ratio:.1f}%), max/mean load {s.max_over_mean:.2f}",
        fontsize=11,
    )


def _contamination_warning(ax: Axes, log: LogAnalysis) -> None:
    """A red line in the corner when the numbers include suspect records."""
    c = log.contamination
    if c.suspicious and not log.excluded:
        ax.text(
            0.01,
            0.97,
            f"warning: {100 * c.suspect_share:.0f}% of records look like dummy/warm-up batches",
            transform=ax.transAxes,
            color=ACCENT_COLOR,
            fontsize=9,
            va="top",
        )


# --------------------------------------------------------------------------- heatmaps


def heatmap_figure(report: AnalysisReport, *, sort: bool = False) -> Figure:
    """One row per (log, layer), one column per expert, colour = share of selections.

    With several rows (a log of several layers, or several logs) a panel on the right draws
    each row's entropy (% of its maximum), so the most skewed layers stand out; with several
    logs the rows of one layer sit together, between thin separators, and experts a log's model
    does not have are grey."""
    rows = _heatmap_rows(report)
    grid, labels = _share_grid(report, rows)
    e = grid.shape[1]
    order = _by_load(np.nansum(grid, axis=0)) if sort else np.arange(e)
    n = len(rows)
    height = min(max(3.0, (0.32 if n <= 30 else 0.22) * n + 2.0), 30.0)
    profile = n > 1
    fig = Figure(figsize=(_width(e, 3.5 + (2.2 if profile else 0.0)), height), layout="constrained")
    if profile:
        ax, prof = fig.subplots(
            1, 2, sharey=True, gridspec_kw={"width_ratios": [max(0.2 * e, 5.0), 1.8]}
        )
    else:
        ax, prof = fig.subplots(), None
    cmap = colormaps["viridis"].with_extremes(bad="#D9D9D9")
    im = ax.imshow(grid[:, order], aspect="auto", cmap=cmap, interpolation="nearest")
    _expert_ticks(ax, [int(i) for i in order])
    ax.set_yticks(np.arange(n), labels, fontsize=8 if n <= 30 else 6)
    ax.set_xlabel("expert id" + (" (sorted by total load)" if sort else ""))
    for y in _group_edges(rows, report):
        ax.axhline(y, color="white", linewidth=1.5)
    if prof is not None:
        _entropy_profile(prof, report, rows)
    fig.colorbar(
        im,
        ax=[ax, prof] if prof is not None else ax,
        label=f"share of selections (%); uniform = {_uniform_label(rows)}",
        pad=0.01,
        aspect=max(20.0, 4 * height),  # about a quarter inch wide, however tall the figure
    )
    models = sorted({log.model_id for log, _ in rows})
    ax.set_title(f"expert load per layer: {', '.join(models)}", fontsize=11)
    return fig


def _heatmap_rows(report: AnalysisReport) -> list[tuple[LogAnalysis, LayerAnalysis]]:
    """The report's rows; with several logs grouped by layer (ascending), logs in order."""
    rows = report.rows()
    if len(report.logs) == 1:
        return rows
    return sorted(rows, key=lambda r: r[1].layer)  # stable: logs keep their order


def _group_edges(
    rows: list[tuple[LogAnalysis, LayerAnalysis]], report: AnalysisReport
) -> list[float]:
    """y of the separators between layers, with several logs (and several layers)."""
    if len(report.logs) == 1 or len(rows) == len(report.logs):
        return []
    layers = [la.layer for _, la in rows]
    return [i - 0.5 for i in range(1, len(layers)) if layers[i] != layers[i - 1]]


def _uniform_label(rows: list[tuple[LogAnalysis, LayerAnalysis]]) -> str:
    """'1.67%', or one share per expert count ('1.67% (60 experts), 1.56% (64 experts)')."""
    counts = sorted({la.stats.num_experts for _, la in rows})
    if len(counts) == 1:
        return f"{100 / counts[0]:.2f}%"
    return ", ".join(f"{100 / c:.2f}% ({c} experts)" for c in counts)


def _share_grid(
    report: AnalysisReport, rows: list[tuple[LogAnalysis, LayerAnalysis]]
) -> tuple[np.ndarray, list[str]]:
    """(rows x experts) % of selections per (log, layer), NaN beyond a row's expert count (an
    expert its model does not have), and a label per row."""
    several = len(report.logs) > 1
    grid = np.full((len(rows), max(la.stats.num_experts for _, la in rows)), np.nan)
    labels = []
    for r, (log, la) in enumerate(rows):
        d = np.array(la.stats.distribution)
        grid[r, : d.size] = 100 * d
        labels.append(f"{Path(log.path).stem} L{la.layer}" if several else f"layer {la.layer}")
    return grid, labels


def _entropy_profile(
    ax: Axes, report: AnalysisReport, rows: list[tuple[LogAnalysis, LayerAnalysis]]
) -> None:
    """Entropy (% of its maximum) of each row, a line per log through its layers."""
    several = len(report.logs) > 1
    for i, log in enumerate(report.logs):
        ys = [r for r, (rlog, la) in enumerate(rows) if rlog is log and la.stats.tokens]
        xs = [100 * rows[r][1].stats.entropy_ratio for r in ys]
        ax.plot(
            xs,
            ys,
            marker="o",
            markersize=3.5,
            linewidth=1,
            color=f"C{i % 10}",
            label=Path(log.path).stem if several else None,
        )
    ax.set_xlabel("entropy (% of max)")
    ax.tick_params(axis="y", labelleft=False)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("entropy by layer", fontsize=10)
    if several:
        ax.legend(fontsize=7, frameon=False, loc="best")


def coselect_figure(report: AnalysisReport, *, sort: bool = False) -> Figure:
    """Expert x expert: share of tokens that chose both experts (diagonal hidden). Up to
    :data:`MAX_PANELS` (log, layer) rows side by side; beyond that the figure's title says which
    it shows and how to choose."""
    rows = [(log, la) for log, la in report.rows() if la.coselection is not None]
    if not rows:
        raise UserError("no co-selection matrix: too many experts, or no routes")
    total = len(rows)
    rows = rows[:MAX_PANELS]
    cols = min(len(rows), 2)
    nrows = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(8.5 * cols, 7.5 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax in axes.ravel()[len(rows) :]:
        ax.axis("off")
    for ax, (log, la) in zip(axes.ravel(), rows, strict=False):
        _coselect_panel(fig, ax, log, la, sort)
    if total > len(rows):
        fig.suptitle(
            f"co-selection of the first {len(rows)} of {total} layers "
            f"({', '.join(_row_name(report, log, la) for log, la in rows)}); "
            "choose others with --layer",
            fontsize=12,
            color=ACCENT_COLOR,
        )
    return fig


def _row_name(report: AnalysisReport, log: LogAnalysis, la: LayerAnalysis) -> str:
    return f"{Path(log.path).stem} L{la.layer}" if len(report.logs) > 1 else f"{la.layer}"


def _coselect_panel(fig: Figure, ax: Axes, log: LogAnalysis, la: LayerAnalysis, sort: bool) -> None:
    s = la.stats
    assert la.coselection is not None
    m = la.coselection.astype(np.float64)
    e = m.shape[0]
    order = _by_load(np.diag(m)) if sort else np.arange(e)
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


# --------------------------------------------------------------------------- cross-layer


def _extra_results(report: AnalysisReport, name: str) -> list[tuple[LogAnalysis, object]]:
    """(log, result) of analysis ``name`` for the logs that could give it; a UserError with
    the first log's reason when none could."""
    from moeprof.analysis.passes import Skipped

    found = [(log, log.extras.get(name)) for log in report.logs]
    usable = [(log, r) for log, r in found if r is not None and not isinstance(r, Skipped)]
    if usable:
        return usable
    reasons = [r.reason for _, r in found if isinstance(r, Skipped)]
    raise UserError(f"nothing to plot: {reasons[0] if reasons else f'{name} was not run'}")


def transition_pair(log: LogAnalysis, result: CrossLayerResult) -> LayerPair:
    """The pair of layers to draw: the first pair, or with ``--layer l`` the pair l -> the
    next logged layer (the first chosen layer that has one)."""
    shown = [la.layer for la in log.layers]
    for p in result.pairs:
        if p.layer in shown:
            return p
    raise UserError(
        f"layer {format_layers(shown)} is the last logged layer: no next layer to compare it "
        f"with (--layer l draws l -> the next logged layer, l one of "
        f"{format_layers([p.layer for p in result.pairs])})"
    )


def transitions_figure(report: AnalysisReport, *, sort: bool = False) -> Figure:
    """Expert at layer l (rows) x expert at the next logged layer (columns): colour = lift
    ``P(a,b) / (P_a P_b)`` on a log2 scale (white = 1, as often as independent layers would
    make the pair), grey where fewer tokens than the listing minimum made the pair (noise), for
    the first log that has the analysis. ``sort`` orders each axis by its layer's load."""
    log, result = _extra_results(report, "cross_layer")[0]
    assert isinstance(result, CrossLayerResult)
    p = transition_pair(log, result)
    e = p.joint.shape[0]
    rows_order = _by_load(p.joint.sum(axis=1)) if sort else np.arange(e)
    cols_order = _by_load(p.joint.sum(axis=0)) if sort else np.arange(e)
    lift = p.lift()
    with np.errstate(divide="ignore"):
        shown = np.log2(lift)
    shown[p.joint < result.min_tokens] = np.nan
    shown = shown[np.ix_(rows_order, cols_order)]
    finite = np.abs(shown[np.isfinite(shown)])
    vmax = max(float(np.percentile(finite, 99)) if finite.size else 1.0, 0.5)
    side = min(max(6.0, 0.12 * e + 3.0), 30.0)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["RdBu_r"].with_extremes(bad="#D9D9D9")
    im = ax.imshow(shown, cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    _expert_ticks(ax, [int(i) for i in cols_order], "x")
    _expert_ticks(ax, [int(i) for i in rows_order], "y")
    by = " (sorted by load)" if sort else ""
    ax.set_xlabel(f"expert at layer {p.next_layer}{by}")
    ax.set_ylabel(f"expert at layer {p.layer}{by}")
    bar = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.01)
    bar.set_label(f"log2 lift P(a,b) / (P(a) P(b)); grey: < {result.min_tokens} tokens")
    gap = "" if p.adjacent else " (layers between not logged)"
    ax.set_title(
        f"{log.model_id} | layer {p.layer} -> {p.next_layer}{gap} | {p.tokens:,} tokens, "
        f"top-{result.top_k}\nMI {p.mi_bits:.3f} bits (chance {p.baseline_bits:.2g}), "
        f"{100 * p.normalized_mi:.1f}% of min(H)",
        fontsize=10,
    )
    return fig


# --------------------------------------------------------------------------- reuse


def reuse_figure(report: AnalysisReport) -> Figure:
    """Hit rate of a per-request LRU cache of C experts against C (from k to E), one line per
    shown layer of the first log that has the analysis, and the chance line: the same requests
    with independent tokens (:func:`moeprof.analysis.reuse.che_hit_rates`), averaged over the
    layers weighted by accesses. Dotted verticals mark k and 2k."""
    log, result = _extra_results(report, "reuse")[0]
    assert isinstance(result, ReuseResult)
    shown = {la.layer for la in log.layers}
    layers = [la for la in result.layers if la.layer in shown and la.accesses]
    if not layers:
        raise UserError("nothing to plot: no routes in the chosen layers")
    fig = Figure(figsize=(9.0, 5.6), layout="constrained")
    ax = fig.subplots()
    cap = np.array(layers[0].capacities)
    many = len(layers) > 10  # a colour scale by layer instead of a legend
    cmap = colormaps["viridis"]
    lo, hi = min(la.layer for la in layers), max(la.layer for la in layers)
    norm = Normalize(lo, max(hi, lo + 1))
    for i, la in enumerate(layers):
        color = cmap(norm(la.layer)) if many else f"C{i % 10}"
        ax.plot(
            cap,
            100 * np.array(la.hit_rate, dtype=np.float64),
            color=color,
            linewidth=1.2,
            label=None if many else f"layer {la.layer}",
        )
    weights = np.array([la.accesses for la in layers], np.float64)
    chance = np.array([la.chance_hit_rate for la in layers], np.float64)
    mean_chance = (weights[:, None] * chance).sum(axis=0) / weights.sum()
    ax.plot(
        cap,
        100 * mean_chance,
        color="black",
        linestyle="--",
        linewidth=1.5,
        label="chance: tokens independent, same loads",
    )
    k = result.top_k
    for c, name in ((k, "k"), (2 * k, "2k")):
        if c <= cap[-1]:
            ax.axvline(c, color="#8C8C8C", linestyle=":", linewidth=1)
            ax.annotate(name, (c, 1), xytext=(2, 0), textcoords="offset points", fontsize=8)
    if many:
        fig.colorbar(ScalarMappable(norm, cmap), ax=ax, label="layer", pad=0.01)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.set_xlim(cap[0], cap[-1])
    ax.set_ylim(0, 100)
    ax.set_xlabel(f"cache size C (experts per request and layer; top-{k} of {result.num_experts})")
    ax.set_ylabel("hit rate (% of expert accesses; first uses are misses)")
    ax.grid(alpha=0.3)
    i2 = layers[0].at(2 * k)
    at2 = ""
    if i2 is not None:
        hit2 = np.average([la.hit_rate[i2] for la in layers], weights=weights)
        at2 = f"\nat C=2k={2 * k}: {100 * hit2:.1f}% (chance {100 * mean_chance[i2]:.1f}%)"
        at2 += ", mean over layers" if len(layers) > 1 else ""
    ax.set_title(
        f"{log.model_id} | per-request LRU expert cache, {len(layers)} layer"
        f"{'s' if len(layers) > 1 else ''}{at2}",
        fontsize=10,
    )
    return fig


# --------------------------------------------------------------------------- expert parallelism

EP_COLORS = {"contiguous": "#4C72B0", "EPLB": "#DD8452"}


def ep_figure(report: AnalysisReport) -> Figure:
    """Balancedness (mean / max rank load) per engine step, mean over the logged layers, one
    panel per rank count: vLLM's contiguous placement over every step, the EPLB placement over
    the evaluation steps (after its fit, shaded), for the first log that has the analysis.
    Each point is one step, or the mean of a run of steps in long logs (said in the title)."""
    log, result = _extra_results(report, "ep")[0]
    assert isinstance(result, EpAnalysis) and result.timeline is not None
    t = result.timeline
    n = len(t.ranks)
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(7.0 * cols, 3.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    first = float(t.step[0]) if t.step.size else 0.0
    for i, (ax, br) in enumerate(zip(axes.ravel(), result.by_ranks, strict=False)):
        ax.axvspan(first, t.eval_from_step, color="#E5E5E5", zorder=0, label="EPLB fit steps")
        ax.plot(
            t.step,
            t.contiguous[:, i],
            color=EP_COLORS["contiguous"],
            linewidth=0.8,
            label=f"contiguous (mean {_ep_num(br.contiguous_mean)} after the fit)",
        )
        if br.eplb_mean is not None:
            ax.plot(
                t.eplb_step,
                t.eplb[:, i],
                color=EP_COLORS["EPLB"],
                linewidth=0.8,
                label=f"EPLB, {result.redundant_experts} redundant (mean {_ep_num(br.eplb_mean)})",
            )
        elif br.eplb_skipped:  # say why the panel has no EPLB line
            ax.text(
                0.01,
                0.02,
                f"no EPLB line: {br.eplb_skipped}",
                transform=ax.transAxes,
                fontsize=7,
                wrap=True,
                color=ACCENT_COLOR,
            )
        ax.axhline(1 / br.ranks, color=ACCENT_COLOR, linestyle=":", linewidth=1)
        ax.annotate(
            "1/R: one rank does all",
            (1.0, 1 / br.ranks),
            xycoords=("axes fraction", "data"),
            xytext=(-4, 3),
            textcoords="offset points",
            ha="right",
            fontsize=7,
            color=ACCENT_COLOR,
        )
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{br.ranks} ranks", fontsize=10)
        ax.set_ylabel("balancedness (mean / max rank load)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7, framealpha=0.8)
    for ax in axes[-1]:
        ax.set_xlabel("engine step")
    layers = format_layers(log.meta.get("layers_logged", []))
    per = f"; each point the mean of {t.steps_per_point} steps" if t.steps_per_point > 1 else ""
    fig.suptitle(
        f"{log.model_id} | load balance per engine step under expert parallelism, mean over "
        f"layers {layers}{per}\nEPLB fitted on steps before {t.eval_from_step:,} (shaded), "
        f"compared on the {result.eval_steps:,} steps after",
        fontsize=10,
    )
    return fig


def _ep_num(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}"
