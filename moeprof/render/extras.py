"""The terminal sections of the extra analyses (:mod:`moeprof.analysis.passes`).

Each analysis module of :mod:`moeprof.render` that prints one registers its section function
in :data:`SECTIONS` under the analysis's name; an analysis the log could not give prints as one
line saying why.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from moeprof.analysis.analyze import AnalysisReport, LogAnalysis
from moeprof.analysis.passes import Skipped

SECTIONS: dict[str, Callable[[Any, Console], None]] = {}
"""Analysis name -> function printing its result."""


def section(
    name: str,
) -> Callable[[Callable[[Any, Console], None]], Callable[[Any, Console], None]]:
    def deco(fn: Callable[[Any, Console], None]) -> Callable[[Any, Console], None]:
        SECTIONS[name] = fn
        return fn

    return deco


NOTES: dict[str, Callable[[Any], list[str]]] = {}
"""Analysis name -> function giving its lines (markdown) in ``analyze --markdown``'s note."""


def note(name: str) -> Callable[[Callable[[Any], list[str]]], Callable[[Any], list[str]]]:
    def deco(fn: Callable[[Any], list[str]]) -> Callable[[Any], list[str]]:
        NOTES[name] = fn
        return fn

    return deco


def extra_notes(log: LogAnalysis) -> list[str]:
    """The markdown lines of ``log``'s extra analyses that have a note, in the order they ran;
    an analysis the log could not give is one line saying why."""
    import moeprof.render.extra_sections  # noqa: F401  (registers every note)

    lines: list[str] = []
    for name, result in log.extras.items():
        writer = NOTES.get(name)
        if writer is None:
            continue
        if isinstance(result, Skipped):
            lines.append(f"- {name.replace('_', '-')}: not computed: {result.reason}.")
        else:
            lines += writer(result)
    return lines


def print_extras(report: AnalysisReport, console: Console) -> None:
    """Every log's extra analyses, in the order they ran."""
    import moeprof.render.extra_sections  # noqa: F401  (registers every section)

    several = len(report.logs) > 1
    for log in report.logs:
        if several and log.extras:
            console.rule(Path(log.path).name, align="left")
        for name, result in log.extras.items():
            where = f" ({Path(log.path).name})" if several else ""
            if isinstance(result, Skipped):
                console.print(f"{name}{where}: skipped: {result.reason}", highlight=False)
                continue
            printer = SECTIONS.get(name)
            if printer is None:
                console.print(f"{name}{where}: see --json", highlight=False)
                continue
            printer(result, console)
