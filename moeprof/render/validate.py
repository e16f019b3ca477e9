"""What ``validate`` shows on the terminal: each kept problem as ``file:line: reason``, the
counts, then the verdict."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from moeprof.analysis.validate import ValidationReport


def print_validation(report: ValidationReport, console: Console) -> None:
    """The terminal form: kept problems, counts, whether the log is complete, verdict."""
    _print_issues(report, console)
    if report.meta is not None or report.lines:  # a Parquet log of the wrong shape: no counts
        console.print(_counts_table(report))
    if report.completeness and report.complete is not False:
        console.print(report.completeness, highlight=False, markup=False)
    path = report.path
    if report.valid:
        note = f" ({report.warning_count} warnings)" if report.warning_count else ""
        console.print(f"[bold green]valid[/]: {path}{note}", highlight=False)
    else:
        console.print(
            f"[bold red]invalid[/]: {path}: {report.error_count:,} errors", highlight=False
        )


def _print_issues(report: ValidationReport, console: Console) -> None:
    path = report.path
    for issue in report.errors:
        console.print(issue.format(path), highlight=False, soft_wrap=True, markup=False)
    for issue in report.warnings:
        console.print(
            f"{issue.format(path)} (warning)", highlight=False, soft_wrap=True, markup=False
        )
    hidden = report.error_count - len(report.errors)
    if hidden > 0:
        console.print(f"... and {hidden:,} more errors (raise --max-errors to list them)")


def _counts_table(report: ValidationReport) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 2))
    if report.files:
        table.add_row(
            "files", f"{len(report.files)} data-parallel ranks: {', '.join(report.files)}"
        )
    table.add_row("rows" if report.form == "parquet" else "lines", f"{report.lines:,}")
    table.add_row("valid routes", f"{report.routes:,}")
    for layer, n in report.routes_by_layer.items():
        table.add_row(f"  layer {layer}", f"{n:,}")
    if report.summary:
        s = report.summary
        table.add_row(
            "routes per request",
            f"{s.requests:,} requests: min {s.min:,}, median {s.median:,.0f}, "
            f"mean {s.mean:,.1f}, max {s.max:,}",
        )
    table.add_row("duplicate keys", f"{report.duplicates:,}")
    table.add_row("(request, layer) with gaps", f"{report.gaps:,}")
    if report.outputs:
        o = report.outputs
        table.add_row(
            "outputs accounting",
            f"{o.matched}/{o.requests} requests found, {o.missing_from_log} missing, "
            f"{o.extra_in_log} extra, {o.mismatched} (request, layer) counts off",
        )
        table.add_row("expected routes", f"{o.expected_routes:,}")
        if o.cached_tokens or o.cached_inferred:
            inferred = (
                f" ({o.cached_inferred:,} requests: inferred from the log, "
                "not recorded in the outputs)"
                if o.cached_inferred
                else ""
            )
            table.add_row("prefix-cached prompt tokens", f"{o.cached_tokens:,}{inferred}")
    return table
