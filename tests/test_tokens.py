"""``analyze --outputs``: which tokens each expert handles, and how token-specialised a layer is
(OLMoE's vocabulary specialisation against its value with no token dependence)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from logfactory import meta, route, run_cli, write_log

from moeprof.analysis import tokens as tok
from moeprof.analysis.analyze import analyze_log, analyze_logs
from moeprof.analysis.outputs import rank_ids, read_token_ids
from moeprof.analysis.passes import PassOptions, Skipped
from moeprof.analysis.reader import LogError
from moeprof.analysis.tokens import (
    SparseCounts,
    TokenAnalysis,
    Unjoined,
    load_tokenizer,
    null_specialization,
    token_lift,
    top_tokens,
    vocabulary_specialization,
)
from moeprof.analysis.validate import load_outputs
from moeprof.render.note import markdown_note
from moeprof.tiny import tiny_model_path

E, K = 16, 4
WORDS = [264, 401, 396, 491, 580, 271, 426, 272, 290, 300]
"""Token ids of the tiny tokenizer that decode to whole words or pieces (" the", ...)."""


def write_outputs(path: Path, records: list[dict[str, Any]]) -> Path:
    """An outputs.jsonl: each record's req_id and prompt/output token ids (counts derived)."""
    lines = []
    for r in records:
        rec = {"req_id": r["req_id"], "finish_reason": "length"}
        prompt, output = r.get("prompt_token_ids"), r.get("output_token_ids") or []
        rec["prompt_tokens"] = r.get("prompt_tokens", len(prompt or []))
        rec["generated_tokens"] = r.get("generated_tokens", len(output))
        if prompt is not None:
            rec["prompt_token_ids"] = prompt
            rec["output_token_ids"] = output
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


def experts_of(v: int) -> list[int]:
    """Layer 3 of the synthetic run routes token ``v`` to these experts, top-1 first."""
    return [(v + 3 * j) % E for j in range(K)]


def synthetic_run(tmp_path: Path, requests: int = 30, length: int = 40) -> tuple[Path, Path, dict]:
    """A log of two layers and its outputs: layer 3 routes each token to a fixed set of
    experts (a function of the token), layer 7 routes at random from a skewed load whatever
    the token. Returns (log, outputs, facts for the expected values)."""
    rng = np.random.default_rng(7)
    load = rng.dirichlet(np.full(E, 0.7))
    body, records = [], []
    occurrences: dict[int, int] = {}
    for r in range(requests):
        ids = [int(x) for x in rng.choice(WORDS, length, p=np.linspace(2, 1, len(WORDS)) / 15)]
        records.append(
            {"req_id": f"r{r}", "prompt_token_ids": ids[:30], "output_token_ids": ids[30:]}
        )
        for t in range(length - 1):  # the last sampled token is never fed back
            v = ids[t]
            occurrences[v] = occurrences.get(v, 0) + 1
            w = [0.4, 0.3, 0.2, 0.1]
            body.append(route(f"r{r}", t, 3, experts_of(v), w))
            random_ids = rng.choice(E, K, replace=False, p=load).tolist()
            body.append(route(f"r{r}", t, 7, random_ids, w))
    log = write_log(
        tmp_path / "run.jsonl",
        body,
        meta(layers_logged=[3, 7], num_experts=E, model_id=str(tiny_model_path())),
    )
    outputs = write_outputs(tmp_path / "outputs.jsonl", records)
    return log, outputs, {"occurrences": occurrences, "tokens": requests * (length - 1)}


def token_analysis(log: Path, outputs: Path | None, **opts: Any) -> TokenAnalysis | Skipped:
    a = analyze_log(log, analyses=["tokens"], options=PassOptions(outputs=outputs, **opts))
    return a.extras["tokens"]


# --------------------------------------------------------------------------- statistics


def test_lift_is_count_over_its_expectation_under_independence() -> None:
    pair = np.array([[6, 2], [0, 4]])
    lift = token_lift(pair, pair.sum(axis=1), pair.sum(axis=0), 12)
    # expected[0, 0] = 8 * 6 / 12 = 4, [0, 1] = 8 * 6 / 12 = 4, [1, 0] = 4 * 6 / 12 = 2
    assert lift.tolist() == [[1.5, 0.5], [0.0, 2.0]]
    assert np.isnan(token_lift(np.array([[0, 1]]), np.array([1]), np.array([0, 1]), 1)[0, 0])
    with pytest.raises(ValueError, match="`token_total` and `expert_total`"):
        token_lift(pair, np.array([1]), pair.sum(axis=0), 12)
    with pytest.raises(ValueError, match="`total`"):
        token_lift(pair, pair.sum(axis=1), pair.sum(axis=0), 0)


def test_vocabulary_specialization_is_the_top_experts_share_of_a_tokens_occurrences() -> None:
    counts = np.array([[3, 1], [0, 2], [1, 0]])
    occurrences = np.array([4, 2, 1])
    spec, mean = vocabulary_specialization(counts, occurrences, min_count=2)
    assert spec.tolist() == [0.75, 1.0, 1.0]
    assert mean == pytest.approx((0.75 + 1.0) / 2)  # the token seen once is left out
    assert vocabulary_specialization(counts, occurrences, min_count=1)[1] == pytest.approx(
        2.75 / 3
    )  # OLMoE's own mean, over every token
    assert math.isnan(vocabulary_specialization(counts, occurrences, min_count=5)[1])
    with pytest.raises(ValueError, match="`occurrences`"):
        vocabulary_specialization(counts, occurrences[:2])
    with pytest.raises(ValueError, match="more often than it occurs"):
        vocabulary_specialization(counts, np.array([2, 2, 1]))
    with pytest.raises(ValueError, match="`min_count`"):
        vocabulary_specialization(counts, occurrences, min_count=0)


def test_null_specialization_matches_its_expectation() -> None:
    one_route = np.array([[2, 5]])
    assert null_specialization(one_route, np.array([10, 3]), 6, top1=True) == 1.0
    assert null_specialization(one_route, np.array([10, 3]), 6, top1=False) == 1.0
    # two equally likely one-expert routes, tokens seen twice: spec is 1 (both draws agree,
    # probability 1/2) or 1/2, so its expectation is 3/4
    sample = np.array([[0], [1]])
    value = null_specialization(sample, np.full(20_000, 2), 2, top1=True, repeats=2)
    assert value == pytest.approx(0.75, abs=0.005)
    assert math.isnan(null_specialization(sample, np.zeros(0, np.int64), 2, top1=True))
    with pytest.raises(ValueError, match="`sample` must hold expert ids"):
        null_specialization(sample, np.array([2]), 1, top1=True)
    with pytest.raises(ValueError, match="`occurrences`"):
        null_specialization(sample, np.array([0, 2]), 2, top1=True)


def test_top_tokens_ranks_by_score_then_tiebreak_then_row() -> None:
    score = np.array([[1.0, 5.0], [3.0, 5.0], [3.0, 1.0], [9.0, 0.0]])
    eligible = np.array([[True, True], [True, True], [True, True], [False, True]])
    tiebreak = np.array([[0, 1], [0, 2], [1, 0], [0, 0]])
    out = top_tokens(score, eligible, 3, tiebreak)
    assert out.tolist() == [[2, 1, 0], [1, 0, 2]]
    assert top_tokens(score, np.zeros_like(eligible), 2).tolist() == [[-1, -1], [-1, -1]]


def test_sparse_counts_merge_to_the_exact_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tok, "_MERGE_MIN", 10)
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 50, 37) for _ in range(20)]
    sc = SparseCounts()
    for c in chunks:
        sc.add(c)
    sc.merge()
    keys, counts = np.unique(np.concatenate(chunks), return_counts=True)
    assert sc.keys.tolist() == keys.tolist() and sc.counts.tolist() == counts.tolist()


def test_the_null_draw_in_chunks_is_the_draw_in_one_go(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    sample = rng.integers(0, 9, (50, 3))
    occurrences = rng.integers(1, 40, 200)
    whole = [null_specialization(sample, occurrences, 9, top1=t, repeats=2) for t in (1, 0)]
    monkeypatch.setattr(tok, "_NULL_CHUNK", 7)  # chunks end inside tokens' occurrences
    assert [null_specialization(sample, occurrences, 9, top1=t, repeats=2) for t in (1, 0)] == (
        whole
    )


def test_ranks_are_numpys_unique_inverse_with_or_without_the_lookup_table() -> None:
    for ids in (np.array([7, 3, 7, 151_000, 0, 3]), np.array([5, -2, 1 << 40, 5])):
        vocab, ranks = rank_ids(ids)
        want_vocab, want_ranks = np.unique(ids, return_inverse=True)
        assert vocab.tolist() == want_vocab.tolist() and ranks.tolist() == want_ranks.tolist()
        assert ranks.dtype == np.int32


def test_token_ids_are_read_one_record_at_a_time_with_load_outputs_errors(
    tmp_path: Path,
) -> None:
    outputs = write_outputs(
        tmp_path / "o.jsonl",
        [
            {"req_id": "a", "prompt_token_ids": [5, 9, 5], "output_token_ids": [2]},
            {"req_id": "old", "prompt_tokens": 3, "generated_tokens": 1},
            {"req_id": "b", "prompt_token_ids": [9], "output_token_ids": []},
        ],
    )
    t = read_token_ids(outputs)
    assert t.rows == {"a": 0, "old": 1, "b": 2}
    assert t.offset.tolist() == [0, -1, 4] and t.length.tolist() == [4, 0, 1]
    assert t.vocab[t.ranks].tolist() == [5, 9, 5, 2, 9] and t.usable
    good = outputs.read_text().splitlines()
    bad = {
        "missing.jsonl": None,
        "empty.jsonl": "\n\n",
        "twice.jsonl": "\n".join([good[0], "", good[0]]) + "\n",
        "invalid.jsonl": "\r\n".join([good[0], '{"req_id": "x"}']),
    }
    said = {}
    for name, text in bad.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text, newline="")
        with pytest.raises(LogError) as want:
            load_outputs(path)
        with pytest.raises(LogError) as got:
            read_token_ids(path)
        assert str(got.value) == str(want.value)
        said[name] = str(got.value).removeprefix(str(path))
    assert said["missing.jsonl"] == ": no such file"
    assert said["empty.jsonl"] == ": no output records"
    assert said["twice.jsonl"] == ":3: req_id 'a' appears twice"
    assert said["invalid.jsonl"].startswith(":2: ")


def test_dense_and_sparse_counts_give_the_same_analysis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, outputs, _ = synthetic_run(tmp_path, requests=8)
    dense = token_analysis(log, outputs, extra={"min_token_count": 2})
    monkeypatch.setattr(tok, "DENSE_MAX_BYTES", 0)
    sparse = token_analysis(log, outputs, extra={"min_token_count": 2})
    assert isinstance(dense, TokenAnalysis) and dense == sparse


# --------------------------------------------------------------------------- a synthetic run


def test_token_determined_routing_is_fully_specialised_and_random_routing_is_not(
    tmp_path: Path,
) -> None:
    log, outputs, facts = synthetic_run(tmp_path)
    r = token_analysis(log, outputs)
    assert isinstance(r, TokenAnalysis)
    assert r.joined == r.routes == 2 * facts["tokens"] and r.unjoined == Unjoined()
    fixed, random = r.layers
    assert (fixed.layer, random.layer) == (3, 7)
    assert fixed.distinct_tokens == len(WORDS) == fixed.counted_tokens
    assert fixed.top1 == 1.0 and fixed.topk == 1.0
    assert fixed.top1_null < 0.6 and fixed.topk_null < 0.9
    # routes that ignore the token: specialisation is what the load alone gives
    assert random.top1 == pytest.approx(random.top1_null, abs=0.04)
    assert random.topk == pytest.approx(random.topk_null, abs=0.04)
    assert random.top1 < 0.6


def test_each_experts_top_tokens_are_the_ones_routed_to_it(tmp_path: Path) -> None:
    log, outputs, facts = synthetic_run(tmp_path)
    r = token_analysis(log, outputs, top=3)
    assert isinstance(r, TokenAnalysis)
    occ = facts["occurrences"]
    total = facts["tokens"]
    for ex in r.layers[0].experts:
        mine = sorted((v for v in occ if ex.expert in experts_of(v)), key=lambda v: (-occ[v], v))
        assert ex.selections == sum(occ[v] for v in mine)
        assert [t.token_id for t in ex.by_count] == mine[:3]
        assert [t.count for t in ex.by_count] == [occ[v] for v in mine[:3]]
        # every token of the expert has the same lift, total / selections; ties by count
        assert [t.token_id for t in ex.by_lift] == mine[:3]
        for t in ex.by_lift:
            assert t.lift == pytest.approx(total / ex.selections)


def test_token_texts_come_from_the_models_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    log, outputs, _ = synthetic_run(tmp_path, requests=6)
    r = token_analysis(log, outputs)
    assert isinstance(r, TokenAnalysis)
    ref = Tokenizer.from_file(str(tiny_model_path() / "tokenizer.json"))
    assert r.tokenizer == str(tiny_model_path() / "tokenizer.json") and r.tokenizer_note is None
    shown = [t for ex in r.layers[0].experts for t in ex.by_count]
    assert shown and all(t.text == ref.decode([t.token_id]) for t in shown)
    assert " the" in {t.text for t in shown}


def test_without_a_tokenizer_token_ids_are_shown_and_it_says_why(tmp_path: Path) -> None:
    log, outputs, _ = synthetic_run(tmp_path, requests=6)
    r = token_analysis(log, outputs, tokenizer=str(tmp_path / "no-such-tokenizer"))
    assert isinstance(r, TokenAnalysis)
    assert r.tokenizer is None and "no tokenizer for" in (r.tokenizer_note or "")
    assert all(t.text is None for ex in r.layers[0].experts for t in ex.by_count)
    code, out = run_cli(
        "analyze", str(log), "--outputs", str(outputs), "--tokenizer", str(tmp_path / "nope")
    )
    assert code == 0 and "token ids shown, not texts: no tokenizer for" in out
    assert '"' not in out.split("each expert's top tokens")[1].splitlines()[4]  # ids, #264


def test_a_hub_model_that_is_not_cached_is_not_fetched() -> None:
    decode, why = load_tokenizer("nobody/not-a-cached-model")
    assert decode is None and "not in the local cache" in why


# --------------------------------------------------------------------------- joins


def test_routes_without_a_token_are_counted_by_reason(tmp_path: Path) -> None:
    body = [route("a", t, 12, [0, 1, 2, 3]) for t in range(10)]  # 8 ids: 8 and 9 beyond
    body += [route("gone", t, 12, [0, 1, 2, 3]) for t in range(4)]  # no outputs record
    body += [route("old", t, 12, [0, 1, 2, 3]) for t in range(3)]  # record without ids
    log = write_log(tmp_path / "j.jsonl", body)
    outputs = write_outputs(
        tmp_path / "o.jsonl",
        [
            {"req_id": "a", "prompt_token_ids": WORDS[:5], "output_token_ids": WORDS[5:8]},
            {"req_id": "old", "prompt_tokens": 3, "generated_tokens": 1},
        ],
    )
    r = token_analysis(log, outputs)
    assert isinstance(r, TokenAnalysis)
    assert (r.routes, r.joined) == (17, 8)
    assert r.unjoined == Unjoined(no_record=4, no_token_ids=3, beyond_ids=2)
    assert r.requests_unjoined == 2
    code, out = run_cli("analyze", str(log), "--outputs", str(outputs))
    assert code == 0
    assert (
        "tokens: 8 of 17 routes joined to their token in o.jsonl (9 not: 4 of requests without "
        "an outputs record, 3 of requests whose record has no token ids, 2 beyond their "
        "request's token ids)"
    ) in out


def test_without_outputs_or_token_ids_the_analysis_says_why_in_one_line(tmp_path: Path) -> None:
    log = write_log(tmp_path / "s.jsonl", [route("a", t, 12) for t in range(3)])
    assert token_analysis(log, None) == Skipped("no --outputs file given")
    old = write_outputs(tmp_path / "old.jsonl", [{"req_id": "a", "prompt_tokens": 3}])
    skipped = token_analysis(log, old)
    assert isinstance(skipped, Skipped)
    assert skipped.reason.startswith(f"{old}: its records have no prompt_token_ids")
    other = write_outputs(tmp_path / "other.jsonl", [{"req_id": "b", "prompt_token_ids": [1]}])
    skipped = token_analysis(log, other)
    assert isinstance(skipped, Skipped) and "3 of requests without an outputs record" in (
        skipped.reason
    )
    code, out = run_cli("analyze", str(log), "--outputs", str(old))
    assert code == 0 and "tokens: skipped: " in out and "no prompt_token_ids" in out


# --------------------------------------------------------------------------- reports


def test_cli_prints_the_specialisation_table_and_json_has_every_layer(tmp_path: Path) -> None:
    log, outputs, _ = synthetic_run(tmp_path, requests=10)
    code, out = run_cli("analyze", str(log), "--outputs", str(outputs))
    assert code == 0
    assert "vocabulary specialisation (OLMoE)" in out and "100.0%" in out
    assert "layer 3: each expert's top tokens by count" in out and '" the"' in out
    assert "layer 3 is the most token-specialised" in out
    code, out = run_cli("analyze", str(log), "--outputs", str(outputs), "--json")
    data = json.loads(out[out.index("{") :])["logs"][0]["extras"]["tokens"]
    assert [la["layer"] for la in data["layers"]] == [3, 7]
    assert data["layers"][0]["top1"] == 1.0 and data["min_count"] == 10
    assert data["layers"][0]["experts"][0]["by_count"][0]["text"] is not None


def test_markdown_note_has_the_token_lines(tmp_path: Path) -> None:
    log, outputs, _ = synthetic_run(tmp_path, requests=10)
    report = analyze_logs([log], analyses=["tokens"], options=PassOptions(outputs=outputs))
    note = markdown_note(report)
    r = report.logs[0].extras["tokens"]
    lo, hi = r.layers[1], r.layers[0]
    assert f"for the top-1 expert from {100 * lo.top1:.1f}% (layer 7) to 100.0% (layer 3)" in note
    best = max(
        (ex for ex in hi.experts if ex.by_lift), key=lambda ex: (ex.by_lift[0].lift, -ex.expert)
    )
    assert (
        f"- Most specific tokens at layer 3 (lift): expert {best.expert}: "
        f'`"{best.by_lift[0].text}"` {best.by_lift[0].lift:.1f}x'
    ) in note


def test_min_count_is_an_option(tmp_path: Path) -> None:
    log, outputs, _ = synthetic_run(tmp_path, requests=2, length=12)
    few = token_analysis(log, outputs, extra={"min_token_count": 1000})
    assert isinstance(few, TokenAnalysis)
    assert few.min_count == 1000 and few.layers[0].counted_tokens == 0
    assert math.isnan(few.layers[0].top1) and all(not ex.by_lift for ex in few.layers[0].experts)


def test_a_log_without_num_experts_and_a_layer_without_routes(tmp_path: Path) -> None:
    body = [route("a", t, 3, [t % 5, 5, 6, 7]) for t in range(30)]
    header = meta(layers_logged=[3, 7], num_experts=None, model_id="nobody/none")
    log = write_log(tmp_path / "n.jsonl", body, header)
    outputs = write_outputs(tmp_path / "o.jsonl", [{"req_id": "a", "prompt_token_ids": WORDS * 3}])
    r = token_analysis(log, outputs, extra={"min_token_count": 3})
    assert isinstance(r, TokenAnalysis)
    used, empty = r.layers
    assert len(used.experts) == 8 and used.top1 == 1.0  # token t is WORDS[t % 10]: expert t % 5
    assert empty.routes == 0 and empty.experts == [] and math.isnan(empty.top1)
    assert r.tokenizer is None and "not in the local cache" in (r.tokenizer_note or "")
