"""The Python API: ``moeprof.load`` gives the log as a table with its records attached,
``moeprof.analyze``/``validate`` the dataclasses the CLI prints, and ``import moeprof`` stays
cheap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from logfactory import dumps, hook_lines, meta, run_cli, skewed_routes

import moeprof
from moeprof.analysis.analyze import AnalysisReport
from moeprof.analysis.reader import LogError
from moeprof.columns import route_schema
from moeprof.errors import UserError
from moeprof.export import export

LAYERS = [0, 3]


def _log(path: Path, *, first_req: int = 0, end: bool = True) -> Path:
    routes = skewed_routes(n_requests=4, prompt=10, generated=6, layers=LAYERS)
    lines = hook_lines(
        [str(int(r["req_id"]) + first_req) for r in routes],
        [r["token_idx"] for r in routes],
        [r["layer"] for r in routes],
        [r["topk_ids"] for r in routes],
        [r["topk_weights"] for r in routes],
        [r["phase"] for r in routes],
        [r["step"] for r in routes],
    )
    text = dumps(meta(layers_logged=LAYERS)) + "\n" + "\n".join(lines) + "\n"
    if end:
        text += dumps({"type": "end", "routes": len(lines)}) + "\n"
    path.write_text(text)
    return path


def test_load_gives_every_route_as_a_typed_table_with_the_meta(tmp_path: Path) -> None:
    log = _log(tmp_path / "routes.jsonl")
    table = moeprof.load(log)
    assert isinstance(table, pa.Table)
    assert table.schema.remove_metadata().equals(route_schema(4))
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    routes = [r for r in lines if r["type"] == "route"]
    assert table.num_rows == len(routes)
    first = table.slice(0, 1).to_pylist()[0]
    assert first["req_id"] == routes[0]["req_id"] and first["topk_ids"] == routes[0]["topk_ids"]
    assert first["topk_weights"] == pytest.approx(routes[0]["topk_weights"], rel=1e-6)
    assert moeprof.meta(table) == lines[0]
    assert moeprof.end(table) == lines[-1]


def test_a_parquet_log_loads_to_the_same_table(tmp_path: Path) -> None:
    log = _log(tmp_path / "routes.jsonl")
    export(log, tmp_path / "routes.parquet")
    export(log, tmp_path / "one.parquet", single_file=True)
    expected = moeprof.load(log)
    for path in (tmp_path / "routes.parquet", tmp_path / "one.parquet"):
        table = moeprof.load(path)
        assert table.equals(expected), path
        assert moeprof.meta(table) == moeprof.meta(expected)
        assert moeprof.end(table) == moeprof.end(expected)


def test_several_rank_logs_and_globs_load_as_one_run(tmp_path: Path) -> None:
    dp0 = _log(tmp_path / "routes.dp0.jsonl")
    dp1 = _log(tmp_path / "routes.dp1.jsonl", first_req=100)
    table = moeprof.load([dp0, dp1])
    assert table.num_rows == moeprof.load(dp0).num_rows + moeprof.load(dp1).num_rows
    assert [s["path"] for s in moeprof.sources(table)] == [str(dp0), str(dp1)]
    assert moeprof.load(str(tmp_path / "routes.dp*.jsonl")).equals(table)


def test_a_run_without_closing_records_has_no_end(tmp_path: Path) -> None:
    dp0 = _log(tmp_path / "a.jsonl")
    dp1 = _log(tmp_path / "b.jsonl", end=False)
    assert moeprof.end(moeprof.load([dp0, dp1])) is None


def test_load_as_pandas_carries_the_records_in_attrs(tmp_path: Path) -> None:
    pytest.importorskip("pandas")
    log = _log(tmp_path / "routes.jsonl")
    df = moeprof.load(log, as_="pandas")
    assert len(df) == moeprof.load(log).num_rows
    assert list(df.columns) == route_schema(4).names
    assert moeprof.meta(df)["layers_logged"] == LAYERS
    assert df.groupby("layer").size().to_dict() == {0: len(df) // 2, 3: len(df) // 2}


def test_load_as_pandas_without_pandas_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        moeprof.load(_log(tmp_path / "routes.jsonl"), as_="pandas")


def test_a_bad_log_raises_one_line_naming_file_and_line(tmp_path: Path) -> None:
    log = _log(tmp_path / "routes.jsonl")
    lines = log.read_text().splitlines()
    lines[3] = lines[3].replace('"layer":0', '"layer":7')
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(LogError, match=rf"^{log}:4: "):
        moeprof.load(log)
    with pytest.raises(UserError, match="no such file"):
        moeprof.load(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="no file matches"):
        moeprof.load(str(tmp_path / "nothing*.jsonl"))


def test_analyze_returns_what_the_cli_prints_as_json(tmp_path: Path) -> None:
    log = _log(tmp_path / "routes.jsonl")
    report = moeprof.analyze(log, layers="3")
    assert isinstance(report, AnalysisReport)
    code, out = run_cli("analyze", str(log), "--layer", "3", "--json")
    assert code == 0
    assert report.to_dict() == json.loads(out[out.index("{") :])
    assert [layer.layer for layer in report.logs[0].layers] == [3]


def test_validate_returns_the_report_the_cli_prints(tmp_path: Path) -> None:
    report = moeprof.validate(_log(tmp_path / "routes.jsonl"))
    assert report.valid


def test_importing_moeprof_loads_neither_pyarrow_nor_numpy_nor_vllm() -> None:
    code = (
        "import sys, moeprof; moeprof.load; moeprof.analyze; "
        "print(sorted(m for m in ('pyarrow', 'numpy', 'vllm', 'torch', 'pydantic') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
