"""``moeprof analyze``: one pass per log into per-layer (and per-phase) statistics, the JSON
form, a terminal table and the short markdown note.

Why contamination is checked on every run: a log polluted by warm-up/dummy batches produces
confident, wrong numbers ("top-3 experts carry 51% of the load"). The detector costs little,
so every analysis says how many records look suspect, and ``exclude_suspect`` re-reads the log
without them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from moeprof.analysis.reader import NO_PHASE, PHASES, Issue, LogError, RouteChunk, open_log
from moeprof.analysis.stats import (
    Contamination,
    ContaminationDetector,
    ExpertStats,
    RoutingAccumulator,
    SuspectFilter,
    jensen_shannon,
    summarize,
)
from moeprof.errors import UserError

PHASE_NAMES = {NO_PHASE: "unknown", **dict(enumerate(PHASES))}


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


# --------------------------------------------------------------------------- analysis


def analyze_logs(
    paths: list[str | Path],
    *,
    num_experts: int | None = None,
    top: int = 3,
    exclude_suspect: bool = False,
    min_run: int = 64,
) -> AnalysisReport:
    """Analyse each log, then compare logs layer by layer (JSD of their distributions)."""
    logs = [
        analyze_log(
            p, num_experts=num_experts, top=top, exclude_suspect=exclude_suspect, min_run=min_run
        )
        for p in paths
    ]
    comparisons = []
    for a, b in itertools.combinations(logs, 2):
        b_layers = {la.layer: la for la in b.layers}
        for la in a.layers:
            lb = b_layers.get(la.layer)
            if lb is not None and la.stats.tokens and lb.stats.tokens:
                jsd = jensen_shannon(np.array(la.stats.counts), np.array(lb.stats.counts))
                comparisons.append(Comparison(la.layer, a.path, b.path, jsd))
    return AnalysisReport(logs, comparisons, exclude_suspect)


def analyze_log(
    path: str | Path,
    *,
    num_experts: int | None = None,
    top: int = 3,
    exclude_suspect: bool = False,
    min_run: int = 64,
) -> LogAnalysis:
    """Statistics of one log. Raises :class:`LogError` on the first invalid line: numbers from a
    log that does not validate are not worth printing."""
    log = open_log(path)
    meta = log.meta
    assert meta is not None
    warnings: list[str] = []
    if meta.num_experts is not None:
        experts: int | None = meta.num_experts
        source = "meta"
        if num_experts is not None and num_experts != meta.num_experts:
            warnings.append(
                f"--num-experts {num_experts} ignored: the meta declares num_experts="
                f"{meta.num_experts}"
            )
    elif num_experts is not None:
        log = log.with_num_experts(num_experts)
        experts, source = num_experts, "--num-experts"
    else:
        experts, source = None, "inferred"

    def strict(issue: Issue) -> None:
        if issue.severity == "error":
            raise LogError(f"{issue.format(log.path)} (run `moeprof validate {log.path}`)")
        warnings.append(issue.format(log.path))

    accs: dict[tuple[int, int], RoutingAccumulator] = {}

    def accumulate(chunk: RouteChunk) -> None:
        """Fold a chunk into one accumulator per (layer, phase): one stable sort by that key,
        then contiguous slices, instead of a boolean mask per key."""
        key = log.layer_slot(chunk.layer) * 3 + (chunk.phase.astype(np.int64) + 1)
        sizes = np.bincount(key)
        present = np.flatnonzero(sizes)
        if present.size == 1:
            ids, weights = chunk.ids, chunk.weights
        else:
            order = np.argsort(key, kind="stable")  # np.take: 6x faster than [order]
            ids, weights = np.take(chunk.ids, order, axis=0), np.take(chunk.weights, order, axis=0)
        start = 0
        for u in present.tolist():
            stop = start + int(sizes[u])
            acc = accs.get((u // 3, u % 3 - 1))
            if acc is None:
                acc = accs[(u // 3, u % 3 - 1)] = RoutingAccumulator(experts)
            acc.add(ids[start:stop], weights[start:stop])
            start = stop

    detector = ContaminationDetector(min_run)
    records = excluded = 0
    try:
        for chunk in log.chunks(strict):
            detector.add(
                log.groups(chunk),
                chunk.token_idx,
                chunk.layer,
                chunk.ids,
                chunk.weights,
                chunk.line,
            )
            if not exclude_suspect:
                accumulate(chunk)
                records += len(chunk)
        contamination = detector.finish()
        if exclude_suspect:
            suspects = SuspectFilter(detector)
            for chunk in log.chunks(lambda i: strict(i) if i.severity == "error" else None):
                drop = suspects.mask(log.groups(chunk), chunk.token_idx, chunk.layer, chunk.line)
                excluded += int(drop.sum())
                kept = chunk.take(~drop)
                accumulate(kept)
                records += len(kept)
    except ValueError as e:  # implausible expert ids without num_experts
        raise LogError(f"{log.path}: {e}") from e

    if experts is None:
        experts = max((a.counts.size for a in accs.values()), default=0)
        warnings.append(
            f"num_experts not in the meta: using max expert id + 1 = {experts} "
            "(pass --num-experts if some experts were never selected)"
        )
    if contamination.suspicious and not exclude_suspect:
        warnings.append(_contamination_sentence(contamination) + " Rerun with --exclude-suspect.")

    layers = []
    for slot, layer in enumerate(meta.layers_logged):
        parts = {p: a.resized(experts) for (s, p), a in accs.items() if s == slot}
        total = RoutingAccumulator(experts)
        for acc in parts.values():
            total.merge(acc)
        if total.tokens == 0:
            warnings.append(f"layer {layer} is in layers_logged but has no routes")
        by_phase = {}
        if any(p != NO_PHASE for p in parts):
            by_phase = {PHASE_NAMES[p]: summarize(a, top) for p, a in sorted(parts.items())}
        phase_jsd = None
        if 0 in parts and 1 in parts and parts[0].tokens and parts[1].tokens:
            phase_jsd = jensen_shannon(parts[0].counts, parts[1].counts)
        layers.append(
            LayerAnalysis(layer, summarize(total, top), by_phase, phase_jsd, total.coselection())
        )
    return LogAnalysis(
        path=str(log.path),
        model_id=meta.model_id,
        meta=meta.model_dump(mode="json"),
        num_experts=experts,
        num_experts_source=source,
        top_k=meta.top_k,
        records=records,
        excluded=excluded,
        contamination=contamination,
        layers=layers,
        warnings=warnings,
    )


def _contamination_sentence(c: Contamination) -> str:
    parts = []
    if c.duplicate_records:
        parts.append(f"{c.duplicate_records:,} repeat an earlier (req_id, token_idx, layer)")
    if c.identical_runs:
        longest = c.longest_run
        where = f", longest {longest.length:,} at lines {longest.first_line}-{longest.last_line}"
        parts.append(
            f"{c.identical_run_records:,} sit in {c.identical_runs} run(s) of >= {c.min_run} "
            f"identical routes{where if longest else ''}"
        )
    return (
        f"{c.suspect_records:,} of {c.records:,} records ({c.suspect_share:.1%}) look like "
        f"warm-up/dummy batches or double logging: {'; '.join(parts)}."
    )


# --------------------------------------------------------------------------- markdown note


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def interpretation(s: ExpertStats) -> str:
    """One sentence a reader can act on, from entropy ratio and hottest-expert load."""
    if s.tokens == 0:
        return "No routes were logged for this layer, so there is nothing to interpret."
    e = s.num_experts
    top_share = sum(t.share for t in s.top)
    uniform = len(s.top) / e if e else 0.0
    noisy = " (few tokens, so shares are noisy)" if s.tokens < 20 * e else ""
    if s.entropy_ratio >= 0.97 and s.max_over_mean < 1.5:
        return (
            f"Routing is close to balanced{noisy}: no expert gets more than "
            f"{s.max_over_mean:.2f}x its uniform share."
        )
    unused = f", and {len(s.never_used)} experts are never used" if s.never_used else ""
    strength = "mildly" if s.entropy_ratio >= 0.9 else "strongly"
    return (
        f"Routing is {strength} skewed{noisy}: the top {len(s.top)} experts take "
        f"{_pct(top_share)} of selections against {_pct(uniform)} under uniform routing{unused}."
    )


def markdown_note(report: AnalysisReport) -> str:
    """The 5-8 line note: a heading, then top-3 experts, normalized distribution, entropy, one
    interpretation sentence, and (when they apply) a caution about contamination and one line
    on the other layers/logs."""
    rows = report.rows()
    if not rows:
        raise UserError("nothing to report: no logs")
    log, la = rows[0]
    s = la.stats
    name = Path(log.path).name
    vllm = log.meta.get("vllm_version", "?")
    lines = [
        f"## MoE routing: {log.model_id}, layer {la.layer}",
        f"- Log `{name}`: {s.tokens:,} tokens routed, top-{log.top_k} of {s.num_experts} experts "
        f"(vLLM {vllm}, {log.meta.get('device', '?')})"
        + (f"; {log.excluded:,} suspect records excluded." if report.exclude_suspect else "."),
        "- Top-3 experts: "
        + ", ".join(f"{t.expert} ({_pct(t.share)})" for t in s.top[:3])
        + f" of selections; a uniform router gives each {_pct(1 / s.num_experts)}."
        if s.num_experts
        else "- Top-3 experts: none (no routes).",
        "- Normalized distribution (% of selections, experts 0.."
        f"{s.num_experts - 1}): " + ", ".join(f"{100 * p:.1f}" for p in s.distribution) + ".",
        f"- Entropy {s.entropy_bits:.2f} of a possible {s.max_entropy_bits:.2f} bits "
        f"({_pct(s.entropy_ratio)}); max/mean load {s.max_over_mean:.2f}, Gini {s.gini:.2f}, "
        f"{len(s.never_used)} experts never used.",
        f"- {interpretation(s)}",
    ]
    if log.contamination.suspicious and not report.exclude_suspect:
        lines.append(f"- Caution: {_contamination_sentence(log.contamination)}")
    others = []
    for olog, ola in rows[1:]:
        label = f"layer {ola.layer}" if olog is log else f"`{Path(olog.path).name}` L{ola.layer}"
        others.append(f"{label} entropy {_pct(ola.stats.entropy_ratio)}")
    jsds = [f"JSD {c.jsd:.3f} bits vs `{Path(c.b).name}`" for c in report.comparisons[:2]]
    if others or jsds:
        lines.append("- Also: " + "; ".join(others + jsds) + ".")
    return "\n".join(lines) + "\n"


def write_new(path: Path, data: str | bytes, *, force: bool) -> None:
    """Write a file the user asked for, never clobbering an existing one without ``force``."""
    if path.exists() and not force:
        raise UserError(f"{path}: already exists (use --force to overwrite)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror or e}") from e


# --------------------------------------------------------------------------- terminal


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, fmt)


def print_report(report: AnalysisReport, console: Console) -> None:
    """The terminal form: one row per layer (and per phase), then contamination and JSD."""
    several = len(report.logs) > 1
    table = Table(title="expert routing (shares are of all top-k selections)", title_justify="left")
    if several:
        table.add_column("log", no_wrap=True)
    table.add_column("layer", justify="right")
    table.add_column("phase")
    table.add_column("tokens", justify="right")
    table.add_column("top experts", no_wrap=True)
    table.add_column("entropy bits", justify="right", no_wrap=True)
    for col in ("CV", "max/mean", "Gini", "unused", "w top-1", "w sum"):
        table.add_column(col, justify="right")
    for log, la in report.rows():
        variants = [("all", la.stats), *la.by_phase.items()]
        for phase, s in variants:
            top = ", ".join(f"{t.expert} {_pct(t.share)}" for t in s.top)
            cells = [
                str(la.layer),
                phase,
                f"{s.tokens:,}",
                top or "-",
                f"{_f(s.entropy_bits)} ({_f(s.entropy_ratio, '.0%')})",
                _f(s.cv),
                _f(s.max_over_mean),
                _f(s.gini),
                str(len(s.never_used)),
                _f(s.weights.mean_top1, ".3f"),
                _f(s.weights.mean_sum, ".3f"),
            ]
            table.add_row(*([Path(log.path).name] if several else []), *cells)
    if console.is_terminal:
        console.print(table)
    else:  # a pipe gets rich's default 80 columns, too narrow for this table
        Console(file=console.file, width=max(console.width, 150), color_system=None).print(table)
    for log in report.logs:
        name = Path(log.path).name
        console.print(
            f"[bold]{name}[/]: {log.model_id}, {log.records:,} routes, E={log.num_experts} "
            f"({log.num_experts_source}), top-{log.top_k}"
            + (f", {log.excluded:,} suspect records excluded" if report.exclude_suspect else ""),
            highlight=False,
            soft_wrap=True,
        )
        c = log.contamination
        if c.suspicious:
            console.print(
                f"  [yellow]suspect:[/] {_contamination_sentence(c)}",
                highlight=False,
                soft_wrap=True,
            )
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
                    f"{p.experts[0]}+{p.experts[1]} ({_pct(p.share)}, lift {_f(p.lift)})"
                    for p in pairs[:3]
                )
                console.print(
                    f"  layer {la.layer}: most co-selected pairs {shown}",
                    highlight=False,
                    soft_wrap=True,
                )
    for c in report.comparisons:
        console.print(
            f"layer {c.layer}: JSD {c.jsd:.4f} bits between {Path(c.a).name} and {Path(c.b).name}",
            highlight=False,
        )
