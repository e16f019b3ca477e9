"""``moeprof analyze``: one pass per log into per-layer (and per-phase) statistics and their
JSON form; several logs are compared layer by layer.

A log is read once into one :class:`~moeprof.analysis.accumulate.RoutingAccumulator` per
(layer, phase), with a :class:`~moeprof.analysis.contamination.ContaminationDetector` watching
the same chunks (and, only when keys repeat outside dummy runs, once more to compare their
routes); with ``exclude_suspect`` a further pass re-reads it without the suspect records.
``layers`` keeps only the chosen layers in the result (the log is still read, and checked for
contamination, whole). The terminal table and the markdown note are in :mod:`moeprof.render`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeprof.analysis.accumulate import (
    ImplausibleExpertIdError,
    LayerPhaseAccumulators,
    RoutingAccumulator,
)
from moeprof.analysis.contamination import Contamination, ContaminationDetector, SuspectFilter
from moeprof.analysis.load_balance import jensen_shannon
from moeprof.analysis.passes import PassOptions, RoutePass, make_passes
from moeprof.analysis.reader import (
    NO_PHASE,
    PHASES,
    Issue,
    IssueSink,
    LogError,
    RouteLog,
)
from moeprof.analysis.sources import as_log, open_logs
from moeprof.analysis.summary import ExpertStats, summarize
from moeprof.errors import UserError
from moeprof.layers import LayerSpecError, format_layers, parse_layers

PHASE_NAMES = {NO_PHASE: "unknown", **dict(enumerate(PHASES))}
PREFILL, DECODE = PHASES.index("prefill"), PHASES.index("decode")


@dataclass
class LayerAnalysis:
    layer: int
    stats: ExpertStats
    by_phase: dict[str, ExpertStats] = field(default_factory=dict)
    """Only when the log records phases."""
    phase_jsd: float | None = None
    """Jensen-Shannon divergence (bits) between the prefill and decode distributions."""
    coselection: np.ndarray | None = field(default=None, repr=False, metadata={"json": False})
    """E x E co-selection counts (diagonal: per-expert counts), for plots."""


@dataclass
class LogAnalysis:
    path: str
    model_id: str
    meta: dict[str, Any]
    num_experts: int
    num_experts_source: str
    """'meta', '--num-experts' or 'inferred' (max id + 1)."""
    top_k: int
    records: int
    """Routes analysed (after exclusion)."""
    excluded: int
    contamination: Contamination
    layers: list[LayerAnalysis]
    warnings: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    """The extra analyses asked for (:mod:`moeprof.analysis.passes`), by name: each a result
    dataclass or a :class:`~moeprof.analysis.passes.Skipped`."""


@dataclass(frozen=True)
class Comparison:
    layer: int
    a: str
    b: str
    jsd: float


@dataclass
class AnalysisReport:
    logs: list[LogAnalysis]
    comparisons: list[Comparison]
    exclude_suspect: bool = False

    def rows(self) -> list[tuple[LogAnalysis, LayerAnalysis]]:
        return [(log, layer) for log in self.logs for layer in log.layers]

    @property
    def multi_layer(self) -> bool:
        """Some log has several layers in the report: the per-layer summary views apply."""
        return any(len(log.layers) > 1 for log in self.logs)

    def jsd(self, a: str, b: str, layer: int) -> float | None:
        """JSD between logs ``a`` and ``b`` at ``layer``, either order; None when not compared."""
        for c in self.comparisons:
            if c.layer == layer and {c.a, c.b} == {a, b}:
                return c.jsd
        return None

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _jsonable(obj: Any) -> Any:
    """Dataclasses/numpy to JSON types; NaN/inf (undefined statistics) become null."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {
            f.name: _jsonable(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.metadata.get("json", True)
        }
        if isinstance(obj, Contamination):
            out["suspect_share"] = obj.suspect_share
        return out
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


# --------------------------------------------------------------------------- several logs


def inferred_experts_warning(experts: int) -> str:
    """What a log without ``num_experts`` in its meta is told when the expert axis is inferred."""
    return (
        f"num_experts not in the meta: using max expert id + 1 = {experts} "
        "(pass --num-experts if some experts were never selected)"
    )


def chosen_layers(text: str | None) -> tuple[int, ...] | None:
    """``--layer``'s text (``12``, ``0,12``, ``0-11,23``, ``all``) -> the layers, None for all.
    UserError for text that is not a layer selection."""
    if text is None:
        return None
    try:
        return parse_layers(text).indices
    except LayerSpecError as e:
        raise UserError(f"--layer {e}") from e


def analyze_logs(
    paths: list[str | Path],
    *,
    num_experts: int | None = None,
    top: int = 3,
    exclude_suspect: bool = False,
    min_run: int = 64,
    layers: Collection[int] | None = None,
    analyses: Collection[str] = (),
    options: PassOptions | None = None,
) -> AnalysisReport:
    """Analyse each log, then compare logs layer by layer (JSD of their distributions).
    ``layers``: report only these (None: every logged layer). ``analyses``: names of extra
    analyses (:data:`moeprof.analysis.passes.ANALYSES`) to run on the same pass."""
    logs = [
        analyze_log(
            p,
            num_experts=num_experts,
            top=top,
            exclude_suspect=exclude_suspect,
            min_run=min_run,
            layers=layers,
            analyses=analyses,
            options=options,
        )
        for p in open_logs(paths)  # globs expanded, a run's data-parallel ranks as one log
    ]
    return AnalysisReport(logs, compare(logs), exclude_suspect)


def compare(logs: list[LogAnalysis]) -> list[Comparison]:
    """JSD between every pair of logs, for each layer both logged with routes."""
    comparisons = []
    for a, b in itertools.combinations(logs, 2):
        b_layers = {lb.layer: lb for lb in b.layers}
        for la in a.layers:
            lb = b_layers.get(la.layer)
            if lb is not None and la.stats.tokens and lb.stats.tokens:
                jsd = jensen_shannon(np.array(la.stats.counts), np.array(lb.stats.counts))
                comparisons.append(Comparison(la.layer, a.path, b.path, jsd))
    return comparisons


# --------------------------------------------------------------------------- one log


def analyze_log(
    path: str | Path,
    *,
    num_experts: int | None = None,
    top: int = 3,
    exclude_suspect: bool = False,
    min_run: int = 64,
    layers: Collection[int] | None = None,
    analyses: Collection[str] = (),
    options: PassOptions | None = None,
) -> LogAnalysis:
    """Statistics of one log. Raises :class:`LogError` on the first invalid line: numbers from a
    log that does not validate are not worth printing. ``layers``: report only these; a
    :class:`UserError` when the log has none of them, a warning for each it lacks."""
    warnings: list[str] = []
    log, experts, source = _resolve_num_experts(as_log(path), num_experts, warnings)
    assert log.meta is not None
    shown = _shown_layers(log.path, log.meta.layers_logged, layers, warnings)
    sums = LayerPhaseAccumulators(experts)
    passes = make_passes(analyses, log, experts, options or PassOptions())
    try:
        tally = _read_routes(
            log, sums, passes, warnings, exclude_suspect=exclude_suspect, min_run=min_run
        )
    except ImplausibleExpertIdError as e:
        raise LogError(f"{log.path}: {e}") from e
    if experts is None:
        experts = sums.widest()
        warnings.append(inferred_experts_warning(experts))
    if tally.contamination.suspicious and not exclude_suspect:
        warnings.append(tally.contamination.describe() + " Rerun with --exclude-suspect.")
    elif tally.contamination.degenerate:
        warnings.append(tally.contamination.describe())
    layer_results = _layer_analyses(log.meta.layers_logged, shown, sums, experts, top, warnings)
    return LogAnalysis(
        path=str(log.path),
        model_id=log.meta.model_id,
        meta=log.meta.model_dump(mode="json"),
        num_experts=experts,
        num_experts_source=source,
        top_k=log.meta.top_k,
        records=tally.records,
        excluded=tally.excluded,
        contamination=tally.contamination,
        layers=layer_results,
        warnings=warnings,
        extras={name: p.finish() for name, p in passes.items()},
    )


def _shown_layers(
    path: Path, logged: list[int], chosen: Collection[int] | None, warnings: list[str]
) -> set[int]:
    """The logged layers to report: all, or those of ``chosen`` the log has."""
    if chosen is None:
        return set(logged)
    shown = set(chosen) & set(logged)
    if not shown:
        raise UserError(
            f"{path}: no layer {format_layers(chosen)} in this log; it logged layers "
            f"{format_layers(logged)}"
        )
    missing = set(chosen) - shown
    if missing:
        were = "was" if len(missing) == 1 else "were"
        warnings.append(f"{path}: layer {format_layers(missing)} {were} not logged")
    return shown


def _resolve_num_experts(
    log: RouteLog, num_experts: int | None, warnings: list[str]
) -> tuple[RouteLog, int | None, str]:
    """(log, experts, source): the meta's ``num_experts`` wins over ``--num-experts``, which
    wins over inferring it after reading (``experts`` None, source 'inferred'). With
    ``--num-experts`` the log is read as if its meta declared it (larger ids are errors)."""
    meta = log.meta
    assert meta is not None
    if meta.num_experts is not None:
        if num_experts is not None and num_experts != meta.num_experts:
            warnings.append(
                f"--num-experts {num_experts} ignored: the meta declares num_experts="
                f"{meta.num_experts}"
            )
        return log, meta.num_experts, "meta"
    if num_experts is not None:
        return log.with_num_experts(num_experts), num_experts, "--num-experts"
    return log, None, "inferred"


@dataclass(frozen=True)
class _Tally:
    contamination: Contamination
    records: int
    """Routes folded into the sums."""
    excluded: int
    """Suspect routes left out (``exclude_suspect`` only)."""


def _read_routes(
    log: RouteLog,
    sums: LayerPhaseAccumulators,
    passes: dict[str, RoutePass],
    warnings: list[str],
    *,
    exclude_suspect: bool,
    min_run: int,
) -> _Tally:
    """Fold the log's routes into ``sums``: in one pass, or with ``exclude_suspect`` in a later
    pass that leaves out what the first pass's contamination detector flagged. When keys repeat
    outside dummy runs (foreign logs, double logging), the detector sees the log a second time
    to tell double logging from key collisions by the repeated keys' routes. Passes that ask
    for it (``needs_reread``: ``--ep``, to fit on exactly the first half of the steps) see
    the folded routes once more at the end."""

    def strict(issue: Issue) -> None:
        if issue.severity == "error":
            raise LogError(f"{issue.format(log.path)} (run `moeprof validate {log.path}`)")
        warnings.append(issue.format(log.path))

    def errors_only(issue: Issue) -> None:  # the first pass has reported the warnings
        if issue.severity == "error":
            strict(issue)

    detector = ContaminationDetector(min_run, layers=len(log.layers))
    records = _scan(log, strict, detector, None if exclude_suspect else sums, passes)
    if detector.needs_reread:  # keys repeat outside dummy runs: not in a hook's logs
        _reread(log, errors_only, detector)
    contamination = detector.finish()
    if not exclude_suspect:
        _reread_passes(log, errors_only, passes, None)
        return _Tally(contamination, records, excluded=0)
    records, excluded = _rescan_without_suspects(
        log, errors_only, SuspectFilter(detector), sums, passes
    )
    _reread_passes(log, errors_only, passes, detector)
    return _Tally(contamination, records, excluded)


def _scan(
    log: RouteLog,
    on_issue: IssueSink,
    detector: ContaminationDetector,
    sums: LayerPhaseAccumulators | None,
    passes: dict[str, RoutePass],
) -> int:
    """Show every chunk to ``detector`` and, unless ``sums`` is None, fold it into ``sums`` and
    the ``passes``; returns the routes folded."""
    records = 0
    for chunk in log.chunks(on_issue):
        detector.add(
            log.groups(chunk), chunk.token_idx, chunk.layer, chunk.ids, chunk.weights, chunk.line
        )
        if sums is not None:
            sums.add(log.layer_slot(chunk.layer), chunk.phase, chunk.ids, chunk.weights)
            for p in passes.values():
                p.add(chunk)
            records += len(chunk)
    return records


def _reread(log: RouteLog, on_issue: IssueSink, detector: ContaminationDetector) -> None:
    """Show the log again to ``detector``, which sorts the repeated keys it found by route."""
    for chunk in log.chunks(on_issue):
        detector.reread(
            log.groups(chunk), chunk.token_idx, chunk.layer, chunk.ids, chunk.weights, chunk.line
        )


def _rescan_without_suspects(
    log: RouteLog,
    on_issue: IssueSink,
    suspects: SuspectFilter,
    sums: LayerPhaseAccumulators,
    passes: dict[str, RoutePass],
) -> tuple[int, int]:
    """Fold the routes ``suspects`` keeps into ``sums``: (routes folded, routes left out)."""
    records = excluded = 0
    for chunk in log.chunks(on_issue):
        drop = suspects.mask(
            log.groups(chunk), chunk.token_idx, chunk.layer, chunk.ids, chunk.weights, chunk.line
        )
        excluded += int(drop.sum())
        kept = chunk.take(~drop)
        sums.add(log.layer_slot(kept.layer), kept.phase, kept.ids, kept.weights)
        for p in passes.values():
            p.add(kept)
        records += len(kept)
    return records, excluded


def _reread_passes(
    log: RouteLog,
    on_issue: IssueSink,
    passes: dict[str, RoutePass],
    detector: ContaminationDetector | None,
) -> None:
    """Show the stream again to the passes that ask for it after a read (a ``needs_reread``
    attribute that is True: the EP pass, whose fit needs the number of steps first), with the
    same records left out (``detector``'s suspects; None: none), until none asks."""
    again = [p for p in passes.values() if getattr(p, "needs_reread", False)]
    while again:
        suspects = None if detector is None else SuspectFilter(detector)
        for chunk in log.chunks(on_issue):
            if suspects is not None:
                drop = suspects.mask(
                    log.groups(chunk),
                    chunk.token_idx,
                    chunk.layer,
                    chunk.ids,
                    chunk.weights,
                    chunk.line,
                )
                chunk = chunk.take(~drop)
            for p in again:
                p.add(chunk)
        again = [p for p in again if getattr(p, "needs_reread", False)]


def _layer_analyses(
    layers: list[int],
    shown: set[int],
    sums: LayerPhaseAccumulators,
    experts: int,
    top: int,
    warnings: list[str],
) -> list[LayerAnalysis]:
    """One :class:`LayerAnalysis` per logged layer in ``shown``, each phase's expert axis
    ``experts`` long."""
    out = []
    for slot, layer in enumerate(layers):
        if layer not in shown:
            continue
        parts = {p: acc.resized(experts) for p, acc in sums.by_phase(slot).items()}
        out.append(_layer_analysis(layer, parts, experts, top))
        if out[-1].stats.tokens == 0:
            warnings.append(f"layer {layer} is in layers_logged but has no routes")
    return out


def _layer_analysis(
    layer: int, parts: dict[int, RoutingAccumulator], experts: int, top: int
) -> LayerAnalysis:
    """One layer from its accumulators by phase code: the whole stream, each phase when the
    log records phases, and how far prefill and decode routing differ."""
    total = RoutingAccumulator(experts)
    for acc in parts.values():
        total.merge(acc)
    by_phase = {}
    if any(p != NO_PHASE for p in parts):
        by_phase = {PHASE_NAMES[p]: summarize(acc, top) for p, acc in sorted(parts.items())}
    phase_jsd = None
    prefill, decode = parts.get(PREFILL), parts.get(DECODE)
    if prefill is not None and decode is not None and prefill.tokens and decode.tokens:
        phase_jsd = jensen_shannon(prefill.counts, decode.counts)
    return LayerAnalysis(layer, summarize(total, top), by_phase, phase_jsd, total.coselection())
