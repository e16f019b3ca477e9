"""``analyze --markdown``: the short markdown note on a log's routing, for a report or a PR.

A log of one layer gets 5-8 lines on that layer. A log of several layers gets a few lines on
all of them (the range of entropy, the most skewed and the most balanced layers, how many are
skewed) and a table with one row per layer.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from moeprof.analysis.analyze import AnalysisReport, LayerAnalysis, LogAnalysis
from moeprof.analysis.summary import ExpertStats
from moeprof.errors import UserError
from moeprof.layers import format_layers
from moeprof.render.extras import extra_notes
from moeprof.render.numbers import num, pct

BALANCED, MILDLY, STRONGLY = "close to balanced", "mildly skewed", "strongly skewed"
EXTREMES = 3
"""How many of the most skewed and the most balanced layers a multi-layer note names."""


def skew(s: ExpertStats) -> str:
    """:data:`BALANCED`, :data:`MILDLY` or :data:`STRONGLY`, from entropy ratio and
    hottest-expert load (a routed layer)."""
    if s.entropy_ratio >= 0.97 and s.max_over_mean < 1.5:
        return BALANCED
    return MILDLY if s.entropy_ratio >= 0.9 else STRONGLY


def interpretation(s: ExpertStats) -> str:
    """One sentence a reader can act on, from entropy ratio and hottest-expert load."""
    if s.tokens == 0:
        return "No routes were logged for this layer, so there is nothing to interpret."
    e = s.num_experts
    top_share = sum(t.share for t in s.top)
    uniform = len(s.top) / e if e else 0.0
    noisy = " (few tokens, so shares are noisy)" if s.tokens < 20 * e else ""
    if skew(s) == BALANCED:
        return (
            f"Routing is close to balanced{noisy}: no expert gets more than "
            f"{s.max_over_mean:.2f}x its uniform share."
        )
    unused = f", and {len(s.never_used)} experts are never used" if s.never_used else ""
    strength = "mildly" if skew(s) == MILDLY else "strongly"
    return (
        f"Routing is {strength} skewed{noisy}: the top {len(s.top)} experts take "
        f"{pct(top_share)} of selections against {pct(uniform)} under uniform routing{unused}."
    )


def markdown_note(report: AnalysisReport) -> str:
    """The 5-8 line note on the first (log, layer): a heading, then top-3 experts, normalized
    distribution, entropy, one interpretation sentence, and (when they apply) a caution about
    contamination and one line on the other layers/logs."""
    rows = report.rows()
    if not rows:
        raise UserError("nothing to report: no logs")
    log, la = rows[0]
    if len(log.layers) > 1:
        return multi_layer_note(report)
    lines = [
        f"## MoE routing: {log.model_id}, layer {la.layer}",
        _source_line(log, la.stats, report.exclude_suspect),
        *_stats_lines(la.stats),
    ]
    caution = _caution(log, report.exclude_suspect)
    if caution:
        lines.append(caution)
    also = _also_line(report, log, rows[1:])
    if also:
        lines.append(also)
    lines += extra_notes(log)
    return "\n".join(lines) + "\n"


def _caution(log: LogAnalysis, exclude_suspect: bool) -> str | None:
    """The contamination line: each suspect class and what the keys say, when the numbers
    include suspect records or the log's keys do not identify tokens."""
    c = log.contamination
    if (c.suspicious and not exclude_suspect) or c.degenerate:
        return f"- Caution: {c.describe()}"
    return None


def _source_line(log: LogAnalysis, s: ExpertStats, exclude_suspect: bool) -> str:
    vllm = log.meta.get("vllm_version", "?")
    return (
        f"- Log `{Path(log.path).name}`: {s.tokens:,} tokens routed, top-{log.top_k} of "
        f"{s.num_experts} experts (vLLM {vllm}, {log.meta.get('device', '?')})"
        + (f"; {log.excluded:,} suspect records excluded." if exclude_suspect else ".")
    )


def _stats_lines(s: ExpertStats) -> list[str]:
    """Top-3 experts, normalized distribution, entropy and load, interpretation."""
    if s.num_experts:
        top = (
            "- Top-3 experts: "
            + ", ".join(f"{t.expert} ({pct(t.share)})" for t in s.top[:3])
            + f" of selections; a uniform router gives each {pct(1 / s.num_experts)}."
        )
    else:
        top = "- Top-3 experts: none (no routes)."
    return [
        top,
        "- Normalized distribution (% of selections, experts 0.."
        f"{s.num_experts - 1}): " + ", ".join(f"{100 * p:.1f}" for p in s.distribution) + ".",
        f"- Entropy {s.entropy_bits:.2f} of a possible {s.max_entropy_bits:.2f} bits "
        f"({pct(s.entropy_ratio)}); max/mean load {s.max_over_mean:.2f}, Gini {s.gini:.2f}, "
        f"{len(s.never_used)} experts never used.",
        f"- {interpretation(s)}",
    ]


def _also_line(
    report: AnalysisReport, first: LogAnalysis, others: list[tuple[LogAnalysis, LayerAnalysis]]
) -> str | None:
    """Entropy of the other (log, layer) rows and the first two comparisons, if any; a log of
    several layers and its comparisons in one part each."""
    if report.multi_layer:
        return _also_logs(report, first)
    parts = []
    for olog, ola in others:
        label = f"layer {ola.layer}" if olog is first else f"`{Path(olog.path).name}` L{ola.layer}"
        parts.append(f"{label} entropy {pct(ola.stats.entropy_ratio)}")
    parts += [f"JSD {c.jsd:.3f} bits vs `{Path(c.b).name}`" for c in report.comparisons[:2]]
    return "- Also: " + "; ".join(parts) + "." if parts else None


# --------------------------------------------------------------------------- several layers


def multi_layer_note(report: AnalysisReport) -> str:
    """The note on the first log when it has several layers: heading, source, entropy range,
    the most skewed and most balanced layers, how many layers are skewed, caution and other
    logs when they apply, then a table with one row per layer."""
    log = report.logs[0]
    routed = sorted(
        (la for la in log.layers if la.stats.tokens),
        key=lambda la: (la.stats.entropy_ratio, la.layer),
    )
    layers = [la.layer for la in log.layers]
    lines = [
        f"## MoE routing: {log.model_id}, {len(layers)} layers ({format_layers(layers)})",
        _layers_source_line(log, report.exclude_suspect),
    ]
    if routed:
        lines += _layers_lines(log, routed)
    else:
        lines.append("- No routes were logged for these layers, so there is nothing to interpret.")
    caution = _caution(log, report.exclude_suspect)
    if caution:
        lines.append(caution)
    also = _also_logs(report, log)
    if also:
        lines.append(also)
    lines += extra_notes(log)
    return "\n".join([*lines, "", *_layers_table(log)]) + "\n"


def _layers_source_line(log: LogAnalysis, exclude_suspect: bool) -> str:
    tokens = sorted({la.stats.tokens for la in log.layers})
    per = f"{tokens[0]:,}" if len(tokens) == 1 else f"{tokens[0]:,}-{tokens[-1]:,}"
    vllm = log.meta.get("vllm_version", "?")
    return (
        f"- Log `{Path(log.path).name}`: {per} tokens routed per layer, top-{log.top_k} of "
        f"{log.num_experts} experts (vLLM {vllm}, {log.meta.get('device', '?')})"
        + (f"; {log.excluded:,} suspect records excluded." if exclude_suspect else ".")
    )


def _layers_lines(log: LogAnalysis, routed: list[LayerAnalysis]) -> list[str]:
    """Entropy and load ranges, the extremes (when there are more layers than they name), and
    how many layers are skewed how strongly."""
    ratios = [la.stats.entropy_ratio for la in routed]
    loads = [la.stats.max_over_mean for la in routed]
    lines = [
        f"- Entropy {pct(ratios[0])} to {pct(ratios[-1])} of its maximum by layer (median "
        f"{pct(statistics.median(ratios))}); max/mean load {min(loads):.2f} to {max(loads):.2f}; "
        f"a uniform router gives each expert {pct(1 / log.num_experts)} of selections."
    ]
    if len(routed) > 2 * EXTREMES:
        skewed = "; ".join(
            f"layer {la.layer} (entropy {pct(la.stats.entropy_ratio)}, top-3 experts "
            + ", ".join(str(t.expert) for t in la.stats.top[:3])
            + f" take {pct(sum(t.share for t in la.stats.top[:3]))})"
            for la in routed[:EXTREMES]
        )
        balanced = ", ".join(
            f"layer {la.layer} ({pct(la.stats.entropy_ratio)})" for la in routed[::-1][:EXTREMES]
        )
        lines += [f"- Most skewed: {skewed}.", f"- Most balanced: {balanced}."]
    counts = {level: 0 for level in (STRONGLY, MILDLY, BALANCED)}
    for la in routed:
        counts[skew(la.stats)] += 1
    empty = len(log.layers) - len(routed)
    lines.append(
        f"- Of {len(log.layers)} layers, {counts[STRONGLY]} are strongly skewed (entropy below "
        f"90%), {counts[MILDLY]} mildly, {counts[BALANCED]} close to balanced"
        + (f", {empty} without routes" if empty else "")
        + "."
    )
    return lines


def _also_logs(report: AnalysisReport, first: LogAnalysis) -> str | None:
    """One part per other log (its entropy, or range over layers) and per pair of logs with
    the first (JSD, or median and largest over layers)."""
    parts = []
    for log in report.logs:
        if log is first:
            continue
        ratios = [la.stats.entropy_ratio for la in log.layers if la.stats.tokens]
        name = f"`{Path(log.path).name}`"
        if len(log.layers) == 1:
            parts.append(
                f"{name} L{log.layers[0].layer} entropy {pct(log.layers[0].stats.entropy_ratio)}"
            )
        elif ratios:
            parts.append(
                f"{name} entropy {pct(min(ratios))} to {pct(max(ratios))} by layer "
                f"(median {pct(statistics.median(ratios))})"
            )
        cs = [c for c in report.comparisons if c.a == first.path and c.b == log.path]
        if len(cs) == 1:
            parts.append(f"JSD {cs[0].jsd:.3f} bits vs {name} at layer {cs[0].layer}")
        elif cs:
            hi = max(cs, key=lambda c: (c.jsd, -c.layer))
            parts.append(
                f"JSD vs {name} median {statistics.median(c.jsd for c in cs):.3f} bits over "
                f"{len(cs)} layers, largest {hi.jsd:.3f} at layer {hi.layer}"
            )
    return "- Also: " + "; ".join(parts) + "." if parts else None


def _layers_table(log: LogAnalysis) -> list[str]:
    """A markdown table, one row per layer."""
    lines = [
        "| layer | tokens | entropy | max/mean | CV | unused | top-3 experts (% of selections) |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for la in log.layers:
        s = la.stats
        top = ", ".join(f"{t.expert} ({pct(t.share)})" for t in s.top[:3]) or "-"
        lines.append(
            f"| {la.layer} | {s.tokens:,} | {num(s.entropy_ratio, '.1%')} | "
            f"{num(s.max_over_mean)} | {num(s.cv)} | {len(s.never_used)} | {top} |"
        )
    return lines
