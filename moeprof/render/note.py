"""``analyze --markdown``: the short markdown note on a log's routing, for a report or a PR."""

from __future__ import annotations

from pathlib import Path

from moeprof.analysis.analyze import AnalysisReport, LayerAnalysis, LogAnalysis
from moeprof.analysis.summary import ExpertStats
from moeprof.errors import UserError
from moeprof.render.numbers import pct


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
    lines = [
        f"## MoE routing: {log.model_id}, layer {la.layer}",
        _source_line(log, la.stats, report.exclude_suspect),
        *_stats_lines(la.stats),
    ]
    if log.contamination.suspicious and not report.exclude_suspect:
        lines.append(f"- Caution: {log.contamination.describe()}")
    also = _also_line(report, log, rows[1:])
    if also:
        lines.append(also)
    return "\n".join(lines) + "\n"


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
    """Entropy of the other (log, layer) rows and the first two comparisons, if any."""
    parts = []
    for olog, ola in others:
        label = f"layer {ola.layer}" if olog is first else f"`{Path(olog.path).name}` L{ola.layer}"
        parts.append(f"{label} entropy {pct(ola.stats.entropy_ratio)}")
    parts += [f"JSD {c.jsd:.3f} bits vs `{Path(c.b).name}`" for c in report.comparisons[:2]]
    return "- Also: " + "; ".join(parts) + "." if parts else None
