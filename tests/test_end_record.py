"""The closing record of a JSON Lines log (issue #15, defect 2), as the reader and ``validate``
see it: a cleanly closed log says so, a cut one is warned about (an error with
``--require-complete``), and a closing record that is misplaced, malformed, miscounted or says
logging stopped early is an error. Logs of other tools (no ``moeprof_version`` in the meta, no
closing record) are never failed for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from logfactory import (
    dumps,
    end_record,
    hook_line,
    meta,
    route,
    run_cli,
    sequential_routes,
    write_log,
)

from moeprof.analysis.reader import DECODERS, Issue, open_log
from moeprof.analysis.validate import NOT_CLOSED

HOOK_META = meta(moeprof_version="0.1.0")
"""A meta as the hook writes it: moeprof logs are expected to be closed."""
FOREIGN_META = meta()
"""A meta without moeprof_version: another tool's log."""


def _routes(n_requests: int = 3, tokens: int = 5) -> list[dict]:
    return sequential_routes({str(r): tokens for r in range(n_requests)})


def _validate(path: Path, *args: str) -> tuple[int, dict, str]:
    code, out = run_cli("validate", str(path), "--json", *args)
    _, text = run_cli("validate", str(path), *args)
    return code, json.loads(out), text


def test_closed_log_is_reported_complete(tmp_path: Path) -> None:
    routes = _routes()
    log = write_log(tmp_path / "closed.jsonl", [*routes, end_record(len(routes))], HOOK_META)
    code, report, text = _validate(log, "--require-complete")
    assert code == 0, text
    assert report["complete"] is True and report["end"]["routes"] == len(routes)
    assert report["routes"] == len(routes) and report["lines"] == len(routes) + 2
    assert report["warnings"] == [] and report["errors"] == []
    assert f"complete (closed cleanly: {len(routes)} routes)" in text


def test_unclosed_hook_log_is_a_warning_then_an_error_when_required(tmp_path: Path) -> None:
    log = write_log(tmp_path / "cut.jsonl", _routes(), HOOK_META)
    code, report, text = _validate(log)
    assert code == 0, text
    assert report["complete"] is False
    assert [w["message"] for w in report["warnings"]] == [NOT_CLOSED]
    assert f"{log}: {NOT_CLOSED} (warning)" in text and "valid" in text
    code, report, text = _validate(log, "--require-complete")
    assert code == 1, text
    assert [e["message"] for e in report["errors"]] == [NOT_CLOSED]


def test_other_tools_logs_are_not_failed_for_lacking_a_closing_record(tmp_path: Path) -> None:
    log = write_log(tmp_path / "foreign.jsonl", _routes(), FOREIGN_META)
    for args in ((), ("--require-complete",)):
        code, report, text = _validate(log, *args)
        assert code == 0, text
        assert report["complete"] is None and report["warnings"] == []
        assert "not closed" not in text and "completeness unknown" in text


def test_other_tools_logs_may_carry_a_closing_record(tmp_path: Path) -> None:
    routes = _routes()
    log = write_log(tmp_path / "f.jsonl", [*routes, end_record(len(routes))], FOREIGN_META)
    code, report, _ = _validate(log)
    assert code == 0 and report["complete"] is True


def test_stopped_logging_is_an_error_with_reason_and_dropped_count(tmp_path: Path) -> None:
    routes = _routes()
    end = end_record(len(routes), dropped=1234, stopped="disk full (No space left on device)")
    log = write_log(tmp_path / "full.jsonl", [*routes, end], HOOK_META)
    code, report, text = _validate(log)
    assert code == 1, text
    assert report["complete"] is False
    message = report["errors"][0]["message"]
    assert "disk full" in message and "1,234 routes dropped" in message
    assert f"{log}: logging stopped early: disk full" in text


def test_closing_record_counting_other_routes_is_an_error(tmp_path: Path) -> None:
    routes = _routes()
    log = write_log(tmp_path / "miscount.jsonl", [*routes[:-1], end_record(len(routes))], HOOK_META)
    code, report, _ = _validate(log)
    assert code == 1
    assert report["errors"][0]["message"] == (
        f"the closing record counts {len(routes)} routes written, but the log holds "
        f"{len(routes) - 1}"
    )


@pytest.mark.parametrize(
    ("case", "body", "line", "words"),
    [
        # a closing record, then more routes: the record is wrong where it stands
        ("end-then-routes", lambda r: [*r[:3], end_record(3), *r[3:]], 5, "before the last"),
        ("end-twice", lambda r: [*r, end_record(len(r)), end_record(len(r))], 17, "before the"),
        (
            "end-then-cut-route",
            lambda r: [*r, end_record(len(r)), '{"type":"route","req'],
            17,
            "before the last",
        ),
        ("malformed", lambda r: [*r, {"type": "end", "routes": -1}], 17, "routes"),
        ("missing-count", lambda r: [*r, {"type": "end"}], 17, "missing field 'routes'"),
    ],
)
def test_misplaced_or_malformed_closing_record_is_an_error_on_its_line(
    tmp_path: Path, case: str, body, line: int, words: str
) -> None:
    log = write_log(tmp_path / f"{case}.jsonl", body(_routes()), HOOK_META)
    code, report, text = _validate(log)
    assert code == 1, text
    first = report["errors"][0]
    assert first["line"] == line and words in first["message"], report["errors"]


def test_closing_record_without_newline_is_read_with_a_warning(tmp_path: Path) -> None:
    routes = _routes()
    log = write_log(
        tmp_path / "nonl.jsonl",
        [*routes, end_record(len(routes))],
        HOOK_META,
        trailing_newline=False,
    )
    handle = open_log(log)
    issues: list[Issue] = []
    assert sum(len(c) for c in handle.chunks(issues.append)) == len(routes)
    assert handle.end is not None and handle.end.routes == len(routes)
    assert handle.cut_mid_line
    assert [(i.line, i.severity) for i in issues] == [(len(routes) + 2, "warning")]


def test_truncated_closing_record_is_a_cut_write(tmp_path: Path) -> None:
    routes = _routes()
    log = write_log(
        tmp_path / "half.jsonl",
        [*routes, '{"type":"end","rout'],
        HOOK_META,
        trailing_newline=False,
    )
    handle = open_log(log, require_meta=True)
    issues: list[Issue] = []
    assert sum(len(c) for c in handle.chunks(issues.append)) == len(routes)
    assert handle.end is None and handle.cut_mid_line
    assert [i.line for i in issues] == [len(routes) + 2]
    assert "truncated last line" in issues[0].message


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_finds_the_closing_record(tmp_path: Path, decoder: str) -> None:
    routes = _routes()
    log = write_log(tmp_path / "d.jsonl", [*routes, end_record(len(routes), requests=3)])
    handle = open_log(log, decoder=decoder)  # type: ignore[arg-type]
    issues: list[Issue] = []
    assert sum(len(c) for c in handle.chunks(issues.append)) == len(routes)
    assert issues == [] and handle.end is not None and handle.end.requests == 3
    assert handle.routes_read == len(routes) and handle.lines_read == len(routes) + 2


def test_closing_record_leaves_hook_lines_to_the_vectorised_parser(tmp_path: Path) -> None:
    """The closing record is one line looked at once per block: every route line of the hook's
    layout is still read by the byte parser, and only the closing line by pydantic."""
    lines = [
        hook_line(str(i // 50), i % 50, 12, [1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1], "decode", i)
        for i in range(5000)
    ]
    log = write_log(tmp_path / "hook.jsonl", [*lines, dumps(end_record(5000))], HOOK_META)
    handle = open_log(log)
    decoded: dict[str, int] = {}
    n = sum(
        len(c)
        for c in handle.chunks(
            on_decoded=lambda d, _first, count: decoded.__setitem__(d, decoded.get(d, 0) + count)
        )
    )
    assert n == 5000 and handle.end is not None
    assert decoded == {"vector": 5000, "pydantic": 1}


def test_a_request_named_end_is_a_route(tmp_path: Path) -> None:
    routes = [route("end", t) for t in range(3)]
    log = write_log(tmp_path / "named.jsonl", routes, HOOK_META)
    handle = open_log(log)
    issues: list[Issue] = []
    assert sum(len(c) for c in handle.chunks(issues.append)) == 3
    assert handle.end is None and issues == []


def test_analyze_and_compare_read_closed_logs(tmp_path: Path) -> None:
    routes = _routes()
    log = write_log(tmp_path / "a.jsonl", [*routes, end_record(len(routes))], HOOK_META)
    code, out = run_cli("analyze", str(log), "--json")
    assert code == 0, out
    assert json.loads(out)["logs"][0]["records"] == len(routes)
    code, out = run_cli("compare", str(log), str(log), "--json")
    assert code == 0, out
