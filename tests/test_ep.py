"""``analyze --ep``: per-step load balance under expert parallelism. Balancedness (mean / max
rank load) under vLLM's contiguous placement and under vLLM's own EPLB placement, fitted on the
first half of the steps and evaluated on the rest; known answers (one busy block: 1/R; uniform
load: 1.0; EPLB spreads the heavy experts), a slow reference over a whole log, chunking and
out-of-order steps, the logs it cannot read, the terminal table, the note and ``plot --kind
ep``."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from logfactory import meta, route, run_cli, skewed_routes, write_log
from rich.console import Console

from moeprof.analysis import ep, plots
from moeprof.analysis.analyze import analyze_log, analyze_logs
from moeprof.analysis.ep import (
    EpAnalysis,
    EpPass,
    Placement,
    balancedness,
    contiguous_ranks,
    default_rank_counts,
    histogram_quantile,
    rank_loads,
    split_point,
)
from moeprof.analysis.passes import PassOptions, Skipped
from moeprof.analysis.reader import RouteChunk, open_log
from moeprof.render.ep import print_ep
from moeprof.render.note import markdown_note

Token = tuple[int, Sequence[int]]
"""(engine step, expert ids) of one token."""


def write_steps(
    path: Path,
    tokens: Sequence[Token],
    *,
    layers: Sequence[int] = (0,),
    experts: int = 16,
    k: int = 2,
    step: bool = True,
) -> Path:
    """A log of ``tokens`` in the order given, each its own request position, the same ids at
    every layer."""
    body = []
    for i, (s, ids) in enumerate(tokens):
        w = [round(0.9 / (j + 1), 3) for j in range(k)]
        for layer in layers:
            body.append(route(str(i % 7), i, layer, ids, w, step=s if step else None))
    header = meta(layers_logged=list(layers), num_experts=experts, top_k=k)
    return write_log(path, body, header)


def run_ep(path: Path, **options: Any) -> EpAnalysis | Skipped:
    return analyze_log(path, analyses=["ep"], options=PassOptions(**options)).extras["ep"]


def result(path: Path, **options: Any) -> EpAnalysis:
    r = run_ep(path, **options)
    assert isinstance(r, EpAnalysis), r
    return r


@pytest.fixture
def no_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's EPLB cannot be imported."""

    def refuse() -> None:
        raise ImportError("No module named 'vllm'")

    monkeypatch.setattr(ep, "load_eplb", refuse)


# --------------------------------------------------------------------------- statistics


def test_balancedness_by_hand() -> None:
    b = balancedness(np.array([[4, 0, 0, 0], [1, 1, 1, 1], [3, 1, 0, 0], [0, 0, 0, 0]]))
    assert b[:3] == pytest.approx([0.25, 1.0, 1 / 3])  # mean 1, max 3
    assert np.isnan(b[3])  # nothing routed: nothing to balance
    assert balancedness(np.array([3.0, 1.0])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="non-negative"):
        balancedness(np.array([1, -1]))


def test_contiguous_placement_is_vllms_linear_one() -> None:
    assert contiguous_ranks(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # 10 experts on 4 ranks: the first 10 mod 4 = 2 ranks hold one more (determine_expert_map)
    assert contiguous_ranks(10, 4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="num_ranks"):
        contiguous_ranks(4, 8)


def test_default_rank_counts_divide_the_experts() -> None:
    assert default_rank_counts(64) == (2, 4, 8, 16)
    assert default_rank_counts(60) == (2, 4)
    assert default_rank_counts(15) == ()


def test_rank_loads_split_a_replicated_experts_load_evenly() -> None:
    # 4 experts in 6 slots on 2 ranks: [0 1 2 | 3 0 1]; experts 0 and 1 have a replica on each
    phy2log = np.array([[0, 1, 2, 3, 0, 1]])
    loads = np.array([[[4, 2, 1, 1]]])
    assert rank_loads(loads, phy2log, 2).tolist() == [[[4.0, 4.0]]]  # 2+1+1 | 1+2+1
    # the same experts without replicas, contiguous on 2 ranks: [0 1 | 2 3]
    assert rank_loads(loads, np.array([[0, 1, 2, 3]]), 2).tolist() == [[[6.0, 2.0]]]
    with pytest.raises(ValueError, match="divide"):
        rank_loads(loads, phy2log, 4)


def test_sparse_rank_loads_equal_the_obvious_sum() -> None:
    rng = np.random.default_rng(3)
    experts, layers, ranks = 12, 3, 4
    phy2log = np.stack([rng.permutation(np.r_[np.arange(experts), [1, 1, 5, 7]]) for _ in range(3)])
    loads = rng.integers(0, 4, (9, layers, experts)) * (rng.random((9, layers, experts)) < 0.4)
    got = Placement.vllm(phy2log, ranks, experts).rank_loads(loads)
    want = np.zeros((9, layers, ranks))
    per_rank = phy2log.shape[1] // ranks
    for s in range(9):
        for li in range(layers):
            for p, e in enumerate(phy2log[li]):
                copies = int((phy2log[li] == e).sum())
                want[s, li, p // per_rank] += loads[s, li, e] / copies
    np.testing.assert_allclose(got, want)


def test_p5_is_numpys_inverted_cdf_on_values_rounded_to_the_bins() -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(0.2, 1.0, 37)
    hist = np.bincount(np.rint(values * ep.BINS).astype(int), minlength=ep.BINS + 1)
    rounded = np.rint(values * ep.BINS) / ep.BINS
    assert histogram_quantile(hist, 0.05) == pytest.approx(
        np.quantile(rounded, 0.05, method="inverted_cdf")
    )
    assert np.isnan(histogram_quantile(np.zeros(ep.BINS + 1), 0.05))


def test_the_fit_takes_exactly_the_first_half_of_the_steps() -> None:
    assert [split_point(t) for t in (0, 1, 2, 3, 10, 33, 12_345, 10**6)] == [
        0,
        0,
        1,
        1,
        5,
        16,
        6_172,
        500_000,
    ]


# --------------------------------------------------------------------------- known answers


def one_block_per_step(steps: int = 12, tokens: int = 3) -> list[Token]:
    """Every token of step s picks experts 2b and 2b+1, b = s mod 8: one block of 2 experts,
    so under contiguous placement one rank does all the work for any R <= 8 of 16 experts."""
    return [(s, (2 * (s % 8), 2 * (s % 8) + 1)) for s in range(steps) for _ in range(tokens)]


def test_a_step_on_one_contiguous_block_gives_1_over_r(tmp_path: Path, no_vllm: None) -> None:
    r = result(write_steps(tmp_path / "a.jsonl", one_block_per_step(), layers=(3, 5)))
    assert r.ranks == [2, 4, 8, 16]
    assert (r.steps, r.fit_steps, r.eval_steps, r.eval_from_step) == (12, 6, 6, 6)
    for br in r.by_ranks[:3]:  # R = 2, 4, 8: the block sits on one rank
        assert [la.layer for la in br.layers] == [3, 5]
        for la in br.layers:
            assert la.steps == 6
            assert la.contiguous_mean == pytest.approx(1 / br.ranks)
            assert la.contiguous_p5 == pytest.approx(1 / br.ranks, abs=1e-3)
    sixteen = r.by_ranks[3].layers[0]  # one expert a rank: two ranks share the work
    assert sixteen.contiguous_mean == pytest.approx(2 / 16)


def test_without_vllm_contiguous_figures_still_come_out(tmp_path: Path, no_vllm: None) -> None:
    r = result(write_steps(tmp_path / "a.jsonl", one_block_per_step()))
    assert r.eplb_skipped == "vLLM's EPLB is not importable (ImportError: No module named 'vllm')"
    assert all(br.eplb_mean is None and br.gain is None for br in r.by_ranks)
    assert all(br.contiguous_mean == pytest.approx(1 / br.ranks) for br in r.by_ranks[:3])


def test_uniform_load_is_perfectly_balanced_either_way(tmp_path: Path) -> None:
    # 4 tokens a step cover the 16 experts once each (k = 4)
    tokens = [(s, tuple(range(4 * t, 4 * t + 4))) for s in range(10) for t in range(4)]
    r = result(write_steps(tmp_path / "u.jsonl", tokens, k=4))
    assert r.eplb_skipped is None, r.eplb_skipped
    for br in r.by_ranks:
        (la,) = br.layers
        assert (la.contiguous_mean, la.contiguous_p5) == (pytest.approx(1.0), 1.0)
        assert (la.eplb_mean, la.eplb_p5) == (pytest.approx(1.0), 1.0)
        assert br.gain == pytest.approx(0.0)


def heavy_block_log(path: Path, steps: int = 40) -> Path:
    """Experts 0-3 (rank 0's block at R = 4) are heavy: every token takes one of them and one
    of the 12 light experts."""
    rng = np.random.default_rng(7)
    tokens = [(s, (t % 4, int(rng.integers(4, 16)))) for s in range(steps) for t in range(8)]
    return write_steps(path, tokens, layers=(0, 1))


def test_vllms_eplb_puts_the_heavy_experts_on_different_ranks(tmp_path: Path) -> None:
    r = result(heavy_block_log(tmp_path / "h.jsonl"), ep_ranks=(4,))
    (br,) = r.by_ranks
    assert r.eplb_source is not None and "vLLM" in r.eplb_source
    assert br.placement is not None and br.placement.shape == (2, 16)
    for layer_map in br.placement:
        rank_of = {int(e): p // 4 for p, e in enumerate(layer_map)}
        assert sorted(rank_of[e] for e in range(4)) == [0, 1, 2, 3]
    assert br.contiguous_mean < 0.7
    assert br.eplb_mean is not None and br.eplb_mean > br.contiguous_mean + 0.15
    assert br.gain == pytest.approx(br.eplb_mean - br.contiguous_mean)


def test_redundant_experts_must_fill_whole_ranks(tmp_path: Path) -> None:
    r = result(heavy_block_log(tmp_path / "h.jsonl"), ep_ranks=(4, 8), redundant_experts=4)
    four, eight = r.by_ranks
    assert four.eplb_skipped is None and four.placement is not None
    assert four.placement.shape == (2, 20)  # 16 + 4 physical experts, 5 per rank
    assert eight.eplb_mean is None
    assert eight.eplb_skipped is not None and "16 + 4 redundant = 20" in eight.eplb_skipped
    assert eight.contiguous_mean > 0  # the contiguous figures do not depend on EPLB


# --------------------------------------------------------------------------- the whole log


def reference(path: Path, r: EpAnalysis, redundant: int) -> dict[tuple[int, int], tuple]:
    """(ranks, layer) -> (contiguous mean, p5, EPLB mean, p5) the slow way: every step's dense
    loads, the fit on the first ``r.fit_steps`` steps by vLLM, loops over ranks."""
    log = open_log(path)
    rows = [c for c in log.chunks()]
    step = np.concatenate([c.step for c in rows])
    layer = np.concatenate([c.layer for c in rows])
    ids = np.concatenate([c.ids for c in rows])
    layers, steps = log.layers, np.unique(step)
    e = r.num_experts
    loads = np.zeros((steps.size, len(layers), e))
    for s, la, row in zip(step, layer, ids, strict=True):
        for x in row:
            loads[np.searchsorted(steps, s), layers.index(la), x] += 1
    fit, held = loads[: r.fit_steps], loads[r.fit_steps :]
    rebalance, _ = ep.load_eplb()
    out = {}
    for ranks in r.ranks:
        owner = contiguous_ranks(e, ranks)
        contig = np.array(
            [
                [[h[li][owner == q].sum() for q in range(ranks)] for li in range(len(layers))]
                for h in held
            ]
        )
        phy2log = ep.eplb_placement(rebalance, fit.sum(axis=0), e + redundant, ranks)
        per = (e + redundant) // ranks
        eplb = np.zeros_like(contig)
        for si, h in enumerate(held):
            for li in range(len(layers)):
                for p, x in enumerate(phy2log[li]):
                    eplb[si, li, p // per] += h[li][x] / (phy2log[li] == x).sum()
        for li, la in enumerate(layers):
            bc, be = balancedness(contig[:, li]), balancedness(eplb[:, li])
            bc, be = bc[~np.isnan(bc)], be[~np.isnan(be)]
            p5 = [
                np.quantile(np.rint(b * ep.BINS) / ep.BINS, 0.05, method="inverted_cdf")
                for b in (bc, be)
            ]
            out[(ranks, la)] = (bc.mean(), p5[0], be.mean(), p5[1])
    return out


def test_every_figure_matches_the_slow_reference(tmp_path: Path) -> None:
    body = skewed_routes(n_requests=6, prompt=9, generated=30, experts=16, layers=(2, 7), seed=4)
    path = write_log(tmp_path / "s.jsonl", body, meta(layers_logged=[2, 7], num_experts=16))
    r = result(path, redundant_experts=4, ep_ranks=(2, 4))
    assert (r.steps, r.fit_steps, r.eval_steps) == (6 + 29, 17, 18)  # prefill + decode steps
    want = reference(path, r, redundant=4)
    for br in r.by_ranks:
        for la in br.layers:
            cm, cp, em, epp = want[(br.ranks, la.layer)]
            assert la.contiguous_mean == pytest.approx(cm)
            assert la.contiguous_p5 == pytest.approx(cp)
            assert la.eplb_mean == pytest.approx(em)
            assert la.eplb_p5 == pytest.approx(epp)


def feed(path: Path, rows: np.ndarray | None = None, pieces: int = 1, **options: Any) -> Any:
    """The pass over ``path``'s routes (in the order ``rows``), handed over in ``pieces``
    chunks."""
    log = open_log(path)
    parts = list(log.chunks())
    chunk = RouteChunk(
        *(np.concatenate([getattr(c, f) for c in parts]) for f in RouteChunk.__dataclass_fields__)
    )
    if rows is not None:
        chunk = chunk.take(rows)
    p = EpPass(log, log.meta.num_experts, PassOptions(**options))
    parts = np.array_split(np.arange(len(chunk)), pieces)
    for part in parts:
        p.add(chunk.take(part))
    reads = 1
    while p.needs_reread:  # the same chunks again
        reads += 1
        for part in parts:
            p.add(chunk.take(part))
    assert reads == 2
    return p.finish()


def figures(r: EpAnalysis) -> list[float]:
    """Every per-layer figure, flat."""
    out: list[float] = []
    for br in r.by_ranks:
        for la in br.layers:
            out += [br.ranks, la.layer, la.steps, la.contiguous_mean, la.contiguous_p5]
            out += [la.eplb_mean, la.eplb_p5]
    return out


def test_chunks_and_steps_slightly_out_of_order_give_the_same_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = skewed_routes(n_requests=5, prompt=6, generated=40, experts=16, layers=(0, 1), seed=2)
    path = write_log(tmp_path / "s.jsonl", body, meta(layers_logged=[0, 1], num_experts=16))
    whole = feed(path)
    assert figures(feed(path, pieces=17)) == pytest.approx(figures(whole))
    monkeypatch.setattr(ep, "CELL_CAP", 50)  # a chunk's steps counted one at a time
    assert figures(feed(path, pieces=3)) == pytest.approx(figures(whole))
    monkeypatch.undo()
    # rows shuffled within runs of 3 steps: within the LAG the pass waits for
    step = np.array([rt["step"] for rt in body])
    rng = np.random.default_rng(0)
    order = np.lexsort((rng.random(step.size), step // 3))
    shuffled = feed(path, order, pieces=9)
    assert shuffled.late_routes == 0
    assert figures(shuffled) == pytest.approx(figures(whole))


def test_routes_arriving_after_their_step_completed_are_counted_and_left_out(
    tmp_path: Path, no_vllm: None
) -> None:
    tokens = one_block_per_step(steps=20)
    tokens.append((2, (0, 1)))  # step 2 comes back after step 19: long complete
    path = write_steps(tmp_path / "late.jsonl", tokens)
    one_chunk = feed(path)  # rows of one chunk are counted together: no order within it
    assert one_chunk.late_routes == 0 and one_chunk.routes == 61
    r = feed(path, pieces=len(tokens))  # one row a chunk
    assert r.late_routes == 1 and r.routes == 60
    assert r.notes == [
        "1 routes came after their step was complete (more than 4 steps out of order) and "
        "were left out"
    ]


def test_long_logs_split_exactly_in_half_and_get_a_timeline_of_bounded_length(
    tmp_path: Path, no_vllm: None
) -> None:
    n = 5001
    tokens = [(s, (s % 16, (s + 5) % 16)) for s in range(n)]
    r = result(write_steps(tmp_path / "long.jsonl", tokens))
    assert (r.steps, r.fit_steps, r.eval_steps, r.eval_from_step) == (n, 2500, 2501, 2500)
    assert all(la.steps == 2501 for br in r.by_ranks for la in br.layers)
    t = r.timeline
    assert t is not None and t.steps_per_point == 4 and t.step.size == -(-n // 4)
    assert t.step[:2] == pytest.approx([1.5, 5.5])  # the mean step number of each point
    # two tokens on 16 experts: one or two ranks of R busy, the timeline says which on average
    assert np.nanmean(t.contiguous, axis=0) == pytest.approx(
        [np.mean([b.contiguous_mean for b in br.layers]) for br in r.by_ranks], abs=0.02
    )


# --------------------------------------------------------------------------- logs it cannot read


def test_a_log_without_steps_is_skipped_in_one_line(tmp_path: Path) -> None:
    r = run_ep(write_steps(tmp_path / "old.jsonl", one_block_per_step(), step=False))
    assert r == Skipped(ep.NO_STEP_REASON)


def test_a_log_of_one_step_or_unknown_experts_is_skipped(tmp_path: Path) -> None:
    one = run_ep(write_steps(tmp_path / "one.jsonl", [(0, (0, 1)), (0, (2, 3))]))
    assert isinstance(one, Skipped) and "one engine step" in one.reason
    body = [route("0", t, 12, (t % 8, 9), (0.5, 0.4), step=t) for t in range(6)]
    path = write_log(tmp_path / "noe.jsonl", body, meta(num_experts=None, top_k=2))
    noe = run_ep(path)
    assert isinstance(noe, Skipped) and "--num-experts" in noe.reason
    assert isinstance(run_ep(path, ep_ranks=(32,)), Skipped)


def test_rank_counts_beyond_the_experts_are_left_out_with_a_note(
    tmp_path: Path, no_vllm: None
) -> None:
    r = result(write_steps(tmp_path / "a.jsonl", one_block_per_step()), ep_ranks=(4, 32))
    assert r.ranks == [4]
    assert r.notes == ["32 ranks left out: more ranks than the 16 experts"]


# --------------------------------------------------------------------------- output


@pytest.fixture
def heavy(tmp_path: Path) -> Path:
    return heavy_block_log(tmp_path / "heavy.jsonl")


def test_table_note_and_json_show_the_eval_figures(heavy: Path) -> None:
    report = analyze_logs([heavy], analyses=["ep"], options=PassOptions(ep_ranks=(2, 4)))
    r = report.logs[0].extras["ep"]
    out = io.StringIO()
    print_ep(r, Console(file=out, width=120))
    text = out.getvalue()
    assert "fitted on the first 20, every figure over the last 20 (from step 20)" in text
    four = r.by_ranks[1]
    assert f"{four.layers[0].contiguous_mean:.2f}" in text and f"{four.gain:+.2f}" in text
    note = markdown_note(report)
    assert "Expert parallelism" in note
    assert f"4 ranks: contiguous {four.contiguous_mean:.2f}, EPLB {four.eplb_mean:.2f}" in note
    data = json.loads(report.to_json())["logs"][0]["extras"]["ep"]
    assert data["by_ranks"][1]["eplb_mean"] == pytest.approx(four.eplb_mean)
    assert "placement" not in data["by_ranks"][1] and "timeline" not in data


def test_cli_analyze_ep_and_its_options(heavy: Path) -> None:
    code, out = run_cli("analyze", str(heavy), "--ep", "--ep-ranks", "4", "--json")
    assert code == 0
    got = json.loads(out)["logs"][0]["extras"]["ep"]
    assert got["ranks"] == [4] and got["redundant_experts"] == 0
    code, out = run_cli("analyze", str(heavy), "--ep", "--redundant-experts", "4")
    assert code == 0 and "expert parallelism" in out and "16 + 4 redundant = 20" in out


def test_ep_plot_draws_the_timeline_the_analysis_computed(heavy: Path, tmp_path: Path) -> None:
    report = analyze_logs([heavy], analyses=["ep"], options=PassOptions())
    r = report.logs[0].extras["ep"]
    fig = plots.figure(report, kind="ep")
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.lines]
    assert [ax.get_title() for ax in axes] == [f"{br.ranks} ranks" for br in r.by_ranks]
    for i, (ax, br) in enumerate(zip(axes, r.by_ranks, strict=True)):
        contig, eplb = ax.lines[0], ax.lines[1]
        np.testing.assert_allclose(contig.get_xdata(), r.timeline.step)
        np.testing.assert_allclose(contig.get_ydata(), r.timeline.contiguous[:, i])
        np.testing.assert_allclose(eplb.get_xdata(), r.timeline.eplb_step)
        np.testing.assert_allclose(eplb.get_ydata(), r.timeline.eplb[:, i])
        assert f"mean {br.contiguous_mean:.2f}" in contig.get_label()
        assert f"mean {br.eplb_mean:.2f}" in eplb.get_label()
        assert ax.get_ylabel().startswith("balancedness")
    assert axes[-1].get_xlabel() == "engine step"
    assert "EPLB fitted on steps before 20" in fig._suptitle.get_text()
    code, _ = run_cli("plot", str(heavy), "--kind", "ep", "-o", str(tmp_path / "ep.png"))
    assert code == 0 and (tmp_path / "ep.png").stat().st_size > 0


def test_ep_plot_takes_the_rank_counts_and_redundant_experts_analyze_takes(
    heavy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn = []
    figure = plots.ep_figure

    def kept(report: Any) -> Any:
        drawn.append(report)
        return figure(report)

    monkeypatch.setattr(plots, "ep_figure", kept)
    png = tmp_path / "ep.png"
    args = ("plot", str(heavy), "--kind", "ep", "-o", str(png))
    code, _ = run_cli(*args, "--ep-ranks", "4,8", "--redundant-experts", "4")
    assert code == 0 and png.stat().st_size > 0
    r = drawn[-1].logs[0].extras["ep"]
    assert r.ranks == [4, 8] and r.redundant_experts == 4
    fig = plots.ep_figure(drawn[-1])
    four, eight = (ax for ax in fig.axes if ax.get_visible() and ax.lines)
    assert [ax.get_title() for ax in (four, eight)] == ["4 ranks", "8 ranks"]
    assert "EPLB, 4 redundant" in four.lines[1].get_label()
    # 20 physical experts do not fill 8 ranks: no EPLB line ...
    assert not any(line.get_label().startswith("EPLB") for line in eight.lines)
    assert any("16 + 4 redundant = 20" in t.get_text() for t in eight.texts)  # ... and why
    code, out = run_cli(*args, "--force", "--ep-ranks", "x")
    assert code == 2 and "--ep-ranks 'x': give rank counts such as 2,4,8" in out
    code, out = run_cli("plot", str(heavy), "-o", str(tmp_path / "h.png"), "--ep-ranks", "4")
    assert code == 2 and "options of --kind ep" in out


def test_ep_plot_of_a_log_without_steps_says_why(tmp_path: Path) -> None:
    path = write_steps(tmp_path / "old.jsonl", one_block_per_step(), step=False)
    code, out = run_cli("plot", str(path), "--kind", "ep", "-o", str(tmp_path / "x.png"))
    assert code == 2 and "no step field" in out


def test_the_eplb_algorithm_is_vllms_own_file_unchanged() -> None:
    fn, source = ep.load_eplb()
    assert source.startswith("vLLM ") and source.endswith("DefaultEplbPolicy.rebalance_experts")
    assert fn.__module__ == ep.EPLB_MODULE  # the plain import of vLLM's public module
    path = Path(fn.__func__.__code__.co_filename)
    assert path.parts[-5:] == ("vllm", "distributed", "eplb", "policy", "default.py")


def test_when_vllm_fails_to_import_its_eplb_file_is_loaded_on_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    plain, _ = ep.load_eplb()
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails
    fn, source = ep.load_eplb()
    assert "(loaded from its file: `import vllm` failed with ModuleNotFoundError)" in source
    assert fn.__func__.__code__.co_filename == plain.__func__.__code__.co_filename
    weight = np.array([[9.0, 1, 1, 1, 5, 1, 1, 1]])
    assert ep.eplb_placement(fn, weight, 10, 2).tolist() == (
        ep.eplb_placement(plain, weight, 10, 2).tolist()
    )
    monkeypatch.setattr(ep, "_vllm_folder", lambda: None)
    with pytest.raises(ImportError, match=r"^vLLM is not installed$"):
        ep.load_eplb()


def test_analyze_reads_the_log_twice_for_ep_after_the_same_exclusion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moeprof.analysis.reader import RouteLog

    reads = []
    chunks = RouteLog.chunks

    def counted(self: RouteLog, *args: object, **kwargs: object) -> object:
        reads.append(self.path)
        return chunks(self, *args, **kwargs)

    monkeypatch.setattr(RouteLog, "chunks", counted)
    body = skewed_routes(n_requests=6, prompt=9, generated=30, experts=16, seed=4)
    clean = write_log(tmp_path / "clean.jsonl", body, meta(num_experts=16))
    want = figures(result(clean, ep_ranks=(4,)))
    assert len(reads) == 2
    reads.clear()
    assert len(analyze_log(clean).extras) == 0 and len(reads) == 1  # no --ep: one read
    # a dummy batch in front, in steps of its own: left out of both reads alike
    dummy = [route("9", t, ids=(1, 2, 3, 4), step=1000 + t // 100) for t in range(300)]
    dirty = write_log(tmp_path / "dirty.jsonl", dummy + body, meta(num_experts=16))
    reads.clear()
    a = analyze_log(
        dirty, exclude_suspect=True, analyses=["ep"], options=PassOptions(ep_ranks=(4,))
    )
    assert len(reads) == 3  # the detector's pass, the exclusion pass, EP's second read
    assert a.excluded == 300 and figures(a.extras["ep"]) == pytest.approx(want)


def test_logs_of_many_layers_get_the_mean_and_the_least_even_layers(tmp_path: Path) -> None:
    layers = (0, 1, 2, 3, 4, 5)
    body = skewed_routes(n_requests=6, prompt=8, generated=30, experts=16, layers=layers)
    path = write_log(tmp_path / "six.jsonl", body, meta(layers_logged=list(layers), num_experts=16))
    r = result(path, ep_ranks=(4,))
    (br,) = r.by_ranks
    assert br.contiguous_mean == pytest.approx(np.mean([la.contiguous_mean for la in br.layers]))
    assert br.gain == pytest.approx(
        np.mean([la.eplb_mean - la.contiguous_mean for la in br.layers])
    )
    out = io.StringIO()
    print_ep(r, Console(file=out, width=120))
    lines = out.getvalue().splitlines()
    row = next(line for line in lines if "all 6 (mean)" in line)
    assert f"{br.contiguous_mean:.2f}" in row and f"{br.gain:+.2f}" in row
    worst = sorted(br.layers, key=lambda la: la.contiguous_mean)[:2]
    shown = [line.split()[0] for line in lines if "(least even)" in line]
    assert shown == [str(la.layer) for la in worst]
