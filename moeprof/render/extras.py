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

from moeprof.analysis.analyze import AnalysisReport
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


def print_extras(report: AnalysisReport, console: Console) -> None:
    """Every log's extra analyses, in the order they ran."""
    import moeprof.render.extra_sections  # noqa: F401  (registers every section)

    for log in report.logs:
        for name, result in log.extras.items():
            where = f" ({Path(log.path).name})" if len(report.logs) > 1 else ""
            if isinstance(result, Skipped):
                console.print(f"{name}{where}: skipped: {result.reason}", highlight=False)
                continue
            printer = SECTIONS.get(name)
            if printer is None:
                console.print(f"{name}{where}: see --json", highlight=False)
                continue
            printer(result, console)
