"""What ``analyze`` shows on the terminal: one table row per layer (and phase), then per log
its contamination verdict, phase divergence and most co-selected pairs, then the comparisons."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from moeprof.analysis.analyze import AnalysisReport, LayerAnalysis, LogAnalysis
from moeprof.render.numbers import num, pct

_STAT_COLUMNS = ("CV", "max/mean", "Gini", "unused", "w top-1", "w sum")


def print_report(report: AnalysisReport, console: Console) -> None:
    """The terminal form: the table, then the notes on each log, then JSD between logs."""
    _print_wide(console, _table(report))
    for log in report.logs:
        _print_log_notes(log, report.exclude_suspect, console)
    for c in report.comparisons:
        console.print(
            f"layer {c.layer}: JSD {c.jsd:.4f} bits between {Path(c.a).name} and {Path(c.b).name}",
            highlight=False,
        )


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


def _print_log_notes(log: LogAnalysis, exclude_suspect: bool, console: Console) -> None:
    console.print(
        f"[bold]{Path(log.path).name}[/]: {log.model_id}, {log.records:,} routes, "
        f"E={log.num_experts} ({log.num_experts_source}), top-{log.top_k}"
        + (f", {log.excluded:,} suspect records excluded" if exclude_suspect else ""),
        highlight=False,
        soft_wrap=True,
    )
    c = log.contamination
    if c.suspicious:
        console.print(f"  [yellow]suspect:[/] {c.describe()}", highlight=False, soft_wrap=True)
    else:
        console.print("  no sign of dummy batches or double logging", highlight=False)
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
