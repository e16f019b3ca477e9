"""``moeprof analyze``: per-layer/phase statistics, contamination, comparison, note, JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from logfactory import dumps, meta, route, run_cli, sequential_routes, skewed_routes, write_log

from moeprof.analysis.analyze import analyze_log, analyze_logs
from moeprof.analysis.reader import LogError
from moeprof.render.note import markdown_note


def test_tiny_log_counts_and_metrics_match_hand_values(tmp_path: Path) -> None:
    body = [
        route("0", 0, ids=[0, 1], weights=[0.6, 0.2]),
        route("0", 1, ids=[1, 0], weights=[0.5, 0.3]),
        route("1", 0, ids=[2, 1], weights=[0.7, 0.1]),
        route("1", 1, ids=[1, 3], weights=[0.4, 0.4]),
    ]
    log = write_log(tmp_path / "t.jsonl", body, meta(top_k=2, num_experts=4))
    a = analyze_log(log, top=2)
    s = a.layers[0].stats
    assert s.counts == [2, 4, 1, 1] and s.tokens == 4 and s.selections == 8
    assert s.distribution == pytest.approx([0.25, 0.5, 0.125, 0.125])
    assert s.entropy_bits == pytest.approx(1.75)
    assert s.entropy_ratio == pytest.approx(1.75 / 2)
    assert [(t.expert, t.share) for t in s.top] == [(1, 0.5), (0, 0.25)]
    assert s.max_over_mean == pytest.approx(2.0) and s.min_over_mean == pytest.approx(0.5)
    assert s.weights.mean_top1 == pytest.approx((0.6 + 0.5 + 0.7 + 0.4) / 4)
    assert s.weights.mean_sum == pytest.approx(0.8)
    assert s.top_pairs is not None and s.top_pairs[0].experts == (0, 1)
    assert s.top_pairs[0].lift == pytest.approx(2 * 4 / (2 * 4))
    assert a.num_experts_source == "meta" and not a.contamination.suspicious


def test_phases_are_split_and_compared_when_the_log_has_them(tmp_path: Path) -> None:
    log = write_log(tmp_path / "p.jsonl", skewed_routes(n_requests=6, prompt=30, generated=20))
    la = analyze_log(log).layers[0]
    assert set(la.by_phase) == {"prefill", "decode"}
    assert la.by_phase["prefill"].tokens == 180 and la.by_phase["decode"].tokens == 6 * 19
    assert la.stats.tokens == 180 + 114
    assert la.phase_jsd is not None and 0 < la.phase_jsd < 1


def test_one_row_per_layer_for_multi_layer_logs(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "ml.jsonl",
        skewed_routes(n_requests=3, prompt=10, generated=5, layers=(2, 9)),
        meta(layers_logged=[2, 9]),
    )
    a = analyze_log(log)
    assert [la.layer for la in a.layers] == [2, 9]
    assert all(la.stats.tokens == 3 * 10 + 3 * 4 for la in a.layers)


def test_minimum_fields_log_infers_the_expert_count_with_a_warning(tmp_path: Path) -> None:
    body = [route("a", t, ids=[t % 5, 5], weights=[0.5, 0.5]) for t in range(10)]
    header = meta(top_k=2, num_experts=None, schema_version=None, prefix_caching=None)
    log = write_log(tmp_path / "min.jsonl", body, header)
    a = analyze_log(log)
    assert a.num_experts == 6 and a.num_experts_source == "inferred"
    assert any("max expert id + 1 = 6" in w for w in a.warnings)
    b = analyze_log(log, num_experts=8)
    assert b.num_experts == 8 and b.layers[0].stats.never_used == [6, 7]
    with pytest.raises(LogError, match=r"min.jsonl:2: expert id 5 is out of range"):
        analyze_log(log, num_experts=5)


def test_an_implausible_expert_id_without_num_experts_is_a_log_error(tmp_path: Path) -> None:
    body = [route("a", 0, ids=[70000, 1], weights=[0.5, 0.5])]
    log = write_log(tmp_path / "huge.jsonl", body, meta(top_k=2, num_experts=None))
    with pytest.raises(LogError, match=r"huge.jsonl: expert id 70000 is implausibly large"):
        analyze_log(log)


def _contaminated(tmp_path: Path) -> tuple[Path, Path]:
    clean = skewed_routes(n_requests=8, prompt=50, generated=30, seed=5)
    dummy = [route("0", t, ids=[1, 2, 3, 4], weights=[0.4, 0.3, 0.2, 0.1]) for t in range(1500)]
    return (
        write_log(tmp_path / "clean.jsonl", clean),
        write_log(tmp_path / "dirty.jsonl", dummy + clean),
    )


def test_dummy_batch_contamination_is_detected_and_can_be_excluded(tmp_path: Path) -> None:
    clean, dirty = _contaminated(tmp_path)
    a = analyze_log(dirty)
    c = a.contamination
    assert c.dummy_runs == 1 and c.dummy_records == 1500
    assert c.longest_run is not None and (c.longest_run.first_line, c.longest_run.last_line) == (
        2,
        1501,
    )
    # request 0 has 79 real tokens, at positions 0..78: keys the dummy batch used first, kept
    assert c.repeated_keys.after_dummy == 79 and c.repeated_keys.total == 79
    assert c.double_logged_records == 0 and c.key_scheme == "distinct"
    assert c.suspect_records == 1500 and c.kept_records == a.records - 1500
    assert any("--exclude-suspect" in w for w in a.warnings)
    top = a.layers[0].stats.top
    assert {t.expert for t in top} >= {1, 2}  # the dummy experts dominate the naive numbers

    b = analyze_log(dirty, exclude_suspect=True)
    ref = analyze_log(clean)
    assert b.excluded == 1500 and b.records == ref.records
    assert b.layers[0].stats.counts == ref.layers[0].stats.counts


def test_several_logs_are_compared_layer_by_layer_with_jsd(tmp_path: Path) -> None:
    clean, dirty = _contaminated(tmp_path)
    r = analyze_logs([clean, clean, dirty])
    jsd = {(Path(c.a).name, Path(c.b).name): c.jsd for c in r.comparisons}
    assert jsd[("clean.jsonl", "clean.jsonl")] == pytest.approx(0.0, abs=1e-12)
    assert jsd[("clean.jsonl", "dirty.jsonl")] > 0.05
    assert len(r.rows()) == 3


def test_markdown_note_is_short_and_names_top_experts_distribution_and_entropy(
    tmp_path: Path,
) -> None:
    log = write_log(tmp_path / "n.jsonl", skewed_routes())
    report = analyze_logs([log])
    note = markdown_note(report)
    lines = note.splitlines()
    assert 5 <= len(lines) <= 8 and all(ln.strip() for ln in lines)
    s = report.logs[0].layers[0].stats
    assert f"Top-3 experts: {s.top[0].expert} ({100 * s.top[0].share:.1f}%)" in note
    assert "Normalized distribution" in note and f"Entropy {s.entropy_bits:.2f}" in note
    assert "Routing is" in note


def test_markdown_note_warns_about_contamination(tmp_path: Path) -> None:
    clean, dirty = _contaminated(tmp_path)
    note = markdown_note(analyze_logs([dirty, clean]))  # caution and comparison lines both
    assert "- Caution: 1,500 of 2,132 records (70.4%) look suspect. Dummy batches: 1,500" in note
    assert "JSD" in note and len(note.splitlines()) == 8


def test_cli_writes_the_note_and_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    log = write_log(tmp_path / "n.jsonl", skewed_routes(n_requests=3, prompt=10, generated=5))
    note = tmp_path / "note.md"
    code, out = run_cli("analyze", str(log), "--markdown", str(note))
    assert code == 0 and note.read_text().startswith("## MoE routing: test/tiny-moe, layer 12")
    note.write_text("mine")
    code, out = run_cli("analyze", str(log), "--markdown", str(note))
    assert code == 2 and "already exists (use --force to overwrite)" in out
    assert note.read_text() == "mine"
    assert run_cli("analyze", str(log), "--markdown", str(note), "--force")[0] == 0
    assert note.read_text() != "mine"


def test_cli_json_is_valid_json_with_nulls_for_undefined_numbers(tmp_path: Path) -> None:
    log = write_log(tmp_path / "j.jsonl", sequential_routes({"0": 4}), meta(layers_logged=[12, 13]))
    code, out = run_cli("analyze", str(log), "--json", "--top", "2")
    assert code == 0
    data = json.loads(out[out.index("{") :])
    layers = data["logs"][0]["layers"]
    assert layers[0]["stats"]["tokens"] == 4 and len(layers[0]["stats"]["top"]) == 2
    assert layers[1]["stats"]["tokens"] == 0 and layers[1]["stats"]["cv"] is None
    assert data["logs"][0]["contamination"]["suspect_share"] == 0.0


def test_cli_table_and_exclude_suspect_flag(tmp_path: Path) -> None:
    _, dirty = _contaminated(tmp_path)
    code, out = run_cli("analyze", str(dirty))
    assert code == 0 and "contamination: 1,500 of 2,132 records" in out and "entropy" in out
    code, out = run_cli("analyze", str(dirty), "--exclude-suspect")
    assert code == 0 and "1,500 suspect records excluded" in out


def test_cli_refuses_an_invalid_log_with_one_line_naming_file_and_line(tmp_path: Path) -> None:
    bad = write_log(
        tmp_path / "bad.jsonl", [route("0", 0), dumps(route("0", 1))[:30]], trailing_newline=False
    )
    code, out = run_cli("analyze", str(bad))
    assert code == 2
    assert f"{bad}:3: truncated last line" in out and len(out.strip().splitlines()) == 1
    code, out = run_cli("analyze", str(tmp_path / "absent.jsonl"))
    assert code == 2 and "absent.jsonl: no such file" in out


def test_undefined_statistics_of_an_empty_layer_are_nan_not_errors(tmp_path: Path) -> None:
    log = write_log(tmp_path / "e.jsonl", [])
    a = analyze_log(log)
    s = a.layers[0].stats
    assert s.tokens == 0 and math.isnan(s.gini) and s.entropy_bits == 0.0
    assert any("no routes" in w for w in a.warnings)
    assert np.isnan(s.weights.mean_top1)
