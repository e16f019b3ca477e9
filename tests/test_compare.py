"""``moeprof compare A B``: two logs of the same prompts joined on (req_id, token_idx, layer).
Identical logs agree 100%; a layer's experts changed for some tokens gives exact shares and the
request's first diverging token; perturbed weights give their mean difference per expert;
requests and routes in one log only are counted; the join does not depend on line order, chunk
size or which log is indexed; bad input is one line and exit 2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from logfactory import meta, route, run_cli, write_log

from moeprof.analysis import reader
from moeprof.analysis.compare import ComparisonReport, compare_logs, route_agreement, sort_rows

Route = dict[str, Any]


def routes(requests: dict[str, int], layers: tuple[int, ...] = (0, 1)) -> list[Route]:
    """Every token of each request at each layer: 2 of 8 experts, weights by position."""
    out = []
    for req, n in requests.items():
        for t in range(n):
            for layer in layers:
                ids = [(t + layer) % 8, (t + layer + 3) % 8]
                out.append(route(req, t, layer, ids, [0.75, 0.25], step=t))
    return out


def write(path: Path, body: list[Route], **header: Any) -> Path:
    fields = {"layers_logged": [0, 1], "num_experts": 8, "top_k": 2, **header}
    return write_log(path, body, meta(**fields))


def changed(body: list[Route], where: Callable[[Route], bool], how: Callable[[Route], None]):
    """A copy of ``body`` with ``how`` applied to the routes ``where`` picks."""
    out = []
    for r in body:
        r = json.loads(json.dumps(r))
        if where(r):
            how(r)
        out.append(r)
    return out


@pytest.fixture
def base() -> list[Route]:
    return routes({"a": 10, "b": 10, "c": 10})


@pytest.fixture
def ref(tmp_path: Path, base: list[Route]) -> Path:
    return write(tmp_path / "ref.jsonl", base)


# --------------------------------------------------------------------------- statistics


def test_route_agreement_by_hand() -> None:
    ids_a = np.array([[1, 2], [1, 2], [1, 2], [1, 2]])
    w_a = np.array([[0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4]], np.float32)
    ids_b = np.array([[1, 2], [2, 1], [1, 3], [2, 1]])
    w_b = np.array([[0.5, 0.4], [0.4, 0.6], [0.6, 0.4], [0.6, 0.4]], np.float32)
    same, top1, diff = route_agreement(ids_a, w_a, ids_b, w_b)
    assert same.tolist() == [True, True, False, True]
    assert top1.tolist() == [True, False, True, False]
    # per expert: row 1 swapped places with its weights (0 apart); row 3 swapped ids only
    assert diff[[0, 1, 3]] == pytest.approx([0.1, 0.0, 0.4])
    assert np.isnan(diff[2])


def test_sort_rows_keeps_each_weight_with_its_expert() -> None:
    ids, w = sort_rows(np.array([[5, 1, 3]]), np.array([[0.5, 0.1, 0.3]]))
    assert ids.tolist() == [[1, 3, 5]] and w.tolist() == [[0.1, 0.3, 0.5]]


# --------------------------------------------------------------------------- known answers


def test_a_log_against_itself_agrees_completely(ref: Path) -> None:
    r = compare_logs(ref, ref)
    assert (r.joined, r.same_set, r.same_top1, r.only_a, r.only_b) == (60, 60, 60, 0, 0)
    assert (r.same_set_share, r.same_top1_share, r.weight_mean_abs_diff) == (1.0, 1.0, 0.0)
    assert (r.requests_both, r.diverged_requests, r.first_divergences) == (3, 0, [])
    assert r.identical and r.warnings == []
    code, out = run_cli("compare", str(ref), str(ref))
    assert code == 0
    assert "identical top-k sets 100% (60), same top-1 100% (60)" in out
    assert "every route agrees" in out


def test_line_order_does_not_matter(tmp_path: Path, base: list[Route], ref: Path) -> None:
    shuffled = [base[i] for i in np.random.default_rng(0).permutation(len(base))]
    r = compare_logs(ref, write(tmp_path / "shuffled.jsonl", shuffled))
    assert r.identical and r.joined == 60


def test_changed_experts_at_one_layer_give_exact_shares(
    tmp_path: Path, base: list[Route], ref: Path
) -> None:
    def other_set(r: Route) -> None:  # both experts move: a different set and top-1
        r["topk_ids"] = [(i + 1) % 8 for i in r["topk_ids"]]

    def swapped(r: Route) -> None:  # same set, the other one first, weights travel along
        r["topk_ids"].reverse()
        r["topk_weights"].reverse()

    body = changed(
        base, lambda r: r["req_id"] == "b" and r["layer"] == 1 and r["token_idx"] >= 6, other_set
    )
    body = changed(
        body, lambda r: r["req_id"] == "c" and r["layer"] == 0 and r["token_idx"] < 5, swapped
    )
    r = compare_logs(ref, write(tmp_path / "new.jsonl", body))
    assert (r.joined, r.same_set, r.same_top1) == (60, 56, 51)  # 4 sets differ, 4 + 5 top-1
    assert r.same_set_share == pytest.approx(56 / 60)
    assert r.weight_mean_abs_diff == 0.0  # the swapped routes' weights match per expert
    l0, l1 = r.layers
    assert (l0.layer, l0.joined, l0.same_set, l0.same_top1) == (0, 30, 30, 25)
    assert (l1.layer, l1.joined, l1.same_set, l1.same_top1) == (1, 30, 26, 26)
    assert r.diverged_requests == 1
    assert [(d.req_id, d.token_idx, d.layer) for d in r.first_divergences] == [("b", 6, 1)]
    code, out = run_cli("compare", str(ref), str(tmp_path / "new.jsonl"))
    assert code == 0 and "identical top-k sets 93.33% (56)" in out
    assert "req b: first at token 6 (layer 1)" in out


def test_perturbed_weights_give_their_mean_difference_per_expert(
    tmp_path: Path, base: list[Route], ref: Path
) -> None:
    def nudge(r: Route) -> None:
        r["topk_weights"] = [r["topk_weights"][0] + 0.01, r["topk_weights"][1] - 0.02]

    r = compare_logs(ref, write(tmp_path / "w.jsonl", changed(base, lambda r: True, nudge)))
    assert r.same_set == r.joined == 60 and r.weight_routes == 60
    assert r.weight_mean_abs_diff == pytest.approx(0.015, abs=1e-6)  # (0.01 + 0.02) / 2
    assert r.weight_max_abs_diff == pytest.approx(0.02, abs=1e-6)
    assert [la.weight_mean_abs_diff for la in r.layers] == pytest.approx([0.015] * 2, abs=1e-6)
    assert r.identical  # the same routing, only the weights moved


def test_requests_and_routes_in_one_log_only_are_counted(tmp_path: Path, ref: Path) -> None:
    other = write(tmp_path / "other.jsonl", routes({"b": 10, "c": 12, "d": 4}))
    r = compare_logs(ref, other)
    assert (r.requests_both, r.requests_only_a, r.requests_only_b) == (2, 1, 1)
    assert r.joined == 40  # b and c's first 10 tokens, 2 layers
    assert r.only_a == 20  # request a
    assert r.only_b == 2 * 2 + 4 * 2  # c's tokens 10-11, request d
    assert [(la.only_a, la.only_b) for la in r.layers] == [(10, 6), (10, 6)]
    assert r.same_set == r.joined and r.diverged_requests == 0
    swapped = compare_logs(other, ref)
    assert (swapped.only_a, swapped.only_b, swapped.joined) == (r.only_b, r.only_a, r.joined)


def test_a_layer_logged_in_one_log_only(tmp_path: Path, base: list[Route], ref: Path) -> None:
    one = [x for x in base if x["layer"] == 0]
    r = compare_logs(ref, write(tmp_path / "one.jsonl", one, layers_logged=[0]))
    assert [(la.layer, la.joined, la.only_a, la.only_b) for la in r.layers] == [
        (0, 30, 0, 0),
        (1, 0, 30, 0),
    ]
    assert np.isnan(r.layers[1].same_set_share)


def test_repeated_routes_are_joined_once_and_counted(
    tmp_path: Path, base: list[Route], ref: Path
) -> None:
    r = compare_logs(ref, write(tmp_path / "dup.jsonl", base + base[:3]))
    assert (r.joined, r.b.duplicates, r.a.duplicates, r.b.routes) == (60, 3, 0, 63)
    r = compare_logs(write(tmp_path / "dup.jsonl", base + base[:3]), ref)
    assert (r.joined, r.a.duplicates) == (60, 3)


def test_different_top_k_compares_top1_only_with_a_warning(tmp_path: Path, ref: Path) -> None:
    body = []
    for x in routes({"a": 10, "b": 10, "c": 10}):
        third = next(e for e in range(8) if e not in x["topk_ids"])
        body.append(dict(x, topk_ids=[*x["topk_ids"], third], topk_weights=[0.7, 0.2, 0.1]))
    r = compare_logs(ref, write(tmp_path / "k3.jsonl", body, top_k=3))
    assert r.same_set == 0 and r.same_top1 == 60
    assert r.warnings == [
        "the logs have different top_k (2 vs 3): no top-k set can agree; top-1 is still compared"
    ]


# --------------------------------------------------------------------------- streaming


def test_small_chunks_and_either_log_indexed_give_the_same_report(
    tmp_path: Path, base: list[Route], ref: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = changed(
        base,
        lambda r: r["token_idx"] in (3, 7) and r["layer"] == 1,
        lambda r: r.update(topk_ids=[5, 6]),
    )
    big = write(tmp_path / "big.jsonl", body + routes({"z": 40}))  # the larger file: streamed
    want = compare_logs(ref, big)
    monkeypatch.setattr(reader, "BLOCK_BYTES", 1024)  # a few lines a chunk
    got = compare_logs(ref, big)
    assert got == want
    back = compare_logs(big, ref)  # now ref is streamed and big indexed
    assert (back.joined, back.same_set, back.same_top1) == (
        want.joined,
        want.same_set,
        want.same_top1,
    )
    assert (back.only_a, back.only_b) == (want.only_b, want.only_a)
    assert back.weight_mean_abs_diff == pytest.approx(want.weight_mean_abs_diff)
    assert {d.req_id for d in back.first_divergences} == {"a", "b", "c"}


def test_divergences_are_listed_in_as_request_order_up_to_show(
    tmp_path: Path, base: list[Route], ref: Path
) -> None:
    body = changed(
        base,
        lambda r: r["token_idx"] == 8 - ord(r["req_id"]) + ord("a"),
        lambda r: (
            r.update(topk_ids=[5, 6]) if r["topk_ids"] != [5, 6] else r.update(topk_ids=[4, 6])
        ),
    )
    new = write(tmp_path / "n.jsonl", body[::-1])  # B's requests come in the other order
    r = compare_logs(ref, new, show=2)
    assert r.diverged_requests == 3
    assert [(d.req_id, d.token_idx, d.layer) for d in r.first_divergences] == [
        ("a", 8, 0),
        ("b", 7, 0),
    ]
    code, out = run_cli("compare", str(ref), str(new), "--show", "2")
    assert code == 0 and "... and 1 more" in out


def test_json_output(ref: Path, tmp_path: Path) -> None:
    other = write(tmp_path / "o.jsonl", routes({"a": 10}), device="NVIDIA H100", dtype="bfloat16")
    code, out = run_cli("compare", str(ref), str(other), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["joined"] == 20 and data["same_set_share"] == 1.0
    assert data["b"]["device"] == "NVIDIA H100" and data["b"]["dtype"] == "bfloat16"
    assert [la["layer"] for la in data["layers"]] == [0, 1]
    code, out = run_cli("compare", str(ref), str(other))
    assert "differ in: device (cpu vs NVIDIA H100), dtype (- vs bfloat16)" in out


def test_nothing_joined_prints_no_shares(tmp_path: Path, ref: Path) -> None:
    other = write(tmp_path / "o.jsonl", routes({"x": 3}))
    r = compare_logs(ref, other)
    assert r.joined == 0 and np.isnan(r.same_set_share) and not r.identical
    code, out = run_cli("compare", str(ref), str(other), "--json")
    assert code == 0 and json.loads(out)["same_set_share"] is None


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, ref: Path) -> None:
    code, out = run_cli("compare", str(ref), str(tmp_path / "missing.jsonl"))
    assert code == 2 and out.strip() == f"error: {tmp_path / 'missing.jsonl'}: no such file"
    broken = tmp_path / "broken.jsonl"
    broken.write_text(ref.read_text() + '{"type":"route","req_id":"a"}\n')
    code, out = run_cli("compare", str(broken), str(ref))
    assert code == 2 and len(out.strip().splitlines()) == 1 and "broken.jsonl:62" in out


def test_report_type(ref: Path) -> None:
    assert isinstance(compare_logs(ref, ref), ComparisonReport)
