"""Parquet logs (issue #14, part 3) read as JSON Lines logs are: the same routes, request codes
and checks, the same ``validate`` and ``analyze`` results, and bad rows located as
``routes.parquet/part-NNNNN.parquet: row N: reason`` with the reason a JSON Lines reader
gives for the same route. Wrong-shaped Parquet files are in tests/test_bad_inputs.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from logfactory import (
    assert_close,
    bad_routes,
    end_record,
    foreign_parquet_table,
    meta,
    parquet_twin,
    route,
    run_cli,
    sequential_routes,
    skewed_routes,
    twin_logs,
    write_log,
    write_parquet_log,
)

from moeprof import columns
from moeprof.analysis.reader import Issue, RouteChunk, open_log

LAYERS = (3, 7)
HEADER = meta(layers_logged=list(LAYERS), moeprof_version="0.1.0")


def _read(path: Path) -> tuple[dict[str, np.ndarray], list[str], list[Issue]]:
    """Every column of every chunk joined, request codes as names, and the issues."""
    log = open_log(path)
    issues: list[Issue] = []
    chunks = list(log.chunks(issues.append))
    cols = {
        f: np.concatenate([getattr(c, f) for c in chunks]) for f in RouteChunk.__dataclass_fields__
    }
    return cols, list(log.req_ids), issues


def _without_paths(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_paths(v) for k, v in obj.items() if k not in ("path", "lines", "form")}
    if isinstance(obj, list):
        return [_without_paths(v) for v in obj]
    return obj


@pytest.fixture
def twins(tmp_path: Path) -> tuple[Path, Path]:
    """The same routes as a JSON Lines log and a Parquet log of three parts, both closed."""
    body = skewed_routes(n_requests=6, prompt=20, generated=12, layers=LAYERS)
    return twin_logs(tmp_path, body, HEADER, parts=3)


def test_parquet_yields_the_routes_of_the_same_jsonl_log(twins: tuple[Path, Path]) -> None:
    jsonl, parquet = twins
    a, names_a, issues_a = _read(jsonl)
    b, names_b, issues_b = _read(parquet)
    assert issues_a == issues_b == []
    assert names_a == names_b  # request codes in the same first-seen order
    for f in ("ids", "layer", "token_idx", "phase", "step", "req"):
        np.testing.assert_array_equal(a[f], b[f], err_msg=f)
    assert a["weights"].dtype == b["weights"].dtype == np.float32
    assert a["weights"].tobytes() == b["weights"].tobytes()  # bit for bit
    np.testing.assert_array_equal(b["line"], np.arange(1, b["line"].size + 1))  # rows


def test_validate_reports_the_same_for_jsonl_and_parquet(twins: tuple[Path, Path]) -> None:
    reports = []
    for path in twins:
        code, out = run_cli("validate", str(path), "--json", "--require-complete")
        assert code == 0, out
        reports.append(json.loads(out))
    a, b = reports
    assert b["form"] == "parquet" and b["lines"] == a["routes"] == b["routes"]
    assert _without_paths(a) == _without_paths(b)
    code, text = run_cli("validate", str(twins[1]))
    assert "rows" in text and f"complete (closed cleanly: {a['routes']:,} routes)" in text


def test_analyze_reports_the_same_for_jsonl_and_parquet(twins: tuple[Path, Path]) -> None:
    results = []
    for path in twins:
        code, out = run_cli("analyze", str(path), "--json", "--reuse", "--cross-layer")
        assert code == 0, out
        results.append(json.loads(out))
    # equal up to float rounding: chunk boundaries (parts) change the order of float sums
    assert_close(_without_paths(results[0]), _without_paths(results[1]))


def test_a_single_parquet_file_is_a_log(tmp_path: Path) -> None:
    body = sequential_routes({"a": 4, "b": 3})
    path = write_parquet_log(tmp_path / "one.parquet", body, parts=0)
    assert path.is_file()
    cols, names, issues = _read(path)
    assert issues == [] and names == ["a", "b"] and cols["ids"].shape == (7, 4)


def test_bad_rows_are_named_by_part_and_row_with_the_jsonl_reasons(tmp_path: Path) -> None:
    body = bad_routes()
    jsonl = write_log(tmp_path / "bad.jsonl", [json.dumps(r) for r in body])
    parquet = parquet_twin(jsonl, tmp_path / "bad.parquet", parts=2)
    _, _, want = _read_lenient(jsonl)
    _, _, got = _read_lenient(parquet)
    assert [i.message for i in got] == [i.message for i in want]
    # rows 1-6 in part 0, 7-12 in part 1; lines count the meta, rows do not
    assert [(i.file, i.row, i.line) for i in got] == [
        (f"{parquet}/part-00000.parquet", 3, 3),
        (f"{parquet}/part-00000.parquet", 5, 5),
        (f"{parquet}/part-00001.parquet", 2, 8),
        (f"{parquet}/part-00001.parquet", 4, 10),
        (f"{parquet}/part-00001.parquet", 5, 11),
    ]
    code, text = run_cli("validate", str(parquet))
    assert code == 1
    assert f"{parquet}/part-00000.parquet: row 3: topk_ids repeats an expert: [5, 5, 6, 7]" in text


def _read_lenient(path: Path) -> tuple[int, list[str], list[Issue]]:
    log = open_log(path)
    issues: list[Issue] = []
    n = sum(len(c) for c in log.chunks(issues.append))
    return n, list(log.req_ids), issues


def test_duplicates_are_located_by_part_and_row(tmp_path: Path) -> None:
    body = sequential_routes({"0": 4})
    path = write_parquet_log(tmp_path / "dup.parquet", [*body, body[1]], parts=2)
    code, out = run_cli("validate", str(path), "--json")
    assert code == 1
    [error] = json.loads(out)["errors"]
    assert (error["file"], error["row"]) == (f"{path}/part-00001.parquet", 3)
    assert "duplicate route" in error["message"]


def test_other_writers_columns_read_the_same(tmp_path: Path) -> None:
    """Plain strings instead of dictionaries, variable lists of int64, float64 weights, no
    step column: the routes of the hook's layout, checked as strictly."""
    body = sequential_routes({"x": 5, "y": 4}, steps=False)
    body[3] = route("x", 3, ids=[0, 1, 2])  # three ids at top_k=4
    jsonl = write_log(tmp_path / "f.jsonl", body)
    table = foreign_parquet_table(body)
    pq.write_table(table, tmp_path / "f.parquet")
    a, names_a, issues_a = _read(jsonl)
    b, names_b, issues_b = _read(tmp_path / "f.parquet")
    assert names_a == names_b
    assert [i.message for i in issues_a] == [i.message for i in issues_b]
    assert [i.row for i in issues_b] == [4]
    for f in ("ids", "layer", "token_idx", "phase", "step", "req"):
        np.testing.assert_array_equal(a[f], b[f], err_msg=f)
    assert a["weights"].tobytes() == b["weights"].tobytes()


def test_closing_record_of_a_parquet_log(tmp_path: Path) -> None:
    body = sequential_routes({"0": 5})
    header = meta(moeprof_version="0.1.0")
    closed = write_parquet_log(tmp_path / "c.parquet", body, header, end=end_record(5), parts=2)
    code, out = run_cli("validate", str(closed), "--json", "--require-complete")
    assert code == 0 and json.loads(out)["complete"] is True
    cut = write_parquet_log(tmp_path / "cut.parquet", body, header, parts=2)
    code, out = run_cli("validate", str(cut), "--json")
    assert code == 0 and json.loads(out)["complete"] is False
    assert run_cli("validate", str(cut), "--require-complete")[0] == 1
    wrong = write_parquet_log(tmp_path / "w.parquet", body, header, end=end_record(9), parts=2)
    code, out = run_cli("validate", str(wrong), "--json")
    assert code == 1 and "counts 9 routes written" in json.loads(out)["errors"][0]["message"]


def test_closing_record_in_an_earlier_part_is_an_error(tmp_path: Path) -> None:
    body = sequential_routes({"0": 6})
    path = write_parquet_log(tmp_path / "e.parquet", body[:3], end=end_record(3))
    write_parquet_log(tmp_path / "more", body[3:])
    (tmp_path / "more" / "part-00000.parquet").rename(path / "part-00001.parquet")
    code, out = run_cli("validate", str(path), "--json")
    assert code == 1
    errors = [(e.get("file"), e["message"]) for e in json.loads(out)["errors"]]
    assert errors == [
        (f"{path}/part-00000.parquet", "a closing record in a part that is not the last")
    ]


def test_a_missing_part_is_an_error(tmp_path: Path) -> None:
    path = write_parquet_log(tmp_path / "gap.parquet", sequential_routes({"0": 9}), parts=3)
    (path / "part-00001.parquet").unlink()
    code, out = run_cli("validate", str(path), "--json")
    report = json.loads(out)
    assert code == 1 and report["routes"] == 6
    assert report["errors"][0]["message"] == (
        "parts missing: part-00001.parquet (their routes are lost)"
    )


def test_request_codes_follow_first_appearance_whatever_the_dictionary(tmp_path: Path) -> None:
    """Codes are given in order of first appearance, as in a JSON Lines log, also when a
    writer's dictionary lists the ids in another order or holds ids no row uses."""
    body = [route(r, t) for r, t in [("b", 0), ("a", 0), ("b", 1), ("c", 0), ("a", 1)]]
    cols = {name: [r[name] for r in body] for name in ("token_idx", "layer")}
    req = pa.DictionaryArray.from_arrays(
        pa.array([1, 0, 1, 3, 0], pa.int32()), pa.array(["a", "b", "unused", "c"])
    )
    table = pa.table(
        {
            "req_id": req,
            "token_idx": pa.array(cols["token_idx"], pa.int32()),
            "layer": pa.array(cols["layer"], pa.int16()),
            "topk_ids": pa.array([r["topk_ids"] for r in body], pa.list_(pa.int32(), 4)),
            "topk_weights": pa.array([r["topk_weights"] for r in body], pa.list_(pa.float32(), 4)),
        }
    ).replace_schema_metadata({columns.META_KEY: json.dumps(meta()).encode()})
    pq.write_table(table, tmp_path / "order.parquet")
    cols_read, names, issues = _read(tmp_path / "order.parquet")
    assert issues == [] and names == ["b", "a", "c"]
    np.testing.assert_array_equal(cols_read["req"], [0, 1, 0, 2, 1])


def test_num_experts_from_the_command_line_bounds_parquet_ids(tmp_path: Path) -> None:
    body = sequential_routes({"0": 5})
    path = write_parquet_log(tmp_path / "n.parquet", body, meta(num_experts=None), parts=2)
    code, out = run_cli("analyze", str(path), "--json", "--num-experts", "64")
    assert code == 0 and json.loads(out)["logs"][0]["num_experts"] == 64
    code, out = run_cli("analyze", str(path), "--num-experts", "8")
    assert code == 2 and "part-00000.parquet: row 1: expert id" in out
