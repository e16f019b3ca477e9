"""``analyze --ep``: per-step load balance under expert parallelism, on the terminal and in
the markdown note (:mod:`moeprof.analysis.ep`)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from moeprof.analysis.ep import EpAnalysis, EpLayer, EpRanks
from moeprof.render.extras import note, section
from moeprof.render.numbers import num

MAX_LAYER_ROWS = 4
"""Logs of more layers get, per rank count, the mean over layers and the worst layers."""
WORST = 2
"""How many of the least balanced layers (contiguous placement) each rank count lists."""


def split_line(r: EpAnalysis) -> str:
    """Which steps the EPLB fit used and which steps every figure is over."""
    held = f"every figure over the last {r.eval_steps:,} (from step {r.eval_from_step:,})"
    if r.eplb_source is None:
        return (
            f"{r.steps:,} engine steps; {held}: where EPLB, fitted on the first "
            f"{r.fit_steps:,}, would be compared"
        )
    return (
        f"{r.steps:,} engine steps; {r.eplb_source} ({r.redundant_experts} redundant experts) "
        f"fitted on the first {r.fit_steps:,}, {held}"
    )


@section("ep")
def print_ep(r: EpAnalysis, console: Console) -> None:
    console.print(
        "expert parallelism: balancedness of a step = mean / max rank load (1 = even, "
        "1/R = one rank does all)",
        highlight=False,
        soft_wrap=True,
    )
    console.print("  " + split_line(r), highlight=False, soft_wrap=True)
    table = Table(title_justify="left", box=None, pad_edge=False)
    for name in ("ranks", "layer", "contiguous mean", "p5", "EPLB mean", "p5 ", "gain"):
        table.add_column(name, justify="left" if name == "layer" else "right")
    several = len(r.by_ranks[0].layers) > MAX_LAYER_ROWS if r.by_ranks else False
    for br in r.by_ranks:
        if several:
            table.add_row(
                str(br.ranks),
                f"all {len(br.layers)} (mean)",
                num(br.contiguous_mean),
                "",
                num(br.eplb_mean),
                "",
                _gain(br.gain),
            )
            routed = [la for la in br.layers if la.steps]
            for la in sorted(routed, key=lambda la: (la.contiguous_mean, la.layer))[:WORST]:
                table.add_row("", *_layer_cells(la, " (least even)"))
        else:
            for i, la in enumerate(br.layers):
                table.add_row(str(br.ranks) if i == 0 else "", *_layer_cells(la))
    console.print(table)
    if r.eplb_skipped:
        console.print(f"  EPLB not run: {r.eplb_skipped}", highlight=False, soft_wrap=True)
    else:
        for why, ranks in _skipped_ranks(r).items():
            console.print(
                f"  no EPLB figures for {ranks} ranks: {why}", highlight=False, soft_wrap=True
            )
    for n in r.notes:
        console.print(f"  note: {n}", highlight=False, soft_wrap=True)


def _skipped_ranks(r: EpAnalysis) -> dict[str, str]:
    """Reason -> the rank counts it applies to ('8 and 16')."""
    out: dict[str, list[str]] = {}
    for br in r.by_ranks:
        if br.eplb_skipped:
            out.setdefault(br.eplb_skipped, []).append(str(br.ranks))
    return {
        why: " and ".join([", ".join(rs[:-1]), rs[-1]] if len(rs) > 1 else rs)
        for why, rs in out.items()
    }


def _layer_cells(la: EpLayer, suffix: str = "") -> list[str]:
    gain = None
    if la.eplb_mean is not None:
        gain = la.eplb_mean - la.contiguous_mean
    return [
        f"{la.layer}{suffix}",
        num(la.contiguous_mean),
        num(la.contiguous_p5),
        num(la.eplb_mean),
        num(la.eplb_p5),
        _gain(gain),
    ]


def _gain(g: float | None) -> str:
    return "-" if g is None or g != g else f"{round(g, 2) + 0.0:+.2f}"  # never -0.00


@note("ep")
def ep_note(r: EpAnalysis) -> list[str]:
    """One line: per rank count, mean balancedness contiguous and with EPLB, and the gain."""
    parts = [_ranks_part(br) for br in r.by_ranks]
    why = r.eplb_skipped
    fit = "" if why else f"; EPLB fitted on the first {r.fit_steps:,}"
    tail = f" EPLB not run: {why}." if why else ""
    return [
        "- Expert parallelism (balancedness = mean / max rank load per engine step, mean over "
        f"layers, over the last {r.eval_steps:,} of {r.steps:,} steps{fit}): "
        + "; ".join(parts)
        + "."
        + tail
    ]


def _ranks_part(br: EpRanks) -> str:
    text = f"{br.ranks} ranks: contiguous {num(br.contiguous_mean)}"
    if br.eplb_mean is not None:
        text += f", EPLB {num(br.eplb_mean)} ({_gain(br.gain)})"
    return text
