"""``moeprof export``: JSONL <-> Parquet without changing a byte or a bit, and the CSV set."""

from __future__ import annotations

import csv
import json
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from logfactory import dumps, hook_lines, meta, run_cli, skewed_routes

from moeprof import export as lib
from moeprof.analysis.load_balance import coefficient_of_variation, load_ratios
from moeprof.columns import END_KEY, META_KEY, route_schema

LAYERS = [0, 3, 12]
END = {"type": "end", "routes": 0, "dropped": 0, "stopped": None, "requests": 12}


def _hook_log(
    path: Path, *, end: bool = True, steps: bool = True, phases: bool = True, n: int = 12
) -> Path:
    """A log in the hook's exact bytes: meta line, route lines from the hook's formatter,
    and (``end``) its closing record."""
    routes = skewed_routes(n_requests=n, prompt=20, generated=12, layers=LAYERS, steps=steps)
    lines = hook_lines(
        [r["req_id"] for r in routes],
        [r["token_idx"] for r in routes],
        [r["layer"] for r in routes],
        [r["topk_ids"] for r in routes],
        [r["topk_weights"] for r in routes],
        [r.get("phase") if phases else None for r in routes],
        [r.get("step") for r in routes] if steps else None,
    )
    text = dumps(meta(layers_logged=LAYERS)) + "\n" + "\n".join(lines) + "\n"
    if end:
        text += dumps({**END, "routes": len(lines)}) + "\n"
    path.write_text(text)
    return path


def _footer(part: Path) -> dict[bytes, bytes]:
    """A part's footer key-value metadata: where the closing record goes (as the hook's sink
    writes it, when it closes the last part)."""
    return dict(pq.read_metadata(part).metadata or {})


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    parts = sorted(path.glob("part-*.parquet")) if path.is_dir() else [path]
    rows: list[dict[str, Any]] = []
    for part in parts:
        rows += pq.read_table(part, use_threads=False).to_pylist()
    return rows


@pytest.mark.parametrize("single_file", [False, True], ids=["directory", "single-file"])
def test_jsonl_to_parquet_and_back_gives_the_hooks_bytes(tmp_path: Path, single_file: bool) -> None:
    log = _hook_log(tmp_path / "routes.jsonl")
    lib.export(log, tmp_path / "routes.parquet", single_file=single_file)
    result = lib.export(tmp_path / "routes.parquet", tmp_path / "back.jsonl")
    assert (tmp_path / "back.jsonl").read_bytes() == log.read_bytes()
    assert result.complete and result.format == "jsonl"


@pytest.mark.parametrize(
    ("steps", "phases"), [(False, True), (True, False), (False, False)], ids=str
)
def test_logs_without_step_or_phase_round_trip_with_the_fields_left_out(
    tmp_path: Path, steps: bool, phases: bool
) -> None:
    log = _hook_log(tmp_path / "old.jsonl", end=False, steps=steps, phases=phases)
    lib.export(log, tmp_path / "old.parquet")
    lib.export(tmp_path / "old.parquet", tmp_path / "back.jsonl")
    assert (tmp_path / "back.jsonl").read_bytes() == log.read_bytes()


def test_random_float32_weights_survive_both_ways_bit_for_bit(tmp_path: Path) -> None:
    """Any float32 the router may produce: the weights read back from Parquet are the ones the
    JSONL line spells (7 digits), and spelling them again gives the same line."""
    rng = np.random.default_rng(3)
    n = 20_000
    weights = np.sort(rng.random((n, 4)).astype(np.float32) ** 4, axis=1)[:, ::-1]
    ids = np.argsort(rng.random((n, 60)), axis=1)[:, :4]
    lines = hook_lines(
        [str(i // 100) for i in range(n)],
        [i % 100 for i in range(n)],
        [12] * n,
        ids.tolist(),
        weights.tolist(),
        ["decode"] * n,
        [i // 10 for i in range(n)],
    )
    log = tmp_path / "w.jsonl"
    log.write_text(dumps(meta()) + "\n" + "\n".join(lines) + "\n")
    lib.export(log, tmp_path / "w.parquet")
    lib.export(tmp_path / "w.parquet", tmp_path / "back.jsonl")
    assert (tmp_path / "back.jsonl").read_bytes() == log.read_bytes()


def test_parquet_output_is_the_hooks_directory_layout(tmp_path: Path) -> None:
    log = _hook_log(tmp_path / "routes.jsonl")
    result = lib.export(log, tmp_path / "routes.parquet")
    parts = sorted(p.name for p in (tmp_path / "routes.parquet").iterdir())
    assert parts == ["part-00000.parquet"] and result.parts == 1
    schema = pq.read_schema(tmp_path / "routes.parquet" / parts[0])
    assert schema.remove_metadata().equals(route_schema(4))
    assert json.loads(schema.metadata[META_KEY])["layers_logged"] == LAYERS
    assert json.loads(_footer(tmp_path / "routes.parquet" / parts[0])[END_KEY]) == {
        **END,
        "routes": result.routes,
    }
    rows = _parquet_rows(tmp_path / "routes.parquet")
    first = json.loads(log.read_text().splitlines()[1])
    assert {k: v for k, v in rows[0].items()} == {k: v for k, v in first.items() if k != "type"} | {
        "topk_weights": pytest.approx(first["topk_weights"], rel=1e-6)
    }


def test_long_logs_are_split_into_parts_and_only_the_last_carries_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lib, "PART_ROWS", 400)
    monkeypatch.setattr(lib, "ROW_GROUP_ROWS", 150)
    log = _hook_log(tmp_path / "routes.jsonl")
    result = lib.export(log, tmp_path / "routes.parquet")
    parts = sorted((tmp_path / "routes.parquet").glob("part-*.parquet"))
    assert result.parts == len(parts) > 2
    ends = [END_KEY in _footer(p) for p in parts]
    assert ends == [False] * (len(parts) - 1) + [True]
    assert all(pq.read_metadata(p).num_rows <= 400 for p in parts)
    lib.export(tmp_path / "routes.parquet", tmp_path / "back.jsonl")
    assert (tmp_path / "back.jsonl").read_bytes() == log.read_bytes()


def test_a_log_cut_short_exports_without_an_end_and_says_so(tmp_path: Path) -> None:
    log = _hook_log(tmp_path / "cut.jsonl", end=False)
    code, out = run_cli("export", str(log), "-o", str(tmp_path / "cut.parquet"))
    assert code == 0
    assert "no closing record" in out
    assert END_KEY not in _footer(tmp_path / "cut.parquet" / "part-00000.parquet")


def test_existing_output_is_refused_without_force_and_replaced_with_it(tmp_path: Path) -> None:
    log = _hook_log(tmp_path / "routes.jsonl")
    out = tmp_path / "routes.parquet"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, text = run_cli("export", str(log), "-o", str(out))
    assert code == 2 and "already exists (use --force" in text
    assert (out / "stale.txt").exists()
    code, text = run_cli("export", str(log), "-o", str(out), "--force")
    assert code == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_bad_log_is_one_line_naming_file_and_line(tmp_path: Path) -> None:
    log = _hook_log(tmp_path / "bad.jsonl", end=False)
    lines = log.read_text().splitlines()
    lines[5] = lines[5].replace('"token_idx":', '"token_idx":-')
    log.write_text("\n".join(lines) + "\n")
    code, text = run_cli("export", str(log), "-o", str(tmp_path / "bad.parquet"))
    assert code == 2 and f"{log}:6:" in text
    assert not (tmp_path / "bad.parquet").exists()


def test_a_parquet_file_of_another_schema_is_one_line(tmp_path: Path) -> None:
    import pyarrow as pa

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), other)
    code, text = run_cli("export", str(other), "-o", str(tmp_path / "x.jsonl"))
    assert code == 2 and str(other) in text and "Traceback" not in text


def test_progress_is_reported_to_the_callback_up_to_the_total(tmp_path: Path) -> None:
    log = _hook_log(tmp_path / "routes.jsonl")
    seen: list[tuple[int, int | None]] = []
    result = lib.export(
        log, tmp_path / "r.parquet", on_progress=lambda done, total: seen.append((done, total))
    )
    assert seen[-1] == (result.routes, result.routes)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


# --------------------------------------------------------------------------- CSV set


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def csv_set(tmp_path: Path) -> tuple[Path, Path]:
    log = _hook_log(tmp_path / "routes.jsonl")
    code, text = run_cli("export", str(log), "--csv", str(tmp_path / "csv"))
    assert code == 0, text
    return log, tmp_path / "csv"


def _routes(log: Path) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, log.read_text().splitlines()[1:]) if r["type"] == "route"]


def test_csv_expert_load_counts_every_selection_by_layer_and_phase(
    csv_set: tuple[Path, Path],
) -> None:
    log, out = csv_set
    routes = _routes(log)
    rows = _read_csv(out / "expert_load.csv")
    for layer in LAYERS:
        for phase in ("all", "prefill", "decode"):
            mine = [r for r in routes if r["layer"] == layer and phase in ("all", r["phase"])]
            want = np.bincount([e for r in mine for e in r["topk_ids"]], minlength=60)
            got = [
                (int(r["count"]), float(r["share"]))
                for r in rows
                if r["layer"] == str(layer) and r["phase"] == phase
            ]
            assert [c for c, _ in got] == want.tolist()
            assert [s for _, s in got] == pytest.approx((want / want.sum()).tolist())


def test_csv_coselection_counts_pairs_picked_for_the_same_token(
    csv_set: tuple[Path, Path],
) -> None:
    log, out = csv_set
    routes = [r for r in _routes(log) if r["layer"] == 3]
    want: dict[tuple[int, int], int] = {}
    for r in routes:
        for a, b in combinations(sorted(r["topk_ids"]), 2):
            want[(a, b)] = want.get((a, b), 0) + 1
    got = {
        (int(r["expert_a"]), int(r["expert_b"])): int(r["count"])
        for r in _read_csv(out / "coselection.csv")
        if r["layer"] == "3"
    }
    assert got == want


def test_csv_step_load_is_each_steps_expert_imbalance(csv_set: tuple[Path, Path]) -> None:
    log, out = csv_set
    routes = _routes(log)
    rows = _read_csv(out / "step_load.csv")
    keys = sorted({(r["step"], r["layer"]) for r in routes})
    assert [(int(r["step"]), int(r["layer"])) for r in rows] == keys
    for row in rows[:: max(1, len(rows) // 20)]:
        mine = [
            r for r in routes if (r["step"], r["layer"]) == (int(row["step"]), int(row["layer"]))
        ]
        loads = np.bincount([e for r in mine for e in r["topk_ids"]], minlength=60)
        assert int(row["tokens"]) == len(mine)
        assert int(row["max_load"]) == loads.max()
        assert float(row["max_over_mean"]) == pytest.approx(load_ratios(loads)[0])
        assert float(row["cv"]) == pytest.approx(coefficient_of_variation(loads))
        assert int(row["active_experts"]) == np.count_nonzero(loads)


def test_csv_summary_has_the_records_and_analyze_numbers(csv_set: tuple[Path, Path]) -> None:
    log, out = csv_set
    summary = json.loads((out / "summary.json").read_text())
    routes = _routes(log)
    assert summary["routes"] == len(routes)
    assert summary["complete"] and summary["end"]["routes"] == len(routes)
    assert [x["layer"] for x in summary["layers"]] == LAYERS
    code, text = run_cli("analyze", str(log), "--json")
    assert code == 0
    analysed = json.loads(text[text.index("{") :])["logs"][0]["layers"]
    for mine, theirs in zip(summary["layers"], analysed, strict=True):
        assert mine["counts"] == theirs["stats"]["counts"]
        assert mine["gini"] == pytest.approx(theirs["stats"]["gini"])


def test_csv_of_a_parquet_log_equals_that_of_its_jsonl(
    csv_set: tuple[Path, Path], tmp_path: Path
) -> None:
    log, out = csv_set
    lib.export(log, tmp_path / "routes.parquet")
    lib.export_csv(tmp_path / "routes.parquet", tmp_path / "csv2")
    for name in ("expert_load.csv", "coselection.csv", "step_load.csv"):
        assert (tmp_path / "csv2" / name).read_bytes() == (out / name).read_bytes(), name


def test_csv_of_a_log_without_num_experts_sizes_experts_from_the_ids(tmp_path: Path) -> None:
    log = _hook_log(tmp_path / "routes.jsonl")
    lines = log.read_text().splitlines()
    lines[0] = dumps(meta(layers_logged=LAYERS, num_experts=None))
    log.write_text("\n".join(lines) + "\n")
    widest = max(e for r in _routes(log) for e in r["topk_ids"]) + 1
    lib.export_csv(log, tmp_path / "csv")
    rows = _read_csv(tmp_path / "csv" / "expert_load.csv")
    assert {int(r["expert"]) for r in rows} == set(range(widest))
    steps = _read_csv(tmp_path / "csv" / "step_load.csv")
    assert float(steps[0]["mean_load"]) == pytest.approx(4 * int(steps[0]["tokens"]) / widest)
