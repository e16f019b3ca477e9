"""What ``analyze`` shows on the terminal.

Logs of one layer each get the full form: one table row per layer and phase, then per log its
contamination verdict, phase divergence and most co-selected pairs, then the comparisons.

A log of several layers (24 for Qwen1.5-MoE, 60 for larger models) would make that several
hundred lines, so it gets the summary form instead: one row per layer (and log), then per log
its contamination verdict and which layers are the most skewed and the most balanced, one line
per pair of logs, and how to see the full form (``details``, or fewer layers).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moeprof.analysis.analyze import AnalysisReport, LayerAnalysis, LogAnalysis
from moeprof.layers import format_layers
from moeprof.render.numbers import num, pct

_STAT_COLUMNS = ("CV", "max/mean", "Gini", "unused", "w top-1", "w sum")
EXTREMES = 3
"""How many of the most skewed and the most balanced layers the summary names."""


def print_report(report: AnalysisReport, console: Console, *, details: bool = False) -> None:
    """The terminal form: the full form for logs of one layer or with ``details``, else the
    per-layer summary (see the module docstring)."""
    from moeprof.render.extras import print_extras

    if report.multi_layer and not details:
        print_summary(report, console)
        print_extras(report, console)
        return
    _print_wide(console, _table(report))
    for log in report.logs:
        _print_log_notes(log, report.exclude_suspect, console)
    for c in report.comparisons:
        console.print(
            f"layer {c.layer}: JSD {c.jsd:.4f} bits between {Path(c.a).name} and {Path(c.b).name}",
            highlight=False,
        )
    print_extras(report, console)


def _table(report: AnalysisReport) -> Table:
    several = len(report.logs) > 1
    table = Table(title="expert routing (shares are of all top-k selections)", title_justify="left")
    if several:
        table.add_column("log", no_wrap=True)
    table.add_column("layer", justify="right")
    table.add_column("phase")
    table.add_column("tokens", justify="right")
    table.add_column("top experts", no_wrap=True)
    table.add_column("entropy bits", justify="right", no_wrap=True)
    for col in _STAT_COLUMNS:
        table.add_column(col, justify="right")
    for log, la in report.rows():
        for cells in _layer_rows(la):
            table.add_row(*([Path(log.path).name] if several else []), *cells)
    return table


def _layer_rows(la: LayerAnalysis) -> list[list[str]]:
    """The cells of the layer's 'all' row, then one row per phase."""
    rows = []
    for phase, s in [("all", la.stats), *la.by_phase.items()]:
        top = ", ".join(f"{t.expert} {pct(t.share)}" for t in s.top)
        rows.append(
            [
                str(la.layer),
                phase,
                f"{s.tokens:,}",
                top or "-",
                f"{num(s.entropy_bits)} ({num(s.entropy_ratio, '.0%')})",
                num(s.cv),
                num(s.max_over_mean),
                num(s.gini),
                str(len(s.never_used)),
                num(s.weights.mean_top1, ".3f"),
                num(s.weights.mean_sum, ".3f"),
            ]
        )
    return rows


def _print_wide(console: Console, table: Table) -> None:
    if console.is_terminal:
        console.print(table)
    else:  # a pipe gets rich's default 80 columns, too narrow for this table
        Console(file=console.file, width=max(console.width, 150), color_system=None).print(table)


def _print_contamination(log: LogAnalysis, console: Console) -> None:
    """The contamination verdict: each suspect class with its count, then what the keys say
    (a degenerate key scheme, keys reused with other routes); or that there is no sign."""
    c = log.contamination
    text = c.describe()
    if c.suspicious or c.degenerate:
        console.print(f"  [yellow]contamination:[/] {text}", highlight=False, soft_wrap=True)
    elif text:
        console.print(
            f"  no sign of dummy batches or double logging. {text}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print("  no sign of dummy batches or double logging", highlight=False)


def _print_log_header(
    log: LogAnalysis, exclude_suspect: bool, console: Console, *, layers: bool = False
) -> None:
    """The log's line (name, model, routes, E, top-k; with ``layers``, the layers it logs), then
    its contamination verdict."""
    logged = [la.layer for la in log.layers]
    console.print(
        f"[bold]{Path(log.path).name}[/]: {log.model_id}, {log.records:,} routes, "
        f"E={log.num_experts} ({log.num_experts_source}), top-{log.top_k}"
        + (
            f", {len(logged)} layer{'s' if len(logged) != 1 else ''} ({format_layers(logged)})"
            if layers
            else ""
        )
        + (f", {log.excluded:,} suspect records excluded" if exclude_suspect else ""),
        highlight=False,
        soft_wrap=True,
    )
    _print_contamination(log, console)


def _print_log_notes(log: LogAnalysis, exclude_suspect: bool, console: Console) -> None:
    _print_log_header(log, exclude_suspect, console)
    for la in log.layers:
        if la.phase_jsd is not None:
            console.print(
                f"  layer {la.layer}: JSD prefill vs decode {la.phase_jsd:.4f} bits",
                highlight=False,
            )
        pairs = la.stats.top_pairs or []
        if pairs:
            shown = ", ".join(
                f"{p.experts[0]}+{p.experts[1]} ({pct(p.share)}, lift {num(p.lift)})"
                for p in pairs[:3]
            )
            console.print(
                f"  layer {la.layer}: most co-selected pairs {shown}",
                highlight=False,
                soft_wrap=True,
            )


# --------------------------------------------------------------------------- summary form


def print_summary(report: AnalysisReport, console: Console) -> None:
    """One row per layer, the notes on each log, one line per pair of logs, then a hint."""
    _print_wide(console, summary_table(report))
    for log in report.logs:
        _print_log_summary(log, report.exclude_suspect, console)
    for a, b in _pairs(report):
        console.print(_comparison_line(report, a, b), highlight=False, soft_wrap=True)
    example = _most_skewed(report.logs[0])
    layer = example[0].layer if example else report.logs[0].layers[0].layer
    console.print(
        "per-phase rows, router weights and co-selected pairs: add --details (every layer) "
        f"or --layer {layer} (one layer)",
        style="dim",
        highlight=False,
        soft_wrap=True,
    )


def summary_table(report: AnalysisReport) -> Table:
    """One row per (layer, log): tokens, entropy (as % of its maximum, log2 E bits), CV,
    max/mean, unused experts, top expert, prefill/decode JSD. With several logs the rows of one
    layer sit together, and a column gives each log's JSD from the first log at that layer."""
    several = len(report.logs) > 1
    first = report.logs[0]
    phases = any(la.phase_jsd is not None for _, la in report.rows())
    table = Table(
        title="expert routing per layer (shares are of all top-k selections)",
        title_justify="left",
    )
    if several:
        table.add_column("log", no_wrap=True)
    table.add_column("layer", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("entropy/max", justify="right")
    for col in ("CV", "max/mean", "unused"):
        table.add_column(col, justify="right")
    table.add_column("top expert", no_wrap=True)
    if phases:
        table.add_column("JSD prefill/decode", justify="right")
    if several:
        table.add_column(f"JSD vs {Path(first.path).name}", justify="right")
    rows = _layer_major(report) if several else [[r] for r in report.rows()]
    for group in rows:
        for i, (log, la) in enumerate(group):
            s = la.stats
            cells = [
                str(la.layer),
                f"{s.tokens:,}",
                num(s.entropy_ratio, ".1%"),
                num(s.cv),
                num(s.max_over_mean),
                str(len(s.never_used)),
                f"{s.top[0].expert} {pct(s.top[0].share)}" if s.top else "-",
            ]
            if phases:
                cells.append(num(la.phase_jsd, ".4f"))
            if several:
                jsd = None if log is first else report.jsd(first.path, log.path, la.layer)
                cells = [Path(log.path).name, *cells, num(jsd, ".4f") if log is not first else ""]
            table.add_row(*cells, end_section=several and i == len(group) - 1)
    return table


def _layer_major(report: AnalysisReport) -> list[list[tuple[LogAnalysis, LayerAnalysis]]]:
    """The report's rows grouped by layer (ascending), each group in log order."""
    groups: dict[int, list[tuple[LogAnalysis, LayerAnalysis]]] = {}
    for log, la in report.rows():
        groups.setdefault(la.layer, []).append((log, la))
    return [groups[layer] for layer in sorted(groups)]


def _routed(log: LogAnalysis) -> list[LayerAnalysis]:
    return [la for la in log.layers if la.stats.tokens]


def _most_skewed(log: LogAnalysis) -> list[LayerAnalysis]:
    """The routed layers, lowest entropy ratio first (ties: lower layer first)."""
    return sorted(_routed(log), key=lambda la: (la.stats.entropy_ratio, la.layer))


def _print_log_summary(log: LogAnalysis, exclude_suspect: bool, console: Console) -> None:
    """The log's header and contamination verdict; for several layers, the extremes."""
    _print_log_header(log, exclude_suspect, console, layers=True)
    ranked = _most_skewed(log)
    if len(ranked) < 2:
        return

    def listed(las: list[LayerAnalysis]) -> str:
        return ", ".join(
            f"{la.layer} ({num(la.stats.entropy_ratio, '.1%')}, max/mean "
            f"{num(la.stats.max_over_mean)})"
            for la in las
        )

    ratios = [la.stats.entropy_ratio for la in ranked]
    console.print(
        f"  entropy {num(ratios[0], '.1%')} to {num(ratios[-1], '.1%')} of its maximum, "
        f"median {num(statistics.median(ratios), '.1%')}",
        highlight=False,
        soft_wrap=True,
    )
    if len(ranked) > 2 * EXTREMES:  # fewer layers: the table shows them all at a glance
        for label, las in (("skewed", ranked[:EXTREMES]), ("balanced", ranked[::-1][:EXTREMES])):
            console.print(f"  most {label} layers: {listed(las)}", highlight=False, soft_wrap=True)
    jsds = [(la.phase_jsd, la.layer) for la in log.layers if la.phase_jsd is not None]
    if len(jsds) > 1:
        top, at = max(jsds, key=lambda x: (x[0], -x[1]))
        console.print(
            f"  JSD prefill vs decode: median {statistics.median(j for j, _ in jsds):.4f} bits, "
            f"largest {top:.4f} at layer {at}",
            highlight=False,
            soft_wrap=True,
        )


def _pairs(report: AnalysisReport) -> list[tuple[str, str]]:
    """(a, b) log paths of each compared pair, in the comparisons' order."""
    out: list[tuple[str, str]] = []
    for c in report.comparisons:
        if (c.a, c.b) not in out:
            out.append((c.a, c.b))
    return out


def _comparison_line(report: AnalysisReport, a: str, b: str) -> str:
    """JSD between two logs over their shared layers: one layer as in the full form, several
    as median, largest and smallest."""
    cs = [c for c in report.comparisons if (c.a, c.b) == (a, b)]
    names = f"{Path(a).name} and {Path(b).name}"
    if len(cs) == 1:
        return f"layer {cs[0].layer}: JSD {cs[0].jsd:.4f} bits between {names}"
    hi = max(cs, key=lambda c: (c.jsd, -c.layer))
    lo = min(cs, key=lambda c: (c.jsd, c.layer))
    return (
        f"JSD between {names} over {len(cs)} shared layers: median "
        f"{statistics.median(c.jsd for c in cs):.4f} bits, largest {hi.jsd:.4f} at layer "
        f"{hi.layer}, smallest {lo.jsd:.4f} at layer {lo.layer}"
    )
