"""Expert activation counts per layer and phase, read the fast way, and the load-balance numbers
computed from them.

This is ``analyze``'s *load statistics* on their own (:func:`count_experts`): for each logged
layer, how many routes selected each expert, in all and per phase. A Parquet log is read three
columns at a time (layer, phase, topk_ids; see
:func:`~moeprof.analysis.accumulate.load_statistics`), a JSON Lines log through the full reader.
Only what those columns carry is checked (ids in range and distinct, logged layers, known
phases); the rules on ``req_id``, ``token_idx`` and ``step`` are ``validate``'s.

Vocabulary (as :mod:`moeprof.analysis.load_balance`): a *route* is one token at one layer; it
selects ``top_k`` distinct experts, so a layer's counts sum to ``top_k * routes``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from moeprof.analysis.accumulate import PHASE_CODES, ImplausibleExpertIdError, load_statistics
from moeprof.analysis.analyze import PHASE_NAMES, _resolve_num_experts, inferred_experts_warning
from moeprof.analysis.load_balance import Balance, balance_of
from moeprof.analysis.reader import NO_PHASE, Issue, LogBase, LogError

if TYPE_CHECKING:
    import pyarrow as pa

PHASE_ORDER = (*(p for p in PHASE_NAMES if p != NO_PHASE), NO_PHASE)
"""Phase codes in the order :attr:`ExpertCounts.by_phase` lists them: prefill, decode, then
routes without a phase."""
UNKNOWN_PHASE = PHASE_NAMES[NO_PHASE]
"""The :attr:`ExpertCounts.by_phase` key of routes whose log line has no phase ("unknown", as
in ``analyze``)."""


@dataclass(frozen=True)
class _Layer:
    """The fields :class:`LayerBalance` puts before the balance numbers."""

    layer: int
    routes: int
    """Route records of the layer (tokens routed at it)."""


# a dataclass takes its bases' fields in reverse method resolution order: _Layer's come first
@dataclass(frozen=True)
class LayerBalance(Balance, _Layer):
    """How evenly one layer spreads its selections over its experts: ``layer``, ``routes``,
    then the :class:`~moeprof.analysis.load_balance.Balance` of its counts (the numbers
    ``analyze`` prints for the layer's "all" row). NaN where undefined (a layer without
    routes); ``selections`` is ``top_k * routes``."""


def layer_balance(layer: int, counts: np.ndarray, routes: int) -> LayerBalance:
    """The :class:`LayerBalance` of one layer's per-expert ``counts`` (length E)."""
    return LayerBalance(layer=layer, routes=int(routes), **vars(balance_of(counts)))


@dataclass(frozen=True, eq=False)
class ExpertCounts:
    """Expert activation counts of one log (a run's data-parallel ranks count as one), per
    logged layer and per phase. The arrays are read-only.

    Row ``i`` of every array is layer ``layers[i]``; column ``e`` is expert ``e``.
    """

    path: str
    """The log (for several rank files, a label naming them all)."""
    layers: tuple[int, ...]
    """The logged layers (the meta's ``layers_logged``), in the log's order."""
    num_experts: int
    """Length of the expert axis: the meta's ``num_experts``, else the ``num_experts`` asked
    for, else the largest expert id in the log + 1 (see :attr:`num_experts_source`)."""
    num_experts_source: str
    """Where :attr:`num_experts` came from: ``"meta"``, ``"--num-experts"`` (the argument) or
    ``"inferred"`` (max id + 1; experts above it that no route selected are not counted)."""
    top_k: int
    """Experts each route selects."""
    counts: np.ndarray
    """(layers, num_experts) int64: ``counts[i, e]`` is the number of routes at layer
    ``layers[i]`` that selected expert ``e`` (every route, any phase). A row sums to
    ``top_k * routes[i]``."""
    by_phase: Mapping[str, np.ndarray]
    """Phase name -> an array shaped like :attr:`counts`, of the routes of that phase only:
    ``"prefill"``, ``"decode"`` as the log names them, and ``"unknown"`` for routes logged
    without a phase; only phases some route has, in that order. They add up to :attr:`counts`."""
    routes: np.ndarray
    """(layers,) int64: route records per layer."""
    routes_by_phase: Mapping[str, np.ndarray]
    """Phase name -> (layers,) route records per layer of that phase (keys as :attr:`by_phase`)."""
    warnings: tuple[str, ...] = ()
    """What the reader and the counting noticed without refusing the log (a rank file missing,
    ``num_experts`` inferred, a logged layer without routes)."""

    @property
    def total_routes(self) -> int:
        """Route records in the log (all layers)."""
        return int(self.routes.sum())

    def layer(self, layer: int) -> np.ndarray:
        """The counts row of decoder layer ``layer`` (KeyError when it was not logged)."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not logged (layers {list(self.layers)})")
        return self.counts[self.layers.index(layer)]

    def balance(self) -> list[LayerBalance]:
        """The load-balance numbers of each layer, in :attr:`layers` order."""
        return [
            layer_balance(layer, self.counts[i], int(self.routes[i]))
            for i, layer in enumerate(self.layers)
        ]

    def to_table(self) -> pa.Table:
        """A tidy table, one row per (layer, phase, expert), zero counts included: ``layer``
        (int32), ``phase`` (string, keys of :attr:`by_phase`), ``expert`` (int32), ``count``
        (int64). Summed over ``phase`` it gives :attr:`counts`. For DuckDB
        (``duckdb.sql("select layer, sum(count) from t group by layer")``) or pandas
        (``.to_pandas()``)."""
        import pyarrow as pa

        n_layers, n_experts = self.counts.shape
        phases = list(self.by_phase)
        cells = n_layers * n_experts
        layer = np.repeat(np.asarray(self.layers, np.int32), n_experts)
        expert = np.tile(np.arange(n_experts, dtype=np.int32), n_layers)
        return pa.table(
            {
                "layer": pa.array(np.tile(layer, len(phases))),
                "phase": pa.array(np.repeat(np.asarray(phases, dtype=object), cells), pa.string()),
                "expert": pa.array(np.tile(expert, len(phases))),
                "count": pa.array(
                    np.concatenate([self.by_phase[p].reshape(-1) for p in phases])
                    if phases
                    else np.zeros(0, np.int64)
                ),
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``moeprof counts --json``): the log's fields, then per layer its
        routes, load-balance numbers and counts, in all and per phase. Undefined numbers
        (NaN) are null."""
        phases = list(self.by_phase)
        return {
            "path": self.path,
            "num_experts": self.num_experts,
            "num_experts_source": self.num_experts_source,
            "top_k": self.top_k,
            "routes": self.total_routes,
            "phases": phases,
            "layers": [
                {
                    **{k: _json_number(v) for k, v in vars(b).items() if k != "never_used"},
                    "never_used": list(b.never_used),
                    "routes_by_phase": {p: int(self.routes_by_phase[p][i]) for p in phases},
                    "counts": self.counts[i].tolist(),
                    "by_phase": {p: self.by_phase[p][i].tolist() for p in phases},
                }
                for i, b in enumerate(self.balance())
            ],
            "warnings": list(self.warnings),
        }


def _json_number(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def count_experts(log: LogBase, *, num_experts: int | None = None) -> ExpertCounts:
    """The :class:`ExpertCounts` of an open log, in one pass over the columns they need.

    ``num_experts`` is used when the meta does not declare it (the meta wins, with a warning
    when they differ), as in ``analyze``. Raises :class:`~moeprof.analysis.reader.LogError`
    (``file:line: reason``) at the first invalid route."""
    warnings: list[str] = []
    log, experts, source = _resolve_num_experts(log, num_experts, warnings)
    assert log.meta is not None

    def strict(issue: Issue) -> None:
        if issue.severity == "error":
            raise LogError(f"{issue.format(log.path)} (run `moeprof validate {log.path}`)")
        warnings.append(issue.format(log.path))

    try:
        stats = load_statistics(log, strict)
    except ImplausibleExpertIdError as e:
        raise LogError(f"{log.path}: {e}") from e
    if experts is None:
        experts = stats.widest()
        warnings.append(inferred_experts_warning(experts))
    layers = tuple(log.layers)
    phases: dict[int, np.ndarray] = {}
    routes: dict[int, np.ndarray] = {}
    for slot in range(len(layers)):
        for phase, row in stats.by_phase(slot).items():
            if phase not in phases:
                phases[phase] = np.zeros((len(layers), experts), np.int64)
                routes[phase] = np.zeros(len(layers), np.int64)
            phases[phase][slot, : row.size] = row
    for row, key in enumerate(stats.keys):  # a stream's key: slot * len(PHASE_CODES) + offset
        slot, offset = divmod(key, len(PHASE_CODES))
        routes[PHASE_CODES[offset]][slot] = stats.tokens[row]
    order = [p for p in PHASE_ORDER if p in phases]
    counts = sum((phases[p] for p in order), np.zeros((len(layers), experts), np.int64))
    per_layer = sum((routes[p] for p in order), np.zeros(len(layers), np.int64))
    for slot, layer in enumerate(layers):
        if per_layer[slot] == 0:
            warnings.append(f"layer {layer} is in layers_logged but has no routes")
    return ExpertCounts(
        path=str(log.path),
        layers=layers,
        num_experts=experts,
        num_experts_source=source,
        top_k=log.meta.top_k,
        counts=_frozen(counts),
        by_phase=MappingProxyType({PHASE_NAMES[p]: _frozen(phases[p]) for p in order}),
        routes=_frozen(per_layer),
        routes_by_phase=MappingProxyType({PHASE_NAMES[p]: _frozen(routes[p]) for p in order}),
        warnings=tuple(warnings),
    )
