"""``analyze --reuse``: how much of a token's expert set the previous token of its request
already used (overlap, by phase, against chance) and what a per-request LRU cache of C experts
would hit, for every C from k to E (against chance); requests' state dropped once they stop;
the terminal table, the markdown note and ``plot --kind reuse``."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from logfactory import DECODE, PREFILL, meta, route, run_cli, write_log
from rich.console import Console

from moeprof.analysis import plots, reuse
from moeprof.analysis.analyze import analyze_logs
from moeprof.analysis.reuse import (
    RequestCaches,
    ReuseResult,
    capacity_grid,
    chance_overlap,
    che_hit_rates,
    hit_rates,
    set_overlap,
)
from moeprof.render.note import markdown_note
from moeprof.render.reuse import print_reuse, reuse_note

Token = tuple[str, int, Sequence[int]]
"""(req_id, token_idx, expert ids) of one token at one layer."""


def reference_lru(sets: list[Sequence[int]]) -> list[list[int]]:
    """Stack distances of one request's accesses, the slow obvious way: a recency list (most
    recent first), each token's experts looked up in it and then put in front in their listed
    order; 0 for a first use."""
    recency: list[int] = []
    out = []
    for s in sets:
        out.append([recency.index(e) + 1 if e in recency else 0 for e in s])
        recency = list(s) + [e for e in recency if e not in s]
    return out


def write_tokens(
    path: Path,
    tokens: list[Token],
    *,
    layers: Sequence[int] = (3,),
    k: int = 2,
    experts: int | None = 8,
    phases: Sequence[str | None] | None = None,
) -> Path:
    """A log of ``tokens``, the same ids at every layer, in the order given."""
    body = []
    for i, (req, t, ids) in enumerate(tokens):
        phase = phases[i] if phases is not None else (PREFILL if t < 3 else DECODE)
        w = [round(0.5 / (j + 1), 4) for j in range(len(ids))]
        body += [route(req, t, la, ids, w, phase, step=i) for la in layers]
    return write_log(path, body, meta(layers_logged=list(layers), top_k=k, num_experts=experts))


def reuse_of(path: Path, **kw: Any) -> ReuseResult:
    result = analyze_logs([path], analyses=["reuse"], **kw).logs[0].extras["reuse"]
    assert isinstance(result, ReuseResult)
    return result


# --------------------------------------------------------------------------- statistics


def test_set_overlap_counts_shared_experts_per_row() -> None:
    ids = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    prev = np.array([[2, 1, 9], [3, 9, 9], [0, 1, 2]])
    assert set_overlap(ids, prev).tolist() == [2, 1, 0]


def test_chance_overlap_by_hand() -> None:
    # 2 tokens, k = 2: expert 0 in both, 1 and 2 in one each -> q = 1, 1/2, 1/2
    assert chance_overlap(np.array([2, 1, 1, 0]), 2, 2) == pytest.approx((1 + 0.25 + 0.25) / 2)
    assert chance_overlap(np.full(16, 25), 100, 4) == pytest.approx(4 / 16)  # uniform: k/E
    with pytest.raises(ValueError, match="tokens"):
        chance_overlap(np.array([3, 1]), 2, 2)


def test_hit_rates_by_hand() -> None:
    # 2 first uses, 3 accesses at distance 1, 1 at 2, 2 at 4
    hist = np.array([2, 3, 1, 0, 2])
    hit, warm = hit_rates(hist, np.array([1, 2, 3, 4, 9]))
    assert hit.tolist() == pytest.approx([3 / 8, 4 / 8, 4 / 8, 6 / 8, 6 / 8])
    assert warm.tolist() == pytest.approx([3 / 6, 4 / 6, 4 / 6, 1, 1])


def test_capacity_grid_always_has_k_2k_and_e() -> None:
    assert capacity_grid(4, 16).tolist() == list(range(4, 17))
    big = capacity_grid(8, 512)
    assert {8, 16, 512} <= set(big.tolist())
    assert big.size <= reuse.MAX_CAPACITIES and (np.diff(big) > 0).all()
    with pytest.raises(ValueError, match="k"):
        capacity_grid(9, 8)


def test_che_chance_by_hand() -> None:
    caps = np.arange(2, 9)
    # a request repeating one set: after its first token every access hits
    q = np.array([1.0, 1.0, 0, 0, 0, 0, 0, 0])
    lengths = np.zeros(11)
    lengths[10] = 3  # three requests of 10 tokens
    hit, warm = che_hit_rates(q, 2, lengths, caps)
    assert hit.tolist() == pytest.approx([9 / 10] * caps.size)
    assert warm.tolist() == pytest.approx([1.0] * caps.size)
    # uniform loads, long requests: the steady state hits C/E
    lengths = np.zeros(100_001)
    lengths[-1] = 1
    _, warm = che_hit_rates(np.full(8, 2 / 8), 2, lengths, caps)
    assert warm.tolist() == pytest.approx((caps / 8).tolist(), abs=1e-3)
    with pytest.raises(ValueError, match="q"):
        che_hit_rates(np.array([1.5]), 1, lengths, caps)


# --------------------------------------------------------------------------- the LRU


def test_lru_tie_break_and_distances_by_hand() -> None:
    """Tokens {0,1}, {2,3}, {0,2}: before the third, the recency order is 2, 3, 0, 1 (of one
    token's experts the first listed is the most recent), so 0 is at distance 3, 2 at 1."""
    caches = RequestCaches(2, 4)
    r = caches.feed(np.zeros(3, int), np.arange(3), np.array([[0, 1], [2, 3], [0, 2]]))
    assert r.distance.tolist() == [[0, 0], [0, 0], [3, 1]]
    assert r.overlap.tolist() == [-1, 0, 1]
    assert r.distance.tolist() == reference_lru([[0, 1], [2, 3], [0, 2]])


@pytest.mark.parametrize("experts", [16, 150])  # one 64-bit word of experts, and three
def test_lru_matches_the_obvious_one_over_chunks_and_interleaved_requests(experts: int) -> None:
    rng = np.random.default_rng(0)
    logp = np.log(rng.dirichlet(np.full(experts, 0.5)))
    n, groups, k = 600, 9, 4
    group = rng.integers(0, groups, n)
    tok = np.zeros(n, int)
    for g in range(groups):
        tok[group == g] = np.arange(np.count_nonzero(group == g))
    ids = np.argsort(-(logp + rng.gumbel(size=(n, experts))), axis=1)[:, :k]
    caches = RequestCaches(k, experts)
    dist = np.zeros((n, k), int)
    for part in np.array_split(np.arange(n), 5):
        shuffled = rng.permutation(part)  # rows of a chunk in any order
        dist[shuffled] = caches.feed(group[shuffled], tok[shuffled], ids[shuffled]).distance
    for g in range(groups):
        mine = group == g
        assert dist[mine].tolist() == reference_lru(ids[mine].tolist())


def test_lru_in_small_batches_gives_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    ids = np.argsort(rng.random((200, 8)), axis=1)[:, :2]
    group = rng.integers(0, 4, 200)
    tok = np.arange(200)
    whole = RequestCaches(2, 8).feed(group, tok, ids)
    monkeypatch.setattr(reuse, "BATCH_ROWS", 7)
    batched = RequestCaches(2, 8).feed(group, tok, ids)
    assert batched.distance.tolist() == whole.distance.tolist()
    assert batched.overlap.tolist() == whole.overlap.tolist()


def test_requests_state_is_dropped_when_they_stop() -> None:
    caches = RequestCaches(1, 4)
    caches.feed(
        np.array([0, 1, 2]), np.zeros(3, int), np.array([[0], [1], [2]]), np.array([1, 2, 3])
    )
    caches.expire(before_line=3)  # groups 0 and 1 last seen before line 3
    assert caches.codes.tolist() == [2]
    codes, counts = caches.take_ended()
    assert codes.tolist() == [0, 1] and counts.tolist() == [1, 1]
    r = caches.feed(np.array([0]), np.array([1]), np.array([[0]]), np.array([9]))
    assert caches.resumed == 1 and r.distance.tolist() == [[0]]  # back with a cold cache
    caches.expire(before_line=0, max_live=1)
    assert caches.codes.tolist() == [0]  # the most recently seen stays


# --------------------------------------------------------------------------- the pass


def test_a_request_repeating_one_set_reuses_everything(tmp_path: Path) -> None:
    tokens = [(r, t, [5, 1, 6]) for r in ("a", "b") for t in range(10)]
    res = reuse_of(write_tokens(tmp_path / "same.jsonl", tokens, k=3))
    (la,) = res.layers
    assert la.overlap == 1.0 and la.pairs == 18 and la.breaks == 0
    assert la.capacities == list(range(3, 9))
    assert la.warm_hit_rate == [1.0] * 6  # the first token left out
    assert la.hit_rate == pytest.approx([9 / 10] * 6)  # its 3 first uses counted as misses
    assert la.compulsory == 6 and la.accesses == 60 and la.requests == 2
    assert la.chance_overlap == 1.0 and la.chance_warm_hit_rate == pytest.approx([1.0] * 6)


def test_independent_tokens_reuse_only_by_chance(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    tokens = [
        (str(r), t, rng.choice(8, 2, replace=False).tolist()) for t in range(300) for r in range(4)
    ]
    (la,) = reuse_of(write_tokens(tmp_path / "random.jsonl", tokens)).layers
    assert la.chance_overlap == pytest.approx(2 / 8, abs=0.01)
    assert la.overlap == pytest.approx(la.chance_overlap, abs=0.03)
    assert la.hit_rate == pytest.approx(la.chance_hit_rate, abs=0.03)
    assert la.warm_hit_rate == pytest.approx((np.arange(2, 9) / 8).tolist(), abs=0.03)


def test_overlap_by_phase_and_gaps_break_the_chain(tmp_path: Path) -> None:
    tokens: list[Token] = [
        ("a", 0, [0, 1]),
        ("a", 1, [1, 2]),  # prefill pair, overlap 1/2
        ("a", 2, [1, 2]),  # decode pair, overlap 1
        ("a", 4, [1, 2]),  # a gap: no pair
        ("a", 5, [3, 4]),  # decode pair, overlap 0
    ]
    phases = [PREFILL, PREFILL, DECODE, DECODE, DECODE]
    (la,) = reuse_of(write_tokens(tmp_path / "gap.jsonl", tokens, phases=phases)).layers
    assert la.pairs == 3 and la.breaks == 1
    assert la.overlap == pytest.approx((1 + 2 + 0) / (3 * 2))
    by = {p.phase: p for p in la.by_phase}
    assert (by["prefill"].pairs, by["prefill"].overlap) == (1, 0.5)
    assert (by["decode"].pairs, by["decode"].overlap) == (2, 0.5)
    assert by["decode"].chance == chance_overlap(np.array([0, 2, 2, 1, 1, 0, 0, 0]), 3, 2)
    # the cache persists over the gap: token 4's experts 1, 2 were used by token 2
    assert la.warm_hit_rate[0] == pytest.approx(5 / 5)  # each reuse within the 2 most recent


def test_layers_are_kept_apart_and_e_can_grow(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tokens = [
        (str(r), t, rng.choice(6, 2, replace=False).tolist()) for t in range(30) for r in range(3)
    ]
    path = write_tokens(tmp_path / "two.jsonl", tokens, layers=(0, 7), experts=None)
    res = reuse_of(path)
    assert [la.layer for la in res.layers] == [0, 7]
    assert res.num_experts == max(max(ids) for _, _, ids in tokens) + 1
    assert res.layers[0].hit_rate == res.layers[1].hit_rate  # same ids at both layers
    assert res.layers[0].tokens == 90 and res.layers[0].requests == 3


def test_requests_that_come_back_after_the_horizon_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reuse, "HORIZON_LINES", 5)
    monkeypatch.setattr("moeprof.analysis.reader.BLOCK_BYTES", 1024)
    tokens = [("a", t, [0, 1]) for t in range(3)]
    tokens += [("b", t, [2, 3]) for t in range(30)]
    tokens += [("a", t, [0, 1]) for t in range(3, 6)]
    res = reuse_of(write_tokens(tmp_path / "back.jsonl", tokens))
    assert res.resumed == 1
    (la,) = res.layers
    assert la.requests == 3 and la.compulsory == 6


# --------------------------------------------------------------------------- report, note, plot


@pytest.fixture(scope="module")
def sticky(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two layers, 6 requests of 60 tokens, top-2 of 16: each token keeps one expert of its
    request's previous token (well above chance)."""
    rng = np.random.default_rng(5)
    tokens: list[Token] = []
    for r in range(6):
        prev = rng.choice(16, 2, replace=False).tolist()
        for t in range(60):
            keep = prev[int(rng.integers(2))]
            other = int(rng.choice([e for e in range(16) if e != keep]))
            prev = [keep, other]
            tokens.append((str(r), t, prev))
    path = tmp_path_factory.mktemp("logs") / "sticky.jsonl"
    return write_tokens(path, tokens, layers=(0, 1), experts=16)


def test_reuse_above_chance_shows_in_table_and_note(sticky: Path) -> None:
    res = reuse_of(sticky)
    for la in res.layers:
        assert la.overlap > 2 * la.chance_overlap
        assert la.hit_rate[la.at(4)] > la.chance_hit_rate[la.at(4)] + 0.2
    buf = io.StringIO()
    print_reuse(res, Console(file=buf, width=200, color_system=None))
    text = buf.getvalue()
    la = res.layers[0]
    assert "LRU C=4" in text and f"{100 * la.hit_rate[la.at(4)]:.1f}%" in text
    assert f"{100 * la.overlap:.1f}%" in text
    lines = reuse_note(res)
    assert any("C=4" in line for line in lines)
    assert lines[0] in markdown_note(analyze_logs([sticky], analyses=["reuse"]))


def test_cli_json_has_every_capacity(sticky: Path) -> None:
    code, out = run_cli("analyze", str(sticky), "--reuse", "--json")
    assert code == 0
    data = json.loads(out)["logs"][0]["extras"]["reuse"]
    assert data["layers"][0]["capacities"] == list(range(2, 17))
    assert len(data["layers"][0]["hit_rate"]) == 15


def test_reuse_plot_draws_each_layers_curve_and_the_chance_line(
    sticky: Path, tmp_path: Path
) -> None:
    report = analyze_logs([sticky], analyses=["reuse"])
    res = report.logs[0].extras["reuse"]
    ax = plots.figure(report, kind="reuse").axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    for la in res.layers:
        drawn = lines[f"layer {la.layer}"]
        assert drawn.get_xdata().tolist() == la.capacities
        assert drawn.get_ydata() == pytest.approx([100 * h for h in la.hit_rate])
    chance = lines["chance: tokens independent, same loads"].get_ydata()
    w = np.array([la.accesses for la in res.layers])
    expected = 100 * (w[:, None] * np.array([la.chance_hit_rate for la in res.layers])).sum(0)
    assert chance == pytest.approx(expected / w.sum())
    assert "cache size C" in ax.get_xlabel() and "hit rate" in ax.get_ylabel()
    one = analyze_logs([sticky], analyses=["reuse"], layers=[1])
    labels = [ln.get_label() for ln in plots.figure(one, kind="reuse").axes[0].get_lines()]
    assert "layer 1" in labels and "layer 0" not in labels
    png = tmp_path / "r.png"
    code, _ = run_cli("plot", str(sticky), "--kind", "reuse", "--out", str(png))
    assert code == 0 and png.read_bytes().startswith(b"\x89PNG")
