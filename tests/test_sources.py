"""Several files at once (issue #14, part 3): globs, a run's data-parallel rank files read as
one log, unrelated logs kept apart, and JSON Lines and Parquet logs side by side."""

from __future__ import annotations

import json
from pathlib import Path

from logfactory import (
    dumps,
    end_record,
    meta,
    route,
    run_cli,
    sequential_routes,
    write_log,
    write_parquet_log,
)

from moeprof.analysis.sources import MultiLog, expand, open_logs


def _rank_meta(rank: int, size: int = 2, **fields: object) -> dict:
    return meta(moeprof_version="0.1.0", data_parallel_size=size, data_parallel_rank=rank, **fields)


def _ranks(tmp_path: Path, size: int = 2, given: tuple[int, ...] = (0, 1)) -> list[Path]:
    """Rank files as the hook names them: rank r serves requests 2r and 2r + 1."""
    paths = []
    for r in given:
        body = sequential_routes({str(2 * r): 4, str(2 * r + 1): 3})
        paths.append(
            write_log(
                tmp_path / f"routes.dp{r}.jsonl",
                [*body, end_record(len(body))],
                _rank_meta(r, size),
            )
        )
    return paths


def test_rank_files_are_validated_as_one_log(tmp_path: Path) -> None:
    paths = _ranks(tmp_path)
    code, out = run_cli("validate", *map(str, paths), "--json", "--require-complete")
    assert code == 0, out
    report = json.loads(out)  # one log: one report
    assert report["form"] == "several" and report["files"] == list(map(str, paths))
    assert report["path"] == str(tmp_path / "routes.dp[0-1].jsonl")
    assert report["routes"] == 14 and report["summary"]["requests"] == 4
    assert report["meta"]["data_parallel_ranks"] == [0, 1]
    assert "data_parallel_rank" not in report["meta"]
    assert report["complete"] is True and report["end"]["routes"] == 14


def test_a_quoted_glob_names_the_rank_files(tmp_path: Path) -> None:
    _ranks(tmp_path)
    code, out = run_cli("analyze", str(tmp_path / "routes.dp*.jsonl"), "--json")
    assert code == 0, out
    [log] = json.loads(out)["logs"]
    assert log["records"] == 14 and log["contamination"]["req_ids"] == 4


def test_merged_ranks_analyse_as_the_whole_run(tmp_path: Path) -> None:
    paths = _ranks(tmp_path)
    whole = [
        json.loads(line)
        for p in paths
        for line in p.read_text().splitlines()[1:-1]  # routes only
    ]
    single = write_log(tmp_path / "whole.jsonl", whole, meta())
    results = [
        json.loads(run_cli("analyze", *args, "--json")[1])["logs"][0]
        for args in ([str(single)], list(map(str, paths)))
    ]
    assert results[0]["layers"] == results[1]["layers"]
    assert results[0]["records"] == results[1]["records"] == 14


def test_a_request_in_two_ranks_is_an_error(tmp_path: Path) -> None:
    a = write_log(tmp_path / "routes.dp0.jsonl", sequential_routes({"7": 3}), _rank_meta(0))
    b = write_log(tmp_path / "routes.dp1.jsonl", sequential_routes({"7": 3}), _rank_meta(1))
    code, out = run_cli("validate", str(a), str(b), "--json")
    assert code == 1
    messages = [(e.get("file"), e["message"]) for e in json.loads(out)["errors"]]
    assert messages[0][0] == str(b) and f"req_id '7' is also in {a}" in messages[0][1]


def test_a_rank_files_bad_line_is_named_by_its_file_and_line(tmp_path: Path) -> None:
    paths = _ranks(tmp_path)
    lines = paths[1].read_text().splitlines()
    lines[2] = dumps(route("2", 1, ids=[1, 1, 2, 3], step=1))
    paths[1].write_text("\n".join(lines) + "\n")
    code, out = run_cli("validate", *map(str, paths))
    assert code == 1
    assert f"{paths[1]}:3: topk_ids repeats an expert" in out
    code, out = run_cli("analyze", *map(str, paths))
    assert code == 2 and f"{paths[1]}:3: topk_ids repeats" in out


def test_a_duplicate_in_a_rank_is_named_by_its_file_and_line(tmp_path: Path) -> None:
    paths = _ranks(tmp_path)
    lines = paths[1].read_text().splitlines()
    lines.insert(3, lines[1])
    paths[1].write_text("\n".join(lines[:-1]) + "\n")  # no closing record
    code, out = run_cli("validate", *map(str, paths), "--json")
    errors = json.loads(out)["errors"]
    assert code == 1
    assert (errors[0]["file"], errors[0]["line"]) == (str(paths[1]), 4)
    assert "duplicate route" in errors[0]["message"]


def test_missing_ranks_are_warned_about(tmp_path: Path) -> None:
    paths = _ranks(tmp_path, size=3)
    code, out = run_cli("validate", *map(str, paths), "--json")
    assert code == 0
    warnings = [w["message"] for w in json.loads(out)["warnings"]]
    assert "data-parallel rank 2 of 3 not given: their requests are not in this log" in warnings


def test_unrelated_logs_stay_apart(tmp_path: Path) -> None:
    a = write_log(tmp_path / "a.jsonl", sequential_routes({"0": 5}))
    b = write_log(tmp_path / "b.jsonl", sequential_routes({"0": 5}))
    code, out = run_cli("analyze", str(a), str(b), "--json")
    assert code == 0
    result = json.loads(out)
    assert len(result["logs"]) == 2 and result["comparisons"][0]["jsd"] == 0.0
    code, out = run_cli("validate", str(a), str(b), "--json")
    assert code == 0 and [r["path"] for r in json.loads(out)] == [str(a), str(b)]


def test_two_runs_of_the_same_settings_merge_per_run(tmp_path: Path) -> None:
    runs = [tmp_path / "run1", tmp_path / "run2"]
    for run in runs:
        run.mkdir()
        _ranks(run)
    logs = open_logs([str(tmp_path / "run*" / "routes.dp*.jsonl")])
    assert [type(log) for log in logs] == [MultiLog, MultiLog]
    assert [log.path for log in logs] == [r / "routes.dp[0-1].jsonl" for r in runs]


def test_a_pattern_matching_nothing_is_one_error_line(tmp_path: Path) -> None:
    for command in ("validate", "analyze", "compare"):
        pattern = str(tmp_path / "nothing*.jsonl")
        code, out = run_cli(command, pattern, *([pattern] if command == "compare" else []))
        assert code == 2
        assert out.strip().splitlines() == [f"error: {pattern}: no file matches this pattern"]


def test_glob_matches_come_in_natural_order(tmp_path: Path) -> None:
    for i in (10, 2, 1):
        (tmp_path / f"x{i}.jsonl").write_text("")
    assert [p.name for p in expand([str(tmp_path / "x*.jsonl")])] == [
        "x1.jsonl",
        "x2.jsonl",
        "x10.jsonl",
    ]


def test_jsonl_and_parquet_logs_side_by_side(tmp_path: Path) -> None:
    body = sequential_routes({"0": 6, "1": 4})
    jsonl = write_log(tmp_path / "a.jsonl", body)
    parquet = write_parquet_log(tmp_path / "b.parquet", body, parts=2)
    code, out = run_cli("analyze", str(jsonl), str(parquet), "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["comparisons"][0]["jsd"] == 0.0
    code, out = run_cli("compare", str(jsonl), str(parquet), "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["layers"][0]["same_set"] == report["layers"][0]["joined"] == len(body)


def test_compare_takes_each_runs_ranks_as_one_side(tmp_path: Path) -> None:
    runs = [tmp_path / "run1", tmp_path / "run2"]
    for run in runs:
        run.mkdir()
        _ranks(run)
    code, out = run_cli(
        "compare", str(runs[0] / "routes.dp*.jsonl"), str(runs[1] / "routes.dp*.jsonl"), "--json"
    )
    assert code == 0, out
    assert json.loads(out)["layers"][0]["joined"] == 14
    code, out = run_cli("compare", str(runs[0] / "routes.dp0.jsonl"))
    assert code == 2 and "compare needs two logs" in out


def test_parquet_rank_logs_are_one_log(tmp_path: Path) -> None:
    for r in (0, 1):
        body = sequential_routes({f"{r}a": 4, f"{r}b": 3})
        write_parquet_log(
            tmp_path / f"routes.dp{r}.parquet",
            body,
            _rank_meta(r),
            end=end_record(len(body)),
            parts=2,
        )
    code, out = run_cli("validate", str(tmp_path / "routes.dp*.parquet"), "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["path"] == str(tmp_path / "routes.dp[0-1].parquet")
    assert report["routes"] == 14 and report["complete"] is True
