"""``moeprof.expert_counts`` and ``moeprof counts``: analyze's per-layer expert counts and
load-balance numbers, read the fast way, equal to what ``analyze`` reports, from JSONL, Parquet
and a run's rank files alike; a bad log is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from logfactory import (
    closed_log,
    meta,
    route,
    run_cli,
    sequential_routes,
    skewed_routes,
    write_log,
    write_parquet_log,
)

import moeprof
from moeprof.analysis.analyze import analyze_log
from moeprof.analysis.counts import ExpertCounts
from moeprof.analysis.reader import LogError
from moeprof.errors import UserError
from moeprof.export import export
from moeprof.render.numbers import num

LAYERS = (3, 7, 11)
HEADER = meta(layers_logged=list(LAYERS), moeprof_version="0.1.0")


def _log(path: Path, header: dict = HEADER, seed: int = 0) -> Path:
    body = skewed_routes(n_requests=4, prompt=12, generated=8, layers=LAYERS, seed=seed)
    return closed_log(path, body, header)


def _assert_counts_are_analyzes(counts: ExpertCounts, log: Path) -> None:
    report = analyze_log(log)
    assert counts.layers == LAYERS == tuple(la.layer for la in report.layers)
    assert counts.num_experts == report.num_experts
    assert counts.counts.shape == (len(LAYERS), report.num_experts)
    assert counts.counts.dtype == np.int64
    for i, la in enumerate(report.layers):
        assert counts.counts[i].tolist() == la.stats.counts
        assert counts.routes[i] == la.stats.tokens
        assert sorted(counts.by_phase) == sorted(la.by_phase)  # ours: unknown last
        for phase, stats in la.by_phase.items():
            assert counts.by_phase[phase][i].tolist() == stats.counts, phase
            assert counts.routes_by_phase[phase][i] == stats.tokens, phase


def test_counts_equal_analyzes_per_layer_and_phase_in_jsonl_and_parquet(tmp_path: Path) -> None:
    jsonl = _log(tmp_path / "routes.jsonl")
    parquet = tmp_path / "routes.parquet"
    export(jsonl, parquet)
    from_jsonl = moeprof.expert_counts(jsonl)
    assert list(from_jsonl.by_phase) == ["prefill", "decode"]
    _assert_counts_are_analyzes(from_jsonl, jsonl)
    from_parquet = moeprof.expert_counts(parquet)
    _assert_counts_are_analyzes(from_parquet, jsonl)
    assert from_parquet.warnings == from_jsonl.warnings == ()
    # the phases add up to every route, and a layer's counts to top_k per route
    np.testing.assert_array_equal(sum(from_parquet.by_phase.values()), from_parquet.counts)
    np.testing.assert_array_equal(from_parquet.counts.sum(axis=1), 4 * from_parquet.routes)
    with pytest.raises(ValueError, match="read-only"):
        from_parquet.counts[0, 0] = 1


def test_routes_without_a_phase_count_under_unknown(tmp_path: Path) -> None:
    body = sequential_routes({"0": 6, "1": 5}, layers=LAYERS)
    for r in body[:9]:
        r["phase"] = "prefill"
    log = write_log(tmp_path / "mixed.jsonl", body, HEADER)
    counts = moeprof.expert_counts(log)
    assert list(counts.by_phase) == ["prefill", "unknown"]
    _assert_counts_are_analyzes(counts, log)
    plain = write_log(tmp_path / "plain.jsonl", sequential_routes({"0": 4}, layers=LAYERS), HEADER)
    assert list(moeprof.expert_counts(plain).by_phase) == ["unknown"]


def test_rank_files_and_globs_count_as_one_run(tmp_path: Path) -> None:
    ranks = []
    for r in (0, 1):
        header = {**HEADER, "data_parallel_size": 2, "data_parallel_rank": r}
        body = skewed_routes(n_requests=3, prompt=8, generated=5, layers=LAYERS, seed=r)
        for rec in body:
            rec["req_id"] = f"{r}-{rec['req_id']}"
        ranks.append(write_log(tmp_path / f"routes.dp{r}.jsonl", body, header))
    export(ranks[1], tmp_path / "routes.dp1.parquet")
    single = [moeprof.expert_counts(p) for p in ranks]
    for paths in (ranks, str(tmp_path / "routes.dp*.jsonl"), [ranks[0], "routes.dp1.parquet"]):
        if isinstance(paths, list):
            paths = [tmp_path / p for p in paths]
        run = moeprof.expert_counts(paths)
        np.testing.assert_array_equal(run.counts, single[0].counts + single[1].counts)
        np.testing.assert_array_equal(run.routes, single[0].routes + single[1].routes)
        for phase in ("prefill", "decode"):
            both = single[0].by_phase[phase] + single[1].by_phase[phase]
            np.testing.assert_array_equal(run.by_phase[phase], both)
    with pytest.raises(UserError, match="names 2 logs"):
        moeprof.expert_counts([ranks[0], _log(tmp_path / "other.jsonl")])


def test_to_table_is_tidy_and_sums_to_the_counts(tmp_path: Path) -> None:
    counts = moeprof.expert_counts(_log(tmp_path / "routes.jsonl"))
    table = counts.to_table()
    assert table.column_names == ["layer", "phase", "expert", "count"]
    assert table.num_rows == len(LAYERS) * 2 * counts.num_experts  # zero counts included
    assert pc.sum(table["count"]).as_py() == int(counts.counts.sum())
    summed = table.group_by(["layer", "expert"]).aggregate([("count", "sum")])
    got = {(r["layer"], r["expert"]): r["count_sum"] for r in summed.to_pylist()}
    for i, layer in enumerate(LAYERS):
        assert [got[(layer, e)] for e in range(counts.num_experts)] == counts.counts[i].tolist()
    decode = table.filter(pc.equal(table["phase"], "decode"))
    assert decode["count"].to_numpy().tolist() == counts.by_phase["decode"].reshape(-1).tolist()


def test_num_experts_from_the_argument_or_inferred_as_analyze_does(tmp_path: Path) -> None:
    log = _log(tmp_path / "routes.jsonl", {**HEADER, "num_experts": None})
    inferred = moeprof.expert_counts(log)
    assert inferred.num_experts_source == "inferred"
    assert inferred.num_experts == analyze_log(log).num_experts == inferred.counts.shape[1]
    assert any("num_experts not in the meta" in w for w in inferred.warnings)
    given = moeprof.expert_counts(log, num_experts=64)
    assert (given.num_experts, given.num_experts_source) == (64, "--num-experts")
    assert given.counts.shape == (len(LAYERS), 64)
    np.testing.assert_array_equal(given.counts[:, : inferred.num_experts], inferred.counts)


# --------------------------------------------------------------------------- the command


def test_counts_json_gives_analyzes_numbers_per_layer(tmp_path: Path) -> None:
    jsonl = _log(tmp_path / "routes.jsonl")
    parquet = tmp_path / "routes.parquet"
    export(jsonl, parquet)
    code, out = run_cli("analyze", str(jsonl), "--json")
    assert code == 0
    analyzed = json.loads(out[out.index("{") :])["logs"][0]["layers"]
    code, out = run_cli("counts", str(parquet), "--json")
    assert code == 0, out
    got = json.loads(out)
    assert (got["num_experts"], got["top_k"], got["phases"]) == (60, 4, ["prefill", "decode"])
    for layer, want in zip(got["layers"], analyzed, strict=True):
        stats = want["stats"]
        assert layer["layer"] == want["layer"]
        assert layer["routes"] == stats["tokens"]
        for name in ("cv", "max_over_mean", "gini", "entropy_ratio", "never_used", "counts"):
            assert layer[name] == stats[name], name
        for phase, phase_stats in want["by_phase"].items():
            assert layer["by_phase"][phase] == phase_stats["counts"]
            assert layer["routes_by_phase"][phase] == phase_stats["tokens"]


def test_counts_table_prints_analyzes_numbers_for_a_layer(tmp_path: Path) -> None:
    log = _log(tmp_path / "routes.jsonl")
    report = analyze_log(log)
    stats = report.layers[1].stats
    code, out = run_cli("counts", str(log))
    assert code == 0, out
    assert out.startswith(f"routes.jsonl: {report.records} routes, E=60 (meta), top-4, 3 layers")
    (row,) = [line for line in out.splitlines() if line.startswith("│     7 │")]
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert cells == [
        "7",
        f"{stats.tokens:,}",
        "48",
        f"{stats.tokens - 48:,}",
        num(stats.cv),
        num(stats.max_over_mean),
        num(stats.gini),
        num(stats.entropy_ratio, ".0%"),
        str(len(stats.never_used)),
    ]


@pytest.mark.parametrize("form", ["jsonl", "parquet"])
def test_a_bad_log_is_one_line_naming_file_and_place(tmp_path: Path, form: str) -> None:
    body = sequential_routes({"0": 5}, layers=LAYERS)
    body[4] = route("0", 1, layer=LAYERS[1], ids=[5, 5, 6, 7], step=1)
    log = write_log(tmp_path / "bad.jsonl", body, HEADER)
    where = f"{log}:6: "
    if form == "parquet":
        log = write_parquet_log(tmp_path / "bad.parquet", body, HEADER, parts=0)
        where = f"{log}: row 5: "
    with pytest.raises(LogError, match=f"^{where}topk_ids repeats an expert"):
        moeprof.expert_counts(log)
    code, out = run_cli("counts", str(log))
    assert code == 2
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {where}topk_ids repeats"), out


def test_a_glob_matching_nothing_is_one_line(tmp_path: Path) -> None:
    code, out = run_cli("counts", str(tmp_path / "nothing*.jsonl"))
    assert code == 2
    assert out.strip().splitlines() == [f"error: {tmp_path}/nothing*.jsonl: no file matches"]
