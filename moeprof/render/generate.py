"""What ``generate`` shows on the terminal: live progress of the engine runs and a summary (and
the progress bar of ``export``, the other long-running command)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table


class RunProgress:
    """A spinner while an engine starts, a bar of prompts done while it generates."""

    def __init__(self, console: Console, total_prompts: int) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._total = total_prompts
        self._tasks: dict[str, Any] = {}
        self._done_before: dict[str, int] = {}

    def __enter__(self) -> RunProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def on_event(self, run: str, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "engine_starting":
            self._tasks[run] = self._progress.add_task(
                f"{run}: starting engine", total=self._total, rate=""
            )
            self._done_before[run] = 0
            return
        task = self._tasks.get(run)
        if task is None:
            return
        if kind == "engine_ready":
            self._progress.update(task, description=f"{run}: engine up in {event['seconds']:.0f}s")
        elif kind == "progress":
            self._progress.update(
                task,
                completed=self._done_before[run] + event["done"],
                description=f"{run}: generating",
            )
        elif kind == "pass_done":
            self._done_before[run] += self._total // max(1, event.get("total", 1) or 1)
            rate = event["tokens"] / event["seconds"] if event["seconds"] else 0.0
            self._progress.update(task, rate=f"{rate:,.0f} tok/s")
        elif kind == "engine_stopped":
            self._progress.update(task, description=f"{run}: done", completed=self._total)


@contextlib.contextmanager
def export_progress(console: Console, label: str) -> Iterator[Callable[[int, int | None], None]]:
    """A progress bar of routes for ``moeprof export`` (on stderr, transient; shown only on a
    terminal); yields the callback the library reports to."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,} routes"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    with progress:
        task = progress.add_task(label, total=None)

        def report(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)

        yield report


def print_generate_summary(
    console: Console, report: dict[str, Any], paths: dict[str, Path]
) -> None:
    """Both runs side by side, the logging overhead, and where the files went."""
    table = Table(title=f"moeprof generate: {report['model']}", title_justify="left")
    table.add_column("")
    runs = [(k, report[k]) for k in ("no_log", "log") if k in report]
    for name, _ in runs:
        table.add_column("without log" if name == "no_log" else "with log", justify="right")
    rows = [
        ("prompt tokens", lambda r: f"{r['prompt_tokens']:,}"),
        ("generated tokens", lambda r: f"{r['tokens_generated']:,}"),
        ("generation wall time", lambda r: f"{r['wall_time_sec']:.2f} s"),
        ("tokens / s", lambda r: f"{r['tokens_per_sec']:,.1f}" if r["tokens_per_sec"] else "-"),
        ("engine start", lambda r: f"{r['engine_start_sec']:.1f} s"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(r) for _, r in runs))
    console.print(table)
    if "overhead_pct" in report:
        same = "identical" if report["identical_tokens"] else "[bold red]DIFFERENT[/]"
        console.print(
            f"logging overhead: [bold]{report['overhead_pct']:+.1f}%[/] generation wall time "
            f"(one pass each; use --repeat or bench/overhead.py for a measured ratio); "
            f"generated tokens {same}"
        )
    if report.get("prefix_caching"):
        run = report.get("log") or report["no_log"]
        cached = ", ".join(f"{n:,}" for n in run.get("cached_prompt_tokens", []))
        console.print(
            f"prefix caching on: prompt tokens served from the cache per pass: {cached} "
            f"(of {run['prompt_tokens']:,}; not routed, not logged)"
        )
    if "log" in report:
        log = report["log"]
        layers = f", layers {log['layers']}" if "layers" in log else ""
        closed = ""
        if log.get("complete") is False:
            closed = "; [yellow]no closing record: incomplete[/]"
        console.print(f"log: [bold]{paths['log']}[/] ({log['routes']:,} routes{layers}{closed})")
    console.print(f"timing: {paths['timing']}  outputs: {paths['outputs']}")
