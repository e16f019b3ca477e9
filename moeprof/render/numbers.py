"""How numbers read in moeprof's terminal tables and notes."""

from __future__ import annotations

import math


def pct(x: float) -> str:
    """A share as a percentage with one decimal: 0.1234 -> '12.3%'."""
    return f"{100 * x:.1f}%"


def num(x: float | None, fmt: str = ".2f") -> str:
    """``x`` in ``fmt``; '-' for an undefined statistic (None, NaN, inf)."""
    return "-" if x is None or not math.isfinite(x) else format(x, fmt)
