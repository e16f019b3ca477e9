"""Terminal section of ``analyze --outputs``: which tokens each expert handles.

One line on the join (routes joined to their token, those that could not be, and what decoded
the texts), a table of vocabulary specialisation per layer against its value with no token
dependence, then one layer's experts with their top tokens by count and by lift (the layer
itself for a one-layer log, else the most token-specialised one; ``--json`` has every layer).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moeprof.analysis.tokens import LayerTokens, TokenAnalysis, TokenScore, unjoined_text
from moeprof.render.analyze import _print_wide
from moeprof.render.extras import note, section
from moeprof.render.numbers import num, pct


def token_text(t: TokenScore) -> str:
    """The token as a quoted string (escapes shown: ``" the"``, ``"\\n"``), or ``#id``."""
    if t.text is None or "\ufffd" in t.text:  # no tokenizer, or a byte of a longer character
        return f"#{t.token_id}"
    return json.dumps(t.text, ensure_ascii=False)


def join_line(r: TokenAnalysis) -> str:
    """How many routes have their token, which did not and why, and what decoded the texts."""
    unjoined = r.unjoined.total
    not_joined = f" ({unjoined:,} not: {unjoined_text(r.unjoined)})" if unjoined else ""
    texts = (
        f"texts decoded by {r.tokenizer}"
        if r.tokenizer
        else f"token ids shown, not texts: {r.tokenizer_note}"
    )
    return (
        f"tokens: {r.joined:,} of {r.routes:,} routes joined to their token in "
        f"{Path(r.outputs).name}{not_joined}; {texts}"
    )


def most_specialised(r: TokenAnalysis) -> LayerTokens | None:
    """The layer whose top-1 specialisation most exceeds its no-dependence value (ties: the
    lower layer); None when no layer has a token seen often enough."""
    scored = [
        (la.top1 - la.top1_null, -la.layer, la)
        for la in r.layers
        if not math.isnan(la.top1) and not math.isnan(la.top1_null)
    ]
    return max(scored, key=lambda x: (x[0], x[1]))[2] if scored else None


@section("tokens")
def print_tokens(r: TokenAnalysis, console: Console) -> None:
    console.print(escape(join_line(r)), highlight=False, soft_wrap=True)
    table = Table(
        title=(
            "vocabulary specialisation (OLMoE): share of a token's occurrences routed to its "
            f"most frequent expert, mean over tokens seen >= {r.min_count} times"
        ),
        title_justify="left",
    )
    for col in ("layer", "tokens", "distinct", f">= {r.min_count}x"):
        table.add_column(col, justify="right")
    for col in ("top-1", "no token dep.", f"top-{r.top_k}", "no token dep."):
        table.add_column(col, justify="right")
    for la in r.layers:
        table.add_row(
            str(la.layer),
            f"{la.routes:,}",
            f"{la.distinct_tokens:,}",
            f"{la.counted_tokens:,}",
            num(la.top1, ".1%"),
            num(la.top1_null, ".1%"),
            num(la.topk, ".1%"),
            num(la.topk_null, ".1%"),
        )
    _print_wide(console, table)
    console.print(
        "  no token dep. = the same mean with routes drawn at random from the layer's own "
        "routes (its load, no dependence on the token)",
        style="dim",
        highlight=False,
        soft_wrap=True,
    )
    la = r.layers[0] if len(r.layers) == 1 else most_specialised(r)
    if la is None or not la.experts:
        return
    _print_wide(console, expert_table(r, la))
    if len(r.layers) > 1:
        console.print(
            f"  layer {la.layer} is the most token-specialised; every layer's lists: --json",
            style="dim",
            highlight=False,
        )


def expert_table(r: TokenAnalysis, la: LayerTokens) -> Table:
    """One row per expert of ``la``: its share of selections, top tokens by count, and by lift
    (observed / expected if tokens and experts were independent) among pairs seen at least
    ``min_count`` times."""
    table = Table(
        title=(
            f"layer {la.layer}: each expert's top tokens by count, and by lift among pairs "
            f"seen >= {r.min_count} times"
        ),
        title_justify="left",
    )
    table.add_column("expert", justify="right")
    table.add_column("share", justify="right")
    table.add_column("top tokens (selections)")
    table.add_column("top tokens by lift (lift x, selections)")
    for ex in la.experts:
        table.add_row(
            str(ex.expert),
            pct(ex.share),
            escape(", ".join(f"{token_text(t)} {t.count:,}" for t in ex.by_count)) or "-",
            escape(
                ", ".join(
                    f"{token_text(t)} {num(t.lift, '.1f')}x ({t.count:,})" for t in ex.by_lift
                )
            )
            or "-",
        )
    return table


NOTE_EXPERTS = 3
"""Experts the markdown note names, with their most specific tokens."""


@note("tokens")
def tokens_note(r: TokenAnalysis) -> list[str]:
    """Two lines: the join and the specialisation against no token dependence (one layer, or
    the range over layers), then the most specific tokens of the experts with the highest
    lifts at the most token-specialised layer."""
    unjoined = f" ({r.unjoined.total:,} could not be)" if r.unjoined.total else ""
    head = (
        f"- Tokens (`{Path(r.outputs).name}`): {r.joined:,} of {r.routes:,} routes joined to "
        f"their token{unjoined}; vocabulary specialisation (OLMoE: share of a token's "
        f"occurrences at its most frequent expert, tokens seen >= {r.min_count} times) "
    )
    scored = [la for la in r.layers if not math.isnan(la.top1)]
    if not scored:
        return [head + "not computed: no token was seen that often."]
    if len(r.layers) == 1:
        la = scored[0]
        spec = (
            f"{pct(la.top1)} for the top-1 expert against {pct(la.top1_null)} with no token "
            f"dependence (top-{r.top_k}: {pct(la.topk)} vs {pct(la.topk_null)})."
        )
    else:
        lo = min(scored, key=lambda la: (la.top1, la.layer))
        hi = max(scored, key=lambda la: (la.top1, -la.layer))
        nulls = [la.top1_null for la in scored]
        spec = (
            f"for the top-1 expert from {pct(lo.top1)} (layer {lo.layer}) to {pct(hi.top1)} "
            f"(layer {hi.layer}), against {pct(min(nulls))}-{pct(max(nulls))} with no token "
            "dependence."
        )
    lines = [head + spec]
    la = scored[0] if len(r.layers) == 1 else most_specialised(r)
    if la is not None:
        ranked = sorted(
            (ex for ex in la.experts if ex.by_lift),
            key=lambda ex: (-ex.by_lift[0].lift, ex.expert),
        )[:NOTE_EXPERTS]
        if ranked:
            parts = "; ".join(
                f"expert {ex.expert}: "
                + ", ".join(f"`{token_text(t)}` {num(t.lift, '.1f')}x" for t in ex.by_lift[:3])
                for ex in ranked
            )
            ids = "" if r.tokenizer else " (token ids: no tokenizer on this machine)"
            lines.append(f"- Most specific tokens at layer {la.layer} (lift){ids}: {parts}.")
    return lines
