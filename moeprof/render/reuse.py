"""Terminal section of ``analyze --reuse``: per layer, how much of a token's expert set its
request's previous token already used, and the hit rate of a per-request LRU expert cache."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from moeprof.analysis.reuse import LayerReuse, ReuseResult
from moeprof.render.analyze import _print_wide
from moeprof.render.extras import note, section
from moeprof.render.numbers import num


def hit_at(la: LayerReuse, capacity: int, which: str = "hit_rate") -> float | None:
    """``la``'s ``which`` curve at ``capacity``, None when that size is not reported."""
    i = la.at(capacity)
    return None if i is None else getattr(la, which)[i]


def _pct(x: float | None) -> str:
    return num(None if x is None else 100 * x, ".1f") + ("%" if x is not None else "")


@section("reuse")
def print_reuse(result: ReuseResult, console: Console) -> None:
    k, e = result.top_k, result.num_experts
    phases = sorted({p.phase for la in result.layers for p in la.by_phase})
    table = Table(
        title=f"expert reuse between consecutive tokens (top-{k} of {e} experts)",
        title_justify="left",
    )
    for col in ("layer", "tokens", "overlap", "chance"):
        table.add_column(col, justify="right", no_wrap=True)
    for ph in phases:
        table.add_column(f"{ph} (chance)", justify="right", no_wrap=True)
    sizes = [c for c in (k, 2 * k, 4 * k) if c <= e]
    for c in sizes:
        table.add_column(f"LRU C={c}", justify="right", no_wrap=True)
    mid = sizes[min(1, len(sizes) - 1)]  # 2k, the size offloading would try first
    table.add_column(f"chance C={mid}", justify="right", no_wrap=True)
    table.add_column(f"warm C={mid}", justify="right", no_wrap=True)
    for la in result.layers:
        by = {p.phase: p for p in la.by_phase}
        cells = [str(la.layer), f"{la.tokens:,}", _pct(la.overlap), _pct(la.chance_overlap)]
        for ph in phases:
            p = by.get(ph)
            cells.append("-" if p is None else f"{_pct(p.overlap)} ({_pct(p.chance)})")
        cells += [_pct(hit_at(la, c)) for c in sizes]
        cells += [_pct(hit_at(la, mid, "chance_hit_rate")), _pct(hit_at(la, mid, "warm_hit_rate"))]
        table.add_row(*cells)
    _print_wide(console, table)
    console.print(
        "  overlap: mean |S_t ∩ S_t-1| / k over consecutive positions of a request (by the "
        "phase of t); chance: independent tokens with the layer's loads. LRU: hit rate of a "
        "per-request cache of C experts, a request's first use of each expert a miss; warm: "
        "those first uses left out. Every C from k to E: --json, or plot --kind reuse.",
        style="dim",
        highlight=False,
        soft_wrap=True,
    )
    breaks = sum(la.breaks for la in result.layers)
    if breaks:
        console.print(
            f"  {breaks:,} tokens follow a gap in their request's positions (no pair formed)",
            highlight=False,
        )
    if result.resumed:
        console.print(
            f"  {result.resumed:,} (request, layer) runs resumed after {result.horizon_lines:,} "
            "lines without a route: counted as new requests (cold cache)",
            highlight=False,
        )


def _span(values: list[float | None]) -> str:
    """'31.0%' or '31.0-32.6%' over layers (undefined values left out; '-' when none)."""
    v = [x for x in values if x is not None and x == x]
    if not v:
        return "-"
    lo, hi = f"{100 * min(v):.1f}", f"{100 * max(v):.1f}"
    return f"{lo}%" if lo == hi else f"{lo}-{hi}%"


@note("reuse")
def reuse_note(result: ReuseResult) -> list[str]:
    """Two lines: overlap of consecutive tokens (by phase) against chance, and the LRU hit
    rates at k, 2k and 4k against chance."""
    layers = [la for la in result.layers if la.tokens]
    if not layers:
        return ["- Expert reuse: no routes."]
    k, e = result.top_k, result.num_experts
    phases = [
        f"{ph} {_span([p.overlap for la in layers for p in la.by_phase if p.phase == ph])}"
        for ph in ("prefill", "decode", "unknown")
        if any(p.phase == ph and p.pairs for la in layers for p in la.by_phase)
    ]
    scope = "by layer" if len(layers) > 1 else f"at layer {layers[0].layer}"
    lines = [
        f"- Expert reuse: consecutive tokens of a request share "
        f"{_span([la.overlap for la in layers])} of their experts {scope}"
        + (f" ({', '.join(phases)})" if len(phases) > 1 else "")
        + f"; tokens drawn independently with the same loads would share "
        f"{_span([la.chance_overlap for la in layers])}."
    ]
    sizes = [c for c in (k, 2 * k, 4 * k) if c <= e]
    hits = "; ".join(
        f"C={c}: {_span([hit_at(la, c) for la in layers])} "
        f"(chance {_span([hit_at(la, c, 'chance_hit_rate') for la in layers])})"
        for c in sizes
    )
    lines.append(
        f"- A per-request LRU cache of C of the {e} experts per layer would hit {hits} of "
        f"expert accesses, a request's first use of each expert counted as a miss."
    )
    return lines
