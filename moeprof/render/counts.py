"""What ``counts`` shows on the terminal: the log's line, then one row per layer with its routes
and load-balance numbers, formatted as ``analyze`` formats them."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from moeprof.analysis.counts import ExpertCounts
from moeprof.layers import format_layers
from moeprof.render.numbers import num


def print_counts(counts: ExpertCounts, console: Console) -> None:
    """The log's line (name, routes, E and where it came from, top-k, layers), then the table."""
    n = len(counts.layers)
    console.print(
        f"[bold]{Path(counts.path).name}[/]: {counts.total_routes:,} routes, "
        f"E={counts.num_experts} ({counts.num_experts_source}), top-{counts.top_k}, "
        f"{n} layer{'s' if n != 1 else ''} ({format_layers(counts.layers)})",
        highlight=False,
        soft_wrap=True,
    )
    table = counts_table(counts)
    if console.is_terminal:
        console.print(table)
    else:  # a pipe gets rich's default 80 columns
        Console(file=console.file, width=max(console.width, 120), color_system=None).print(table)


def counts_table(counts: ExpertCounts) -> Table:
    """One row per layer: routes (and per phase, when the log has several), CV, max/mean,
    Gini, entropy/max, unused experts."""
    phases = list(counts.by_phase) if len(counts.by_phase) > 1 else []
    table = Table(
        title="expert load per layer (shares are of all top-k selections)", title_justify="left"
    )
    table.add_column("layer", justify="right")
    table.add_column("routes", justify="right")
    for phase in phases:
        table.add_column(phase, justify="right")
    for col in ("CV", "max/mean", "Gini", "entropy/max", "unused"):
        table.add_column(col, justify="right")
    for i, b in enumerate(counts.balance()):
        table.add_row(
            str(b.layer),
            f"{b.routes:,}",
            *(f"{int(counts.routes_by_phase[p][i]):,}" for p in phases),
            num(b.cv),
            num(b.max_over_mean),
            num(b.gini),
            num(b.entropy_ratio, ".0%"),
            str(len(b.never_used)),
        )
    return table
