"""``moeprof validate``: every problem is reported with its line number and reason, and the
fast reader agrees with pydantic line for line."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from logfactory import dumps, meta, outputs_file, route, run_cli, sequential_routes, write_log

from moeprof import schema
from moeprof.analysis.reader import SLOW_LINES, open_log
from moeprof.analysis.validate import ValidationReport, validate_log


def _errors(report: ValidationReport) -> list[tuple[int | None, str]]:
    return [(e.line, e.message) for e in report.errors]


def _only_error(report: ValidationReport) -> tuple[int | None, str]:
    assert not report.valid
    assert report.error_count == 1, _errors(report)
    return _errors(report)[0]


# --------------------------------------------------------------------------- good logs


def test_a_well_formed_log_is_valid_with_counts(tmp_path: Path) -> None:
    log = write_log(tmp_path / "ok.jsonl", sequential_routes({"0": 5, "1": 3}))
    report = validate_log(log)
    assert report.valid and report.error_count == 0 and report.warning_count == 0
    assert (report.lines, report.routes, report.routes_by_layer) == (9, 8, {12: 8})
    assert [(r.req_id, r.routes) for r in report.per_request] == [("0", [5]), ("1", [3])]
    assert report.summary is not None and (report.summary.min, report.summary.max) == (3, 5)


def test_a_minimum_fields_log_from_another_tool_is_valid(tmp_path: Path) -> None:
    header = (
        '{ "top_k": 2, "layers_logged": [0], "type": "meta", "model_id": "other", '
        '"vllm_version": "0.9", "torch_version": "2.5", "device": "cuda", "seed": 0 }'
    )
    routes = [
        '{"topk_weights": [0.7, 0.2], "topk_ids": [5, 1], "layer": 0, "token_idx": 0, '
        '"req_id": "a", "type": "route"}',
        '{"type": "route", "req_id": "a", "token_idx": 1, "layer": 0, "topk_ids": [2, 5], '
        '"topk_weights": [0.6, 0.3], "extra": {"note": "ignored"}}',
    ]
    report = validate_log(write_log(tmp_path / "other.jsonl", routes, header))
    assert report.valid, _errors(report)
    assert report.routes == 2 and report.meta is not None and report.meta["num_experts"] is None


def test_crlf_line_endings_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "crlf.jsonl"
    lines = [dumps(meta())] + [dumps(r) for r in sequential_routes({"0": 3})]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    report = validate_log(path)
    assert report.valid and report.routes == 3


def test_a_complete_last_line_without_newline_is_only_a_warning(tmp_path: Path) -> None:
    log = write_log(tmp_path / "nonl.jsonl", sequential_routes({"0": 3}), trailing_newline=False)
    report = validate_log(log)
    assert report.valid and report.routes == 3
    assert [(w.line, w.message) for w in report.warnings] == [
        (4, "last line has no trailing newline (writer cut off?)")
    ]


# --------------------------------------------------------------------------- bad lines


def test_missing_meta_is_reported_on_line_1(tmp_path: Path) -> None:
    log = write_log(tmp_path / "nometa.jsonl", sequential_routes({"0": 2})[1:], dumps(route()))
    report = validate_log(log)
    assert _errors(report)[0] == (
        1,
        "a route record where the meta record should be (log written without its header?)",
    )


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"token_idx": "2"}, "token_idx: Input should be a valid integer"),
        ({"req_id": 7}, "req_id: Input should be a valid string"),
        ({"topk_weights": "0.1"}, "topk_weights: Input should be a valid array"),
        (
            {"ids": [1, 2, 3], "weights": [0.1, 0.1, 0.1]},
            "topk_ids has 3 entries, expected top_k=4",
        ),
        ({"ids": [4, 4, 1, 2]}, "topk_ids repeats an expert: [4, 4, 1, 2]"),
        ({"ids": [1, 2, 3, 60]}, "expert id 60 is out of range for num_experts=60"),
        ({"layer": 11}, "layer 11 is not in layers_logged [12]"),
        ({"phase": "warmup"}, "phase: Input should be 'prefill' or 'decode'"),
        ({"type": "meta"}, "a second meta record: only line 1 may be one (logs concatenated?)"),
    ],
)
def test_a_bad_route_is_reported_with_its_line_number_and_reason(
    tmp_path: Path, bad: dict, reason: str
) -> None:
    fields = {"token_idx": 2, **bad}
    ids = fields.pop("ids", (10, 11, 12, 13))
    weights = fields.pop("weights", (0.4, 0.3, 0.2, 0.1))
    rec = route("0", ids=ids, weights=weights)
    rec.update(fields)
    body = [*sequential_routes({"0": 2}), rec, route("0", 3)]
    report = validate_log(write_log(tmp_path / "bad.jsonl", body))
    line, message = _errors(report)[0]
    assert line == 4, _errors(report)
    assert message.startswith(reason), message


def test_nan_weight_written_by_python_json_is_reported(tmp_path: Path) -> None:
    nan_line = json.dumps(route("0", 1, weights=[0.5, float("nan"), 0.1, 0.1]))
    log = write_log(tmp_path / "nan.jsonl", [route("0", 0), nan_line, route("0", 2)])
    report = validate_log(log)
    assert _errors(report)[0] == (3, "topk_weights has a non-finite value: nan")


def test_truncated_last_line_is_reported_with_its_line_number(tmp_path: Path) -> None:
    path = write_log(tmp_path / "cut.jsonl", sequential_routes({"0": 3}))
    path.write_bytes(path.read_bytes() + dumps(route("0", 3)).encode()[:40])
    line, message = _only_error(validate_log(path))
    assert line == 5
    assert message.startswith("truncated last line (no trailing newline): not valid JSON")


def test_empty_file_is_invalid(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert _only_error(validate_log(tmp_path / "empty.jsonl")) == (
        1,
        "empty file: expected a meta record on line 1",
    )


def test_binary_garbage_is_reported_as_binary(tmp_path: Path) -> None:
    path = tmp_path / "garbage.bin"
    path.write_bytes(bytes(range(256)) * 4 + b"\n\x00\x01\xfe\xff\n")
    report = validate_log(path)
    assert not report.valid
    assert _errors(report)[0] == (1, "binary data, not a JSON text line")
    assert (3, "binary data, not a JSON text line") in _errors(report)


def test_gzip_compressed_log_gets_a_hint(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.jsonl", sequential_routes({"0": 2}))
    gz = tmp_path / "log.jsonl.gz"
    gz.write_bytes(gzip.compress(log.read_bytes()))
    assert _errors(validate_log(gz))[0] == (1, "gzip-compressed data: decompress the log first")


def test_blank_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    body = [dumps(r) for r in sequential_routes({"0": 4})]
    log = write_log(tmp_path / "blank.jsonl", [*body[:2], "", *body[2:]])
    line, message = _only_error(validate_log(log))
    assert line == 4 and message.startswith("not valid JSON")


def test_two_records_on_one_line_are_an_error_even_next_to_a_blank_line(tmp_path: Path) -> None:
    """The fast path counts records per line; a blank line must not hide a doubled line."""
    body = [dumps(r) for r in sequential_routes({"0": 6})]
    lines = [*body[:2], body[2] + body[3], "", *body[4:]]
    report = validate_log(write_log(tmp_path / "double.jsonl", lines))
    assert [ln for ln, _ in _errors(report)] == [4, 5, None]  # + the gap left at position 3
    assert _errors(report)[0][1].startswith("not valid JSON (trailing characters")


def test_a_record_spread_over_two_lines_is_an_error(tmp_path: Path) -> None:
    body = [dumps(r) for r in sequential_routes({"0": 3})]
    split = body[1].replace(',"layer"', ',\n"layer"')
    report = validate_log(write_log(tmp_path / "split.jsonl", [body[0], split, body[2]]))
    assert [ln for ln, _ in _errors(report)][:2] == [3, 4]


def test_overlong_line_is_reported_without_reading_it_into_memory(tmp_path: Path) -> None:
    path = write_log(tmp_path / "long.jsonl", sequential_routes({"0": 2}))
    with path.open("ab") as f:
        f.write(b"x" * (5 << 20) + b"\n" + dumps(route("0", 2)).encode() + b"\n")
    report = validate_log(path)
    assert _errors(report)[0] == (4, "line longer than 4 MiB: binary data or not a JSON Lines log")
    assert report.routes == 3 and report.lines == 5


# --------------------------------------------------------------------------- whole-file checks


def test_duplicate_keys_are_reported_on_the_repeating_line(tmp_path: Path) -> None:
    body = [*sequential_routes({"0": 3}), route("0", 1, ids=[7, 8, 9, 10])]
    line, message = _only_error(validate_log(write_log(tmp_path / "dup.jsonl", body)))
    assert (line, message) == (
        5,
        "duplicate route: req_id '0' token_idx 1 layer 12 was already logged",
    )


def test_gaps_in_token_positions_name_the_request_and_first_hole(tmp_path: Path) -> None:
    body = [
        r for r in sequential_routes({"0": 6, "1": 2}) if (r["req_id"], r["token_idx"]) != ("0", 3)
    ]
    report = validate_log(write_log(tmp_path / "gap.jsonl", body))
    assert _only_error(report) == (
        None,
        "req_id '0' layer 12: 1 of token positions 0..5 missing (first: 3)",
    )
    assert report.gaps == 1


def test_gaps_are_warnings_when_the_meta_does_not_say_about_prefix_caching(tmp_path: Path) -> None:
    body = [r for r in sequential_routes({"0": 4}) if r["token_idx"] != 0]
    report = validate_log(write_log(tmp_path / "g.jsonl", body, meta(prefix_caching=None)))
    assert report.valid and report.warning_count == 1
    assert "first: 0" in report.warnings[0].message


def test_a_cached_prompt_prefix_is_not_a_gap_with_prefix_caching_on(tmp_path: Path) -> None:
    body = [r for r in sequential_routes({"0": 6}) if r["token_idx"] >= 4]
    report = validate_log(write_log(tmp_path / "pc.jsonl", body, meta(prefix_caching=True)))
    assert report.valid and report.warning_count == 0


def test_layers_with_different_counts_for_a_request_are_reported(tmp_path: Path) -> None:
    body = sequential_routes({"0": 3}, layers=(3, 7))[:-1]
    report = validate_log(write_log(tmp_path / "ml.jsonl", body, meta(layers_logged=[3, 7])))
    assert (None, "req_id '0' has different route counts per layer (3: 3, 7: 2)") in _errors(report)


def test_fast_reader_and_pydantic_agree_on_every_line_of_a_big_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad lines scattered through blocks the fast path decodes: each is found at its exact
    line, every other line is counted as a valid route, and pydantic only sees the small
    neighbourhoods of the bad lines."""
    body: list = sequential_routes({"0": 400, "1": 400, "2": 400})
    bad = {
        37: json.dumps(route("0", 1, weights=[0.1, float("inf"), 0.1, 0.1])),
        300: dumps(route("1", 0, ids=[1, 2, 3])),
        301: dumps(route("1", "1")),
        777: "{" + dumps(route("2", 0))[1:-1],
        1100: dumps(route("2", 0, ids=[5, 5, 6, 7])),
    }
    for i, line in bad.items():
        body[i] = line
    seen = []
    real_parse = schema.parse_route
    monkeypatch.setattr(
        schema, "parse_route", lambda line, m=None: seen.append(1) or real_parse(line, m)
    )
    report = validate_log(write_log(tmp_path / "big.jsonl", body), max_errors=100)
    assert 0 < len(seen) <= len(bad) * 2 * SLOW_LINES
    line_errors = sorted(ln for ln, _ in _errors(report) if ln is not None)
    assert line_errors == sorted(i + 2 for i in bad)  # body index 0 is line 2
    assert report.routes == len(body) - len(bad)
    assert len(body) > 10 * SLOW_LINES


def test_reader_yields_numpy_chunks_with_codes_and_line_numbers(tmp_path: Path) -> None:
    body = [route("a", 0, phase="prefill"), route("b", 0, phase="decode"), route("a", 1)]
    log = open_log(write_log(tmp_path / "r.jsonl", body))
    chunks = list(log.chunks())
    assert len(chunks) == 1
    c = chunks[0]
    assert c.ids.shape == (3, 4) and c.weights.dtype.name == "float32"
    assert c.line.tolist() == [2, 3, 4] and c.phase.tolist() == [0, 1, -1]
    assert [log.req_ids[i] for i in c.req] == ["a", "b", "a"]


# --------------------------------------------------------------------------- outputs accounting


def test_outputs_accounting_passes_when_every_request_has_prompt_plus_generated_minus_one(
    tmp_path: Path,
) -> None:
    log = write_log(
        tmp_path / "l.jsonl",
        sequential_routes({"0": 12, "1": 7}, layers=(3, 7)),
        meta(layers_logged=[3, 7]),
    )
    outs = outputs_file(tmp_path / "o.jsonl", [("0", 5, 8), ("1", 7, 1)])
    report = validate_log(log, outputs=outs)
    assert report.valid, _errors(report)
    assert report.outputs is not None
    assert (report.outputs.matched, report.outputs.mismatched) == (2, 0)
    assert report.outputs.expected_routes == 2 * (12 + 7)


def test_outputs_accounting_reports_short_missing_and_extra_requests(tmp_path: Path) -> None:
    log = write_log(tmp_path / "l.jsonl", sequential_routes({"0": 12, "9": 4}))
    outs = outputs_file(tmp_path / "o.jsonl", [("0", 5, 9), ("1", 3, 3)])
    report = validate_log(log, outputs=outs)
    assert set(_errors(report)) == {
        (None, "req_id '0' layer 12: 12 routes, expected 13 (prompt 5 + generated 9 - 1)"),
        (None, "req_id '1' is in o.jsonl but has no routes in the log"),
        (None, "req_id '9' has routes in the log but is not in o.jsonl"),
    }
    assert report.outputs is not None
    assert (report.outputs.missing_from_log, report.outputs.extra_in_log) == (1, 1)


FOUR_LAYERS = (0, 1, 2, 3)


def _span_routes(
    spans: dict[str, range], layers: tuple[int, ...] = FOUR_LAYERS
) -> list[dict[str, Any]]:
    """Routes at the given positions per request, at every layer, in step order."""
    return [
        route(req, t, layer, [(t + j * 5) % 60 for j in range(4)])
        for req, positions in spans.items()
        for t in positions
        for layer in layers
    ]


def _outputs(path: Path, records: list[dict[str, Any]]) -> Path:
    """An outputs JSONL with the fields given (``num_cached_tokens`` only where set)."""
    path.write_text("".join(dumps({"finish_reason": "length", **r}) + "\n" for r in records))
    return path


def _out(req: str, prompt: int, generated: int, cached: int | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"req_id": req, "prompt_tokens": prompt, "generated_tokens": generated}
    if cached is not None:
        rec["num_cached_tokens"] = cached
        rec["prompt_token_ids"] = list(range(prompt))
    return rec


def test_with_prefix_caching_the_cached_prefix_is_accounted_exactly(tmp_path: Path) -> None:
    """Recorded num_cached_tokens: routes = prompt - cached + generated - 1 at exactly the
    positions cached..end, at every layer; a wrong count or a shifted start is named."""
    spans = {
        "0": range(0, 14),  # prompt 10, generated 5, nothing cached
        "1": range(8, 14),  # the same prompt again: 8 tokens cached
        "2": range(4, 14),  # claims 8 cached but logged from 4: 10 routes, expected 6
        "3": range(7, 13),  # 8 cached, right count but shifted one position down
    }
    log = write_log(
        tmp_path / "l.jsonl",
        _span_routes(spans),
        meta(layers_logged=list(FOUR_LAYERS), prefix_caching=True),
    )
    outs = _outputs(
        tmp_path / "o.jsonl",
        [_out("0", 10, 5, 0), _out("1", 10, 5, 8), _out("2", 10, 5, 8), _out("3", 10, 5, 8)],
    )
    report = validate_log(log, outputs=outs)
    fed = "(prompt 10 - cached 8 + generated 5 - 1)"
    assert sorted(_errors(report)) == sorted(
        [
            (
                None,
                f"req_id '2' layer {la}: 10 routes at positions 4..13, expected 6 at positions "
                f"8..13 {fed}",
            )
            for la in FOUR_LAYERS
        ]
        + [
            (
                None,
                f"req_id '3' layer {la}: 6 routes at positions 7..12, expected 6 at positions "
                f"8..13 {fed}",
            )
            for la in FOUR_LAYERS
        ]
    )
    assert report.gaps == 0 and report.outputs is not None
    assert report.outputs.mismatched == 8
    assert report.outputs.expected_routes == 4 * (14 + 6 + 6 + 6)
    assert (report.outputs.cached_tokens, report.outputs.cached_inferred) == (24, 0)


def test_exact_prefix_caching_accounting_passes_and_shows_in_the_cli(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "l.jsonl",
        _span_routes({"0": range(0, 14), "1": range(8, 14)}),
        meta(layers_logged=list(FOUR_LAYERS), prefix_caching=True),
    )
    outs = _outputs(tmp_path / "o.jsonl", [_out("0", 10, 5, 0), _out("1", 10, 5, 8)])
    report = validate_log(log, outputs=outs)
    assert report.valid, _errors(report)
    assert report.outputs is not None and report.outputs.expected_routes == report.routes == 80
    code, out = run_cli("validate", str(log), "--outputs", str(outs))
    assert code == 0, out
    assert "expected routes" in out and "80" in out
    assert "prefix-cached prompt tokens" in out and "inferred" not in out


def test_without_recorded_cached_counts_the_caching_check_stays_loose(tmp_path: Path) -> None:
    """Older outputs files (no num_cached_tokens) next to a log with prefix caching on: the
    positions must reach the last fed token; the expected total counts from the first logged
    position, and the report says it was inferred."""
    log = write_log(
        tmp_path / "l.jsonl",
        _span_routes({"0": range(0, 14), "1": range(8, 14), "2": range(4, 13)}),
        meta(layers_logged=list(FOUR_LAYERS), prefix_caching=True),
    )
    outs = _outputs(tmp_path / "o.jsonl", [_out("0", 10, 5), _out("1", 10, 5), _out("2", 10, 5)])
    report = validate_log(log, outputs=outs)
    assert sorted(_errors(report)) == [
        (
            None,
            f"req_id '2' layer {la}: positions up to 12, 9 routes, expected positions up to 13 "
            "(prompt 10 + generated 5 - 1; cached prefix not recorded in the outputs)",
        )
        for la in FOUR_LAYERS
    ]
    assert report.outputs is not None
    assert report.outputs.expected_routes == 4 * (14 + 6 + 10)
    assert (report.outputs.cached_tokens, report.outputs.cached_inferred) == (12, 3)


def test_recorded_cached_counts_are_checked_even_when_the_log_says_caching_was_off(
    tmp_path: Path,
) -> None:
    log = write_log(
        tmp_path / "l.jsonl", _span_routes({"0": range(0, 14)}, (12,)), meta(prefix_caching=False)
    )
    outs = _outputs(tmp_path / "o.jsonl", [_out("0", 10, 5, 0)])
    assert validate_log(log, outputs=outs).valid
    outs = _outputs(tmp_path / "o2.jsonl", [_out("0", 10, 5, 4)])
    assert _only_error(validate_log(log, outputs=outs)) == (
        None,
        "req_id '0' layer 12: 14 routes at positions 0..13, expected 10 at positions 4..13 "
        "(prompt 10 - cached 4 + generated 5 - 1)",
    )


@pytest.mark.parametrize("caching", [False, True])
def test_with_four_layers_only_the_layer_that_misses_a_route_is_reported(
    tmp_path: Path, caching: bool
) -> None:
    spans = {"0": range(0, 14), "1": range(8 if caching else 0, 14), "2": range(0, 9)}
    body = [
        r for r in _span_routes(spans) if (r["req_id"], r["token_idx"], r["layer"]) != ("1", 13, 2)
    ]
    log = write_log(
        tmp_path / "l.jsonl", body, meta(layers_logged=list(FOUR_LAYERS), prefix_caching=caching)
    )
    cached = 8 if caching else 0
    outs = _outputs(
        tmp_path / "o.jsonl", [_out("0", 10, 5, 0), _out("1", 10, 5, cached), _out("2", 6, 4, 0)]
    )
    report = validate_log(log, outputs=outs)
    accounting = [m for _, m in _errors(report) if " layer " in m and "per layer" not in m]
    expected = 14 - cached
    fed = "(prompt 10 - cached 8 + generated 5 - 1)" if caching else "(prompt 10 + generated 5 - 1)"
    want = " at positions 8..13" if caching else ""
    assert accounting == [
        f"req_id '1' layer 2: {expected - 1} routes at positions {cached}..12, "
        f"expected {expected}{want} {fed}"
    ]
    assert report.outputs is not None and report.outputs.mismatched == 1
    assert report.outputs.expected_routes == 4 * (14 + expected + 9)
    per_layer = ", ".join(f"{la}: {expected - (la == 2)}" for la in FOUR_LAYERS)
    assert (None, f"req_id '1' has different route counts per layer ({per_layer})") in _errors(
        report
    )


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (_out("0", 3, 2, 4), "num_cached_tokens=4 exceeds prompt_tokens=3"),
        (
            {**_out("0", 3, 2, 1), "prompt_token_ids": [1, 2]},
            "prompt_token_ids has 2 ids but prompt_tokens=3",
        ),
    ],
)
def test_impossible_cached_counts_in_outputs_are_a_usage_error(
    tmp_path: Path, record: dict[str, Any], reason: str
) -> None:
    log = write_log(tmp_path / "l.jsonl", sequential_routes({"0": 4}))
    outs = _outputs(tmp_path / "o.jsonl", [record])
    code, out = run_cli("validate", str(log), "--outputs", str(outs))
    assert code == 2 and f"{outs}:1: {reason}" in out


def test_a_broken_outputs_file_is_a_usage_error_naming_its_line(tmp_path: Path) -> None:
    log = write_log(tmp_path / "l.jsonl", sequential_routes({"0": 2}))
    outs = tmp_path / "o.jsonl"
    outs.write_text('{"req_id":"0","prompt_tokens":1,"generated_tokens":2}\n{"req_id":"1"}\n')
    code, out = run_cli("validate", str(log), "--outputs", str(outs))
    assert code == 2
    assert f"{outs}:2: missing field 'prompt_tokens'" in out


# --------------------------------------------------------------------------- the command


def test_cli_exit_codes_are_0_valid_1_invalid_2_unreadable(tmp_path: Path) -> None:
    good = write_log(tmp_path / "good.jsonl", sequential_routes({"0": 3}))
    bad = write_log(tmp_path / "bad.jsonl", [route("0", 0), route("0", 0)])
    assert run_cli("validate", str(good))[0] == 0
    code, out = run_cli("validate", str(bad))
    assert code == 1 and f"{bad}:3: duplicate route" in out
    code, out = run_cli("validate", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "missing.jsonl: no such file" in out
    code, out = run_cli("validate", str(tmp_path))
    assert code == 2 and "is a directory" in out


def test_cli_json_report_lists_errors_with_line_numbers(tmp_path: Path) -> None:
    bad = write_log(tmp_path / "bad.jsonl", [route("0", 0), route("0", 1, ids=[1, 1, 2, 3])])
    code, out = run_cli("validate", str(bad), "--json")
    data = json.loads(out)
    assert code == 1 and data["valid"] is False
    assert data["errors"][0] == {
        "line": 3,
        "message": "topk_ids repeats an expert: [1, 1, 2, 3]",
        "severity": "error",
    }


def test_cli_max_errors_limits_the_list_but_counts_everything(tmp_path: Path) -> None:
    body = [route("0", i, ids=[1, 1, 2, 3]) for i in range(30)]
    report = validate_log(write_log(tmp_path / "many.jsonl", body), max_errors=5)
    assert len(report.errors) == 5 and report.error_count == 30
    code, out = run_cli("validate", str(tmp_path / "many.jsonl"), "--max-errors", "5")
    assert code == 1 and "and 25 more errors" in out


def test_bad_input_never_prints_a_traceback_from_the_real_command(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x00\xff" * 100)
    for target, code in ((garbage, 1), (tmp_path / "nope.jsonl", 2)):
        proc = subprocess.run(
            [sys.executable, "-m", "moeprof", "validate", str(target)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == code
        assert "Traceback" not in proc.stdout + proc.stderr
        assert str(target) in proc.stdout + proc.stderr


def test_odd_but_valid_metas_do_not_blow_up_the_reader(tmp_path: Path) -> None:
    huge_layer = 10**12
    body = [route("0", t, layer=huge_layer) for t in range(3)]
    report = validate_log(write_log(tmp_path / "h.jsonl", body, meta(layers_logged=[huge_layer])))
    assert report.valid and report.routes_by_layer == {huge_layer: 3}
    k = 300  # beyond the fast path's tuple types: checked line by line
    wide = [route("0", t, ids=range(k), weights=[0.001] * k) for t in range(2)]
    report = validate_log(write_log(tmp_path / "k.jsonl", wide, meta(top_k=k, num_experts=k)))
    assert report.valid and report.routes == 2
