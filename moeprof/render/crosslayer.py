"""Terminal section of ``analyze --cross-layer``: one row per pair of neighbouring logged
layers (mutual information against its chance baseline, and the strongest transitions)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from moeprof.analysis.crosslayer import CrossLayerResult, LayerPair
from moeprof.render.analyze import _print_wide
from moeprof.render.extras import note, section
from moeprof.render.numbers import num, pct

TRANSITIONS_SHOWN = 3
"""Transitions per row of the table (``--json`` has ``--top`` of them)."""


def pair_label(p: LayerPair) -> str:
    """``3 -> 4``; ``3 -> 7 (gap)`` when layers between were not logged."""
    return f"{p.layer} -> {p.next_layer}" + ("" if p.adjacent else " (gap)")


def transitions_text(p: LayerPair, shown: int = TRANSITIONS_SHOWN) -> str:
    """``12->40 lift 5.1 (830 tok, 38%)``, the strongest first; '-' when none is frequent
    enough to list."""
    return (
        ", ".join(
            f"{t.expert}->{t.next_expert} lift {num(t.lift, '.1f')} ({t.tokens:,} tok, "
            f"{pct(t.conditional)})"
            for t in p.top[:shown]
        )
        or "-"
    )


@section("cross_layer")
def print_cross_layer(result: CrossLayerResult, console: Console) -> None:
    table = Table(
        title="cross-layer routing: expert at layer l vs expert at the next logged layer",
        title_justify="left",
    )
    for col in ("layers", "tokens", "MI bits", "chance", "MI/min(H)"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column(
        f"top transitions by lift (a->b, tokens, P(b|a); >= {result.min_tokens} tokens)"
    )
    for p in result.pairs:
        table.add_row(
            pair_label(p),
            f"{p.tokens:,}",
            num(p.mi_bits, ".3f"),
            num(p.baseline_bits, ".2g"),
            num(p.normalized_mi, ".1%"),
            transitions_text(p),
        )
    _print_wide(console, table)
    console.print(
        "  MI over the k x k (expert at l, expert at l') pairs of each token; chance = what "
        "independent layers with the same loads show for this many tokens; lift = "
        "P(a,b) / (P(a) P(b)).",
        style="dim",
        highlight=False,
        soft_wrap=True,
    )
    if result.unpaired_routes:
        console.print(
            f"  [yellow]{result.unpaired_routes:,} of {result.routes:,} routes had no route of "
            "the same token at a neighbouring logged layer[/] (left out of that pair)",
            highlight=False,
            soft_wrap=True,
        )


def _span(values: list[float], fmt: str) -> str:
    """'0.082' or '0.082-0.087' over layers (NaNs left out; '-' when none)."""
    v = [x for x in values if x == x]
    if not v:
        return "-"
    lo, hi = format(min(v), fmt), format(max(v), fmt)
    return lo if lo == hi else f"{lo}-{hi}"


@note("cross_layer")
def cross_layer_note(result: CrossLayerResult) -> list[str]:
    """Two lines: MI range against chance, and the strongest transition."""
    pairs = [p for p in result.pairs if p.tokens]
    if not pairs:
        return ["- Cross-layer routing: no token was routed at two neighbouring logged layers."]
    strongest = max(pairs, key=lambda p: (p.mi_bits - p.baseline_bits, -p.layer))
    lines = [
        f"- Cross-layer routing: the expert chosen at one logged layer carries "
        f"{_span([p.mi_bits for p in pairs], '.3f')} bits about the next layer's "
        f"(mutual information over each token's k x k expert pairs; independent layers would "
        f"show {_span([p.baseline_bits for p in pairs], '.3f')} for this many tokens), "
        f"{_span([100 * p.normalized_mi for p in pairs], '.1f')}% of the smaller entropy; "
        f"most at layers {pair_label(strongest)} ({strongest.mi_bits:.3f} bits)."
    ]
    tops = [(t, p) for p in pairs for t in p.top]
    if tops:
        t, p = max(tops, key=lambda tp: (tp[0].lift, tp[0].tokens))
        lines.append(
            f"- Strongest transition: expert {t.expert} at layer {p.layer} -> expert "
            f"{t.next_expert} at layer {p.next_layer}, {t.lift:.1f}x as often as independent "
            f"layers would ({t.tokens:,} tokens, {pct(t.conditional)} of those at expert "
            f"{t.expert})."
        )
    if result.unpaired_routes:
        lines.append(
            f"- {result.unpaired_routes:,} of {result.routes:,} routes had no route of their "
            "token at a neighbouring logged layer and are left out."
        )
    return lines
