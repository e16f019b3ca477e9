"""Reader edge cases of issue #15 (defect 8), each reproduced for real: a real pipe and FIFO,
/dev/zero, files with a deeply nested line, a multi-megabyte meta line, a repeated key.

Every case must end in ``file:line: reason`` lines (or one ``file: reason`` line), a non-zero
exit and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from logfactory import dumps, meta, route, run_cli, write_log

from moeprof.analysis.reader import BLOCK_BYTES, DECODERS, Issue, open_log

PIPE_REASON = "cannot read from a pipe; save the log to a file first"
PLOT_ARGS = ("-o", "out.png")


def _routes(n: int = 49) -> list[str]:
    """``n`` valid routes in the hook's layout: requests of 4 tokens each."""
    return [dumps(route(req_id=str(i // 4), token_idx=i % 4)) for i in range(n)]


def _text(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def _moeprof(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> tuple[int, str]:
    """``python -m moeprof ARGS`` in a child process (a real stdin pipe; a hang is a failure)."""
    proc = subprocess.run(
        [sys.executable, "-m", "moeprof", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        cwd=cwd,
    )
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert "Traceback" not in out, out
    return proc.returncode, out


def _cmd(command: str, path: str) -> list[str]:
    return [command, path, *(PLOT_ARGS if command == "plot" else ())]


# ---------------------------------------------------------------------- pipes and FIFOs


@pytest.mark.parametrize("command", ["validate", "analyze", "plot"])
@pytest.mark.parametrize("name", ["/dev/stdin", "-"])
def test_pipe_is_refused_in_one_line(tmp_path: Path, command: str, name: str) -> None:
    """``cat log | moeprof validate /dev/stdin`` used to die with ``OSError: Illegal seek``."""
    data = _text([dumps(meta()), *_routes()])
    code, out = _moeprof(*_cmd(command, name), stdin=data, cwd=tmp_path)
    assert code == 2, out
    assert out.strip().splitlines() == [f"error: {name}: {PIPE_REASON}"], out
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("command", ["validate", "analyze", "plot"])
def test_fifo_is_refused_in_one_line(tmp_path: Path, command: str) -> None:
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    data = _text([dumps(meta()), *_routes()])

    def feed() -> None:  # the writer end: blocks in open() until moeprof opens the FIFO
        try:
            with fifo.open("wb") as w:
                w.write(data)
        except BrokenPipeError:  # moeprof refused and closed its end
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    code, out = _moeprof(*_cmd(command, str(fifo)), cwd=tmp_path)
    writer.join(timeout=30)
    assert code == 2, out
    assert f"{fifo}: {PIPE_REASON}" in out
    assert len(out.strip().splitlines()) == 1, out


# ---------------------------------------------------------------------- bad lines in files


def _deep_array() -> str:
    return "[" * 1000 + "]" * 1000


def _deep_object() -> str:
    return '{"a":' * 1000 + "1" + "}" * 1000


def _repeated_key_hook_layout() -> str:
    """A route in the hook's byte layout with ``token_idx`` given again at the end; the last
    value (3) would collide with line 5, which is where the fault used to be reported."""
    return dumps(route(req_id="0", token_idx=0))[:-1] + ',"token_idx":3}'


def _spaced(lines: list[str]) -> list[str]:
    """The same records with json.dumps' default spacing (not the hook's layout: msgspec)."""
    return [json.dumps(json.loads(line)) for line in lines]


def _repeated_key_spaced() -> list[str]:
    routes = _spaced(_routes())
    routes[0] = routes[0][:-1] + ', "token_idx": 3}'
    return routes


def _long_meta() -> str:
    return dumps(meta(note="x" * 5_000_000))  # over the 4 MiB line limit


CASES = {
    # name: (lines after the meta, the meta line, bad line number, a word of the reason)
    "nested-array": ([*_routes(2), _deep_array(), *_routes(3)[2:]], None, 4, "recursion"),
    "nested-object": ([*_routes(2), _deep_object(), *_routes(3)[2:]], None, 4, "recursion"),
    "nested-first-route": ([_deep_object(), *_routes(3)], None, 2, "recursion"),
    "nested-meta": ([*_routes(3)], _deep_object(), 1, "recursion"),
    "long-route-line": (
        [*_routes(2), "x" * (BLOCK_BYTES + 10), *_routes(3)[2:]],
        None,
        4,
        "longer",
    ),
    "long-meta": (_routes(), _long_meta(), 1, "longer"),
    "repeated-key": ([_repeated_key_hook_layout(), *_routes()[1:]], None, 2, "repeated"),
    "repeated-key-spaced": (_repeated_key_spaced(), None, 2, "repeated"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_line_is_reported_on_its_line(tmp_path: Path, case: str) -> None:
    routes, header, line, word = CASES[case]
    log = write_log(tmp_path / f"{case}.jsonl", routes, header)
    code, out = run_cli("validate", str(log), "--json")
    assert code == 1, out
    report = json.loads(out)
    errors = [(e["line"], e["message"]) for e in report["errors"]]
    assert errors, out
    first_line, first_message = errors[0]
    assert first_line == line, errors
    assert word in first_message.lower(), errors
    assert all(n == line for n, _ in errors if n is not None), errors  # no false errors after it
    assert report["lines"] == 1 + len(routes), report["lines"]  # the long meta counted 51


@pytest.mark.parametrize("case", ["nested-object", "repeated-key", "long-route-line"])
@pytest.mark.parametrize("command", ["analyze", "plot"])
def test_bad_line_stops_analyze_and_plot_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, command: str
) -> None:
    monkeypatch.chdir(tmp_path)
    routes, header, line, word = CASES[case]
    log = write_log(tmp_path / f"{case}.jsonl", routes, header)
    code, out = run_cli(*_cmd(command, str(log)))
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and f"{log}:{line}:" in lines[0] and word in lines[0].lower(), out


def test_long_meta_under_the_limit_reads_right(tmp_path: Path) -> None:
    routes = _routes()
    log = write_log(tmp_path / "meta.jsonl", routes, dumps(meta(note="x" * (BLOCK_BYTES - 4096))))
    code, out = run_cli("validate", str(log), "--json")
    report = json.loads(out)
    assert code == 0, out
    assert report["lines"] == 1 + len(routes)
    assert report["routes"] == len(routes)


def _with_extra(line: str, extra: str) -> str:
    return line[:-1] + extra + "}"


REPEATED = {
    "hook": [_repeated_key_hook_layout(), *_routes()[1:]],
    "spaced": _repeated_key_spaced(),
    # an optional field twice, in a log whose other lines do not have it
    "step-twice": [_with_extra(_routes(1)[0], ',"step":1,"step":2'), *_routes()[1:]],
    "step-twice-spaced": [
        _with_extra(_spaced(_routes(1))[0], ', "step": 1, "step": 2'),
        *_spaced(_routes())[1:],
    ],
    # the repeat spelled with an escape (the same key to a JSON decoder)
    "escaped": [_with_extra(_routes(1)[0], ',"token\\u005fidx":3'), *_routes()[1:]],
}


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("case", list(REPEATED))
def test_repeated_key_every_decoder(tmp_path: Path, decoder: str, case: str) -> None:
    """All decoders name the line with the repeated key, whatever the layout."""
    routes = REPEATED[case]
    log = open_log(write_log(tmp_path / f"{case}.jsonl", routes), decoder=decoder)  # type: ignore[arg-type]
    issues: list[Issue] = []
    n = sum(len(c) for c in log.chunks(issues.append))
    assert [(i.line, "repeated" in i.message) for i in issues if i.line] == [(2, True)]
    assert n == len(routes) - 1


@pytest.mark.parametrize("decoder", DECODERS)
def test_nulls_and_extra_fields_are_not_repeats(tmp_path: Path, decoder: str) -> None:
    """Lines with more colons than fields (null phase, extra fields, colons in strings) are
    checked more closely, and still read as valid."""
    routes = [
        json.dumps({**route(req_id=f"r:{i // 4}", token_idx=i % 4), "phase": None, "x": "a:b"})
        for i in range(200)
    ]
    log = open_log(write_log(tmp_path / "nulls.jsonl", routes), decoder=decoder)  # type: ignore[arg-type]
    issues: list[Issue] = []
    assert sum(len(c) for c in log.chunks(issues.append)) == len(routes)
    assert issues == []


def test_dev_zero_stops_with_an_error_on_line_1() -> None:
    """``validate /dev/zero`` used to read forever."""
    code, out = _moeprof("validate", "/dev/zero")
    assert code == 1, out
    assert "/dev/zero:1: line longer than" in out


# ---------------------------------------------------------------------- Parquet logs


def _parquet_table(**replace: object) -> object:
    """A valid one-part table of 8 routes (``columns.routes_batch``), with columns replaced
    (None drops one) and, with ``metadata=...``, other key-value metadata."""
    import pyarrow as pa
    from logfactory import route_columns

    from moeprof import columns

    batch = columns.routes_batch(**route_columns([route(str(i // 4), i % 4) for i in range(8)]))
    table = pa.Table.from_batches([batch])
    for name, col in replace.items():
        if name == "metadata":
            continue
        table = table.drop_columns([name])
        if col is not None:
            table = table.append_column(name, col)
    metadata = replace.get("metadata", {columns.META_KEY: dumps(meta()).encode()})
    return table.replace_schema_metadata(metadata)


def _write_parquet(path: Path, case: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moeprof import columns

    tables = {
        "no-meta": lambda: _parquet_table(metadata={}),
        "bad-meta": lambda: _parquet_table(
            metadata={columns.META_KEY: dumps(meta(top_k=None)).encode()}
        ),
        "missing-column": lambda: _parquet_table(topk_weights=None),
        "wrong-type": lambda: _parquet_table(token_idx=pa.array([str(i) for i in range(8)])),
        "wrong-top-k": lambda: _parquet_table(
            topk_ids=pa.FixedSizeListArray.from_arrays(pa.array(list(range(24)), pa.int32()), 3)
        ),
    }
    if case in tables:
        path.mkdir()
        pq.write_table(tables[case](), path / "part-00000.parquet")
    elif case == "not-parquet":
        path.write_text(dumps(meta()) + "\n")
    elif case == "cut-footer":
        pq.write_table(_parquet_table(), path)
        path.write_bytes(path.read_bytes()[:-100])
    elif case == "empty-dir":
        path.mkdir()
    elif case == "only-temp-part":  # killed before the first part was closed
        path.mkdir()
        (path / columns.temp_part_name(0)).write_bytes(b"PAR1")
    return path


PARQUET_CASES = {
    # name: (validate's exit code: 1 a wrong-shaped log, 2 unreadable; a word of the reason)
    "no-meta": (1, "no moeprof.meta"),
    "bad-meta": (1, "missing field 'top_k'"),
    "missing-column": (1, "'topk_weights' missing"),
    "wrong-type": (1, "'token_idx' is string, expected integers"),
    "wrong-top-k": (1, "expected lists of top_k=4"),
    "not-parquet": (2, "not a readable parquet file"),
    "cut-footer": (2, "not a readable parquet file"),
    "empty-dir": (2, "is a directory"),
    "only-temp-part": (2, "no complete parquet part yet"),
}


@pytest.mark.parametrize("case", list(PARQUET_CASES))
def test_wrong_parquet_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """A Parquet log of the wrong shape: validate names file and reason in one line (exit 1:
    invalid; 2: not readable as Parquet at all); analyze and plot stop with one line, exit 2."""
    monkeypatch.chdir(tmp_path)
    code_validate, word = PARQUET_CASES[case]
    path = _write_parquet(tmp_path / f"{case}.parquet", case)
    code, out = run_cli("validate", str(path))
    lines = out.strip().splitlines()
    assert code == code_validate, out
    assert str(path) in lines[0] and word in lines[0].lower(), out
    if code == 1:  # then only the verdict (which rich may wrap)
        assert "".join(lines[1:]).replace(" ", "") == f"invalid:{path}:1errors", out
    for command in ("analyze", "plot"):
        code, out = run_cli(*_cmd(command, str(path)))
        assert code == 2, out
        assert len(out.strip().splitlines()) == 1 and word in out.lower(), out
    assert not (tmp_path / "out.png").exists()
