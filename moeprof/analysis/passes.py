"""Analyses that ``moeprof analyze`` runs beside its load statistics, on the same stream.

Each one is a *pass*: it sees every chunk the load statistics see (after ``--exclude-suspect``
when that is on), keeps what it needs between chunks (per-request state of live requests at
most: memory stays flat in log size), and at the end returns a dataclass result, or a
:class:`Skipped` saying in one line why the log cannot give it (a log of one layer has no
cross-layer affinity; a log without ``step`` no per-pass load). Passes never print; the
terminal sections are in :mod:`moeprof.render`.

A pass is chosen by name (``ANALYSES``); :func:`make_passes` builds the chosen ones for one
log from :class:`PassOptions`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from moeprof.analysis.reader import RouteChunk, RouteLog


@dataclass(frozen=True)
class Skipped:
    """An analysis the log cannot give, and why (one line, no trailing period)."""

    reason: str


class RoutePass(Protocol):
    """One extra analysis over a log's routes."""

    def add(self, chunk: RouteChunk) -> None:
        """Fold the next chunk in (chunks come in file order)."""

    def finish(self) -> Any:
        """The result: a dataclass (JSON through ``analyze._jsonable``) or :class:`Skipped`."""


@dataclass(frozen=True)
class PassOptions:
    """What the extra analyses may need beyond the log; each reads only its own fields."""

    outputs: Path | None = None
    """``generate``'s outputs.jsonl: prompt and output token ids per request."""
    tokenizer: str | None = None
    """Tokenizer to decode token ids (default: the meta's model)."""
    ep_ranks: tuple[int, ...] | None = None
    """Expert-parallel rank counts to evaluate (default: divisors of E among 2, 4, 8, 16)."""
    redundant_experts: int = 0
    top: int = 5
    """How many entries the 'top ...' lists keep."""
    extra: dict[str, Any] = field(default_factory=dict)


PassFactory = Callable[[RouteLog, "int | None", PassOptions], RoutePass]
"""Builds a pass for one log: (the opened log, its number of experts, the options). The number
of experts is None when neither the meta nor ``--num-experts`` gives it: the pass then sizes
its arrays from the ids it sees (max id + 1), as the load statistics do."""

ANALYSES: dict[str, PassFactory] = {}
"""Name -> factory of every extra analysis, in the order reports show them. Modules register
themselves with :func:`register` when :mod:`moeprof.analysis.extras` imports them."""


def register(name: str) -> Callable[[PassFactory], PassFactory]:
    def deco(factory: PassFactory) -> PassFactory:
        if name in ANALYSES:
            raise ValueError(f"analysis {name!r} registered twice")
        ANALYSES[name] = factory
        return factory

    return deco


def make_passes(
    names: Collection[str], log: RouteLog, num_experts: int | None, options: PassOptions
) -> dict[str, RoutePass]:
    """The chosen passes for ``log``, by name, in ``ANALYSES`` order."""
    import moeprof.analysis.extras  # noqa: F401  (registers every analysis)

    unknown = sorted(set(names) - set(ANALYSES))
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; known: {sorted(ANALYSES)}")
    return {n: ANALYSES[n](log, num_experts, options) for n in ANALYSES if n in names}
