"""``analyze --cross-layer``: how the experts a token chooses at one logged layer predict its
experts at the next. Mutual information (against what independent layers show by chance), the
strongest transitions, a token's routes joined wherever the writer put them, routes without
a partner counted; the terminal table, the markdown note and ``plot --kind transitions``."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from logfactory import DECODE, PREFILL, meta, route, run_cli, write_log
from rich.console import Console

from moeprof.analysis import crosslayer, plots
from moeprof.analysis.analyze import AnalysisReport, analyze_logs
from moeprof.analysis.crosslayer import (
    CrossLayerResult,
    independence_baseline,
    joint_counts,
    mutual_information,
    top_transitions,
)
from moeprof.analysis.passes import Skipped
from moeprof.errors import UserError
from moeprof.render.crosslayer import cross_layer_note, print_cross_layer
from moeprof.render.note import markdown_note

Token = tuple[str, int, dict[int, Sequence[int]]]
"""(req_id, token_idx, {layer: expert ids}) of one token."""


def token_routes(tokens: list[Token], *, layer_major: bool = False) -> list[dict[str, Any]]:
    """Route records of ``tokens``: each token's layers on adjacent lines (the hook's layout),
    or with ``layer_major`` all tokens' first layer, then all their second layer, ..."""

    def one(req: str, t: int, layer: int, ids: Sequence[int]) -> dict[str, Any]:
        w = [round(0.5 / (j + 1), 4) for j in range(len(ids))]
        return route(req, t, layer, ids, w, PREFILL if t < 4 else DECODE, step=t)

    if not layer_major:
        return [one(r, t, la, ids) for r, t, by in tokens for la, ids in by.items()]
    layers = sorted({la for _, _, by in tokens for la in by})
    return [one(r, t, la, by[la]) for la in layers for r, t, by in tokens if la in by]


def write_tokens(
    path: Path,
    tokens: list[Token],
    layers: Sequence[int],
    k: int,
    experts: int | None = 8,
    **kw: Any,
) -> Path:
    header = meta(layers_logged=list(layers), top_k=k, num_experts=experts)
    return write_log(path, token_routes(tokens, **kw), header)


def cross_layer(path: Path, **kw: Any) -> CrossLayerResult:
    result = analyze_logs([path], analyses=["cross_layer"], **kw).logs[0].extras["cross_layer"]
    assert isinstance(result, CrossLayerResult)
    return result


# --------------------------------------------------------------------------- statistics


def test_joint_counts_adds_every_pair_of_a_token_once() -> None:
    a = np.array([[0, 1], [0, 2]])
    b = np.array([[1, 2], [0, 1]])
    expected = np.array([[1, 2, 1], [0, 1, 1], [1, 1, 0]])
    assert joint_counts(a, b, 3).tolist() == expected.tolist()
    assert joint_counts(a, b, 3).sum() == 2 * 2**2


def test_mutual_information_by_hand() -> None:
    # one expert per token, two experts: a perfect copy is 1 bit, independence 0
    assert mutual_information(np.array([[2, 0], [0, 2]]), 1).mi_bits == pytest.approx(1.0)
    assert mutual_information(np.array([[1, 1], [1, 1]]), 1).mi_bits == pytest.approx(0.0)
    info = mutual_information(np.array([[3, 1], [1, 3]]), 1)
    by_hand = 2 * (3 / 8) * math.log2((3 / 8) / (1 / 4)) + 2 * (1 / 8) * math.log2(
        (1 / 8) / (1 / 4)
    )
    assert info.mi_bits == pytest.approx(by_hand)
    assert info.entropy_bits == pytest.approx(1.0)
    assert info.normalized == pytest.approx(by_hand)


def test_a_router_that_copies_its_choice_carries_all_it_can() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 16, (4000, 1))
    info = mutual_information(joint_counts(ids, ids, 16), 1)
    assert info.mi_bits == pytest.approx(info.entropy_bits)  # k = 1: the whole entropy
    assert info.normalized == pytest.approx(1.0)
    # k = 4, sets from 4 disjoint groups of 4: the k x k pairs lose which expert maps to which
    groups = rng.integers(0, 4, 4000)
    sets = groups[:, None] * 4 + np.arange(4)
    info = mutual_information(joint_counts(sets, sets, 16), 4)
    assert info.mi_bits == pytest.approx(math.log2(16 / 4), abs=2e-3)
    assert info.mi_bits == pytest.approx(info.entropy_bits - math.log2(4))


def test_independence_baseline_by_hand_and_against_independent_routers() -> None:
    joint = np.array([[3, 1, 0], [1, 3, 0], [0, 0, 0]])  # k = 1, 8 tokens, 2 experts used
    assert independence_baseline(joint, 1) == pytest.approx(1 * 1 / (2 * 8 * math.log(2)))
    rng = np.random.default_rng(1)
    logp = np.log(rng.dirichlet(np.full(16, 0.8)))

    def draw(n: int) -> np.ndarray:
        return np.argsort(-(logp + rng.gumbel(size=(n, 16))), axis=1)[:, :4]

    joints = [joint_counts(draw(4000), draw(4000), 16) for _ in range(20)]
    mean_mi = np.mean([mutual_information(j, 4).mi_bits for j in joints])
    baseline = np.mean([independence_baseline(j, 4) for j in joints])
    assert mean_mi == pytest.approx(baseline, rel=0.15)
    # ... and a real dependence stands far above it
    a = draw(4000)
    b = np.where(rng.random((4000, 1)) < 0.5, a, draw(4000))
    coupled = joint_counts(a, b, 16)
    assert mutual_information(coupled, 4).mi_bits > 20 * independence_baseline(coupled, 4)


def test_top_transitions_rank_by_lift_and_leave_out_rare_pairs() -> None:
    # k = 1, 10 tokens: 0->0 x4, 0->1 x1, 1->1 x3, 2->1 x2
    joint = np.array([[4, 1, 0], [0, 3, 0], [0, 2, 0]])
    top = top_transitions(joint, 1, top=5, min_tokens=2)
    assert [(t.expert, t.next_expert, t.tokens) for t in top] == [(0, 0, 4), (1, 1, 3), (2, 1, 2)]
    assert top[0].lift == pytest.approx(10 * 4 / (5 * 4))  # N J / (count_a count_b)
    assert top[1].lift == pytest.approx(10 * 3 / (3 * 6))
    assert top[0].conditional == pytest.approx(4 / 5)
    assert top_transitions(joint, 1, top=1, min_tokens=2) == top[:1]
    assert top_transitions(joint, 1, top=5, min_tokens=5) == []


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda: joint_counts(np.zeros((2, 2), int), np.zeros((3, 2), int), 4), "ids_a"),
        (lambda: joint_counts(np.full((2, 2), 5), np.zeros((2, 2), int), 4), "ids_a"),
        (lambda: mutual_information(np.ones((2, 3)), 1), "joint"),
        (lambda: mutual_information(np.array([[1, 1], [1, 0]]), 2), "joint"),
        (lambda: mutual_information(np.ones((2, 2)), 0), "k"),
        (lambda: top_transitions(np.ones((2, 2)), 1, top=-1), "top"),
    ],
)
def test_bad_arguments_are_named(call: Any, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        call()


# --------------------------------------------------------------------------- the pass


def copy_tokens(n: int, layers: Sequence[int], experts: int = 8, seed: int = 0) -> list[Token]:
    """Tokens (k = 1) whose expert at every layer is the same random expert."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        e = int(rng.integers(experts))
        out.append((str(i % 3), i // 3, {la: [e] for la in layers}))
    return out


def test_a_log_whose_layers_copy_the_first_has_mi_equal_to_its_entropy(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "copy.jsonl", copy_tokens(300, [2, 5, 6]), [2, 5, 6], k=1)
    r = cross_layer(path)
    assert [(p.layer, p.next_layer, p.tokens) for p in r.pairs] == [(2, 5, 300), (5, 6, 300)]
    assert [p.adjacent for p in r.pairs] == [False, True]
    for p in r.pairs:
        assert p.mi_bits == pytest.approx(p.entropy_bits)
        assert p.normalized_mi == pytest.approx(1.0)
        assert p.mi_bits > 10 * p.baseline_bits
        assert np.count_nonzero(p.joint - np.diag(np.diag(p.joint))) == 0
    assert r.unpaired_routes == 0 and r.routes == 900


def test_routes_are_joined_wherever_the_writer_put_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tokens: list[Token] = [
        (str(r), t, {la: rng.choice(8, 2, replace=False).tolist() for la in (0, 1, 2)})
        for t in range(40)
        for r in range(5)
    ]
    hook = cross_layer(write_tokens(tmp_path / "hook.jsonl", tokens, [0, 1, 2], k=2))
    major = cross_layer(
        write_tokens(tmp_path / "major.jsonl", tokens, [0, 1, 2], k=2, layer_major=True)
    )
    shuffled_lines = token_routes(tokens)
    order = rng.permutation(len(shuffled_lines))
    shuffled = cross_layer(
        write_log(
            tmp_path / "shuffled.jsonl",
            [shuffled_lines[i] for i in order],
            meta(layers_logged=[0, 1, 2], top_k=2, num_experts=8),
        )
    )
    by_hand = [
        joint_counts(
            np.array([by[a] for _, _, by in tokens]), np.array([by[b] for _, _, by in tokens]), 8
        )
        for a, b in ((0, 1), (1, 2))
    ]
    for r in (hook, major, shuffled):
        assert [p.joint.tolist() for p in r.pairs] == [j.tolist() for j in by_hand]
        assert r.unpaired_routes == 0


def test_a_token_missing_a_layer_is_counted_not_invented(tmp_path: Path) -> None:
    tokens: list[Token] = [
        ("a", 0, {0: [1], 1: [2], 2: [3]}),
        ("a", 1, {0: [1], 2: [3]}),  # no layer 1: both routes lack their partner
        ("a", 2, {0: [4], 1: [5]}),  # no layer 2: the route at layer 1 lacks one
        ("b", 0, {0: [1], 1: [2], 2: [3]}),
    ]
    r = cross_layer(write_tokens(tmp_path / "gaps.jsonl", tokens, [0, 1, 2], k=1))
    assert r.unpaired_routes == 3
    assert [p.tokens for p in r.pairs] == [3, 2]
    assert r.pairs[0].joint[4, 5] == 1 and r.pairs[0].joint[1, 2] == 2


def test_a_route_waits_for_its_partners_only_so_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that puts a token's layers further apart than the horizon gets its routes
    counted as unpaired; what waits stays within the horizon."""
    monkeypatch.setattr(crosslayer, "HORIZON_LINES", 50)
    tokens = copy_tokens(300, [0, 1], seed=4)
    path = write_tokens(tmp_path / "major.jsonl", tokens, [0, 1], k=1, layer_major=True)
    waiting: list[int] = []
    add = crosslayer.CrossLayerPass.add

    def spy(self: crosslayer.CrossLayerPass, chunk: Any) -> None:
        add(self, chunk)
        waiting.append(len(self._pending))

    monkeypatch.setattr(crosslayer.CrossLayerPass, "add", spy)
    monkeypatch.setattr("moeprof.analysis.reader.BLOCK_BYTES", 4096)
    r = cross_layer(path)
    assert r.unpaired_routes > 400
    assert r.pairs[0].tokens + r.unpaired_routes // 2 == 300
    assert len(waiting) > 10 and max(waiting) <= 50 + 40  # the horizon plus one block


def test_without_num_experts_the_matrix_grows_with_the_ids(tmp_path: Path) -> None:
    tokens = copy_tokens(120, [0, 1], experts=8)
    known = cross_layer(write_tokens(tmp_path / "k.jsonl", tokens, [0, 1], k=1, experts=8))
    unknown = cross_layer(write_tokens(tmp_path / "u.jsonl", tokens, [0, 1], k=1, experts=None))
    e = unknown.num_experts
    assert e == max(by[0][0] for _, _, by in tokens) + 1
    assert unknown.pairs[0].joint.tolist() == known.pairs[0].joint[:e, :e].tolist()
    assert unknown.pairs[0].mi_bits == pytest.approx(known.pairs[0].mi_bits)


def test_a_log_of_one_layer_is_skipped_in_one_line(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "one.jsonl", copy_tokens(30, [12]), [12], k=1)
    result = analyze_logs([path], analyses=["cross_layer"]).logs[0].extras["cross_layer"]
    assert result == Skipped("one logged layer (12): cross-layer routing needs two or more")
    code, out = run_cli("analyze", str(path), "--cross-layer")
    assert code == 0
    assert "cross_layer: skipped: one logged layer (12)" in out


# --------------------------------------------------------------------------- report, note, plot


@pytest.fixture(scope="module")
def coupled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three layers of top-2 of 8 experts: layer 1 picks expert (a + 1) % 8 for the top
    expert a of layer 0 on 3 tokens in 4; layer 2 is independent of layer 1."""
    rng = np.random.default_rng(7)
    tokens: list[Token] = []
    for i in range(2400):
        s0 = rng.choice(8, 2, replace=False).tolist()
        s1 = [(s0[0] + 1) % 8] if rng.random() < 0.75 else [int(rng.integers(8))]
        s1.append(int(rng.choice([e for e in range(8) if e != s1[0]])))
        s2 = rng.choice(8, 2, replace=False).tolist()
        tokens.append((str(i % 8), i // 8, {0: s0, 1: s1, 2: s2}))
    path = tmp_path_factory.mktemp("logs") / "coupled.jsonl"
    return write_tokens(path, tokens, [0, 1, 2], k=2)


def test_coupled_layers_stand_out_and_their_transitions_lead(coupled: Path) -> None:
    r = cross_layer(coupled)
    first, second = r.pairs
    assert first.mi_bits > 20 * first.baseline_bits
    assert second.mi_bits < 3 * second.baseline_bits
    assert {(t.expert, (t.expert + 1) % 8) for t in first.top} == {
        (t.expert, t.next_expert) for t in first.top
    }
    assert all(t.lift > 1.5 for t in first.top)


def test_terminal_table_and_note_show_the_numbers(coupled: Path) -> None:
    r = cross_layer(coupled)
    buf = io.StringIO()
    print_cross_layer(r, Console(file=buf, width=200, color_system=None))
    text = buf.getvalue()
    for p in r.pairs:
        assert f"{p.layer} -> {p.next_layer}" in text
        assert f"{p.mi_bits:.3f}" in text and f"{p.baseline_bits:.2g}" in text
    t = r.pairs[0].top[0]
    assert f"{t.expert}->{t.next_expert} lift {t.lift:.1f}" in text
    note = cross_layer_note(r)
    assert "bits" in note[0] and f"{r.pairs[0].mi_bits:.3f}" in note[0]
    report = analyze_logs([coupled], analyses=["cross_layer"])
    assert note[0] in markdown_note(report)


def test_cli_json_has_the_pairs_without_the_matrices(coupled: Path) -> None:
    code, out = run_cli("analyze", str(coupled), "--cross-layer", "--json")
    assert code == 0
    data = json.loads(out)["logs"][0]["extras"]["cross_layer"]
    r = cross_layer(coupled)
    assert [p["mi_bits"] for p in data["pairs"]] == [p.mi_bits for p in r.pairs]
    assert "joint" not in data["pairs"][0]
    assert data["pairs"][0]["top"][0]["lift"] == r.pairs[0].top[0].lift


def test_transitions_plot_draws_the_lift_of_the_chosen_pair(coupled: Path, tmp_path: Path) -> None:
    report: AnalysisReport = analyze_logs([coupled], analyses=["cross_layer"])
    fig = plots.figure(report, kind="transitions")
    ax = fig.axes[0]
    p = report.logs[0].extras["cross_layer"].pairs[0]
    drawn = ax.images[0].get_array()
    frequent = p.joint >= crosslayer.MIN_TRANSITION_TOKENS
    assert np.allclose(drawn[frequent], np.log2(p.lift()[frequent]))
    assert np.ma.getmaskarray(drawn)[~frequent].all() or np.isnan(drawn[~frequent]).all()
    assert ax.get_ylabel() == "expert at layer 0" and ax.get_xlabel() == "expert at layer 1"
    assert f"MI {p.mi_bits:.3f} bits" in ax.get_title()
    chosen = analyze_logs([coupled], analyses=["cross_layer"], layers=[1])
    assert "layer 1 -> 2" in plots.figure(chosen, kind="transitions").axes[0].get_title()
    last = analyze_logs([coupled], analyses=["cross_layer"], layers=[2])
    with pytest.raises(UserError, match="last logged layer"):
        plots.figure(last, kind="transitions")
    png = tmp_path / "t.png"
    code, _ = run_cli("plot", str(coupled), "--kind", "transitions", "--out", str(png))
    assert code == 0 and png.read_bytes().startswith(b"\x89PNG")


def test_transitions_plot_of_a_one_layer_log_says_why_not(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "one.jsonl", copy_tokens(30, [12]), [12], k=1)
    code, out = run_cli(
        "plot", str(path), "--kind", "transitions", "--out", str(tmp_path / "x.png")
    )
    assert code != 0
    assert "one logged layer" in out
