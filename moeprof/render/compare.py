"""What ``compare`` shows on the terminal: the two logs (and how their metas differ), the
headline agreement, the requests that diverge and where, and a row per layer."""

from __future__ import annotations

import math

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moeprof.analysis.compare import ComparisonReport, LogSide
from moeprof.render.numbers import pct

MAX_LAYER_ROWS = 24
"""Beyond this many layers the table shows the least agreeing ones."""
META_FIELDS = ("model_id", "vllm_version", "torch_version", "device", "dtype", "top_k")


def print_comparison(r: ComparisonReport, console: Console) -> None:
    for name, side in (("A", r.a), ("B", r.b)):
        console.print(f"{name}: {_side(side)}", highlight=False, soft_wrap=True)
    differ = [f for f in META_FIELDS if getattr(r.a, f) != getattr(r.b, f)]
    if differ:
        console.print(
            "   differ in: " + ", ".join(f"{f} ({_val(r.a, f)} vs {_val(r.b, f)})" for f in differ),
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"joined on (req_id, token_idx, layer): {r.joined:,} routes; only in A {r.only_a:,}, "
        f"only in B {r.only_b:,}",
        highlight=False,
        soft_wrap=True,
    )
    if r.joined:
        console.print(
            f"identical top-k sets {_pct(r.same_set_share)} ({r.same_set:,}), same top-1 "
            f"{_pct(r.same_top1_share)} ({r.same_top1:,}); {_weights(r)}",
            highlight=False,
            soft_wrap=True,
        )
    _print_requests(r, console)
    if len(r.layers) > 1:
        console.print(_layer_table(r))
    if r.identical and r.joined:
        console.print("every route agrees: same keys, same top-k sets", highlight=False)


def _side(s: LogSide) -> str:
    dtype = f", {s.dtype}" if s.dtype else ""
    dups = f", {s.duplicates:,} repeated keys (not joined)" if s.duplicates else ""
    return escape(
        f"{s.path} ({s.model_id}, vLLM {s.vllm_version}, torch {s.torch_version}, "
        f"{s.device}{dtype}, top-{s.top_k}): {s.routes:,} routes, {s.requests:,} requests{dups}"
    )


def _weights(r: ComparisonReport) -> str:
    if not r.weight_routes:
        return "no route with the same set, so no weights compared"
    return (
        f"where the sets agree, mean |weight difference| {_sci(r.weight_mean_abs_diff)} per "
        f"expert (max {_sci(r.weight_max_abs_diff)})"
    )


def _print_requests(r: ComparisonReport, console: Console) -> None:
    only = []
    if r.requests_only_a:
        only.append(f"{r.requests_only_a:,} only in A")
    if r.requests_only_b:
        only.append(f"{r.requests_only_b:,} only in B")
    extra = f" ({', '.join(only)})" if only else ""
    console.print(
        f"requests: {r.requests_both:,} in both{extra}; {r.diverged_requests:,} diverge (a "
        "top-k set differs somewhere)",
        highlight=False,
        soft_wrap=True,
    )
    for d in r.first_divergences:
        console.print(
            f"  req {escape(d.req_id)}: first at token {d.token_idx:,} (layer {d.layer})",
            highlight=False,
            soft_wrap=True,
        )
    rest = r.diverged_requests - len(r.first_divergences)
    if rest > 0:
        console.print(f"  ... and {rest:,} more (--show N lists more)", highlight=False)


def _layer_table(r: ComparisonReport) -> Table:
    rows = r.layers
    title = "per layer"
    if len(rows) > MAX_LAYER_ROWS:
        rows = sorted(rows, key=lambda la: (_key(la.same_set_share), la.layer))[:MAX_LAYER_ROWS]
        rows.sort(key=lambda la: la.layer)
        title = f"the {MAX_LAYER_ROWS} least agreeing of {len(r.layers)} layers (--json: all)"
    table = Table(title=title, title_justify="left")
    for name in ("layer", "joined", "same set", "same top-1", "mean |dw|", "only A", "only B"):
        table.add_column(name, justify="right")
    for la in rows:
        table.add_row(
            str(la.layer),
            f"{la.joined:,}",
            _pct(la.same_set_share),
            _pct(la.same_top1_share),
            _sci(la.weight_mean_abs_diff),
            f"{la.only_a:,}",
            f"{la.only_b:,}",
        )
    return table


def _key(x: float) -> float:
    return 2.0 if math.isnan(x) else x


def _pct(x: float) -> str:
    """A share with two decimals that never rounds to 100% (or 0%) unless it is exactly that:
    one differing route in a million must not read as full agreement."""
    if math.isnan(x):
        return "-"
    if x in (0.0, 1.0):
        return pct(x).replace(".0", "")
    text = f"{100 * x:.2f}%"
    if text == "100.00%":
        return ">99.99%"
    return "<0.01%" if text == "0.00%" else text


def _sci(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2e}"


def _val(side: LogSide, name: str) -> str:
    value = getattr(side, name)
    return "-" if value is None else escape(str(value))
