"""The log format's rules as the schema states them (pydantic is the reference for every reader)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from logfactory import META, dumps, meta, route
from pydantic import ValidationError

from moeprof import layout, schema


def _meta(**kw: object) -> schema.MetaRecord:
    return schema.parse_meta(dumps(meta(**kw)))


def _reason(line: str, m: schema.MetaRecord | None = None) -> str:
    with pytest.raises(ValidationError) as exc:
        schema.parse_route(line, m)
    return schema.explain(exc.value)


def test_meta_with_only_the_minimum_fields_parses() -> None:
    m = schema.parse_meta(
        '{"type":"meta","model_id":"x","vllm_version":"1","torch_version":"2","device":"cpu",'
        '"seed":1,"layers_logged":[3],"top_k":2}'
    )
    assert m.num_experts is None and m.prefix_caching is None and m.layers_logged == [3]


def test_meta_keeps_unknown_fields_written_by_other_tools() -> None:
    m = schema.parse_meta(dumps({**META, "tool": "other-logger"}))
    assert m.model_extra == {"tool": "other-logger"}


def test_meta_rejects_repeated_layers_and_top_k_above_num_experts() -> None:
    with pytest.raises(ValidationError, match="repeated layers"):
        _meta(layers_logged=[3, 3])
    with pytest.raises(ValidationError, match="exceeds num_experts"):
        _meta(top_k=8, num_experts=4)


def test_route_in_any_key_order_and_whitespace_parses() -> None:
    line = json.dumps(dict(reversed(list(route("7", 3).items()))), indent=None)
    rec = schema.parse_route(line, _meta())
    assert (rec.req_id, rec.token_idx, rec.topk_ids) == ("7", 3, [0, 1, 2, 3])


def test_route_types_are_strict() -> None:
    assert _reason(dumps(route(token_idx="3"))).startswith("token_idx: Input should be a valid int")
    assert _reason(dumps(route(req_id=3))).startswith("req_id: Input should be a valid str")
    assert "layer" in _reason(dumps(route(layer=True)))


def test_route_lengths_must_match_top_k_of_the_meta() -> None:
    line = dumps(route(ids=[1, 2, 3], weights=[0.1, 0.1, 0.1]))
    assert _reason(line, _meta()) == "topk_ids has 3 entries, expected top_k=4"
    assert schema.parse_route(line).topk_ids == [1, 2, 3]  # without a meta nothing to compare


def test_route_rejects_repeated_out_of_range_and_negative_ids() -> None:
    m = _meta()
    assert "repeats an expert" in _reason(dumps(route(ids=[1, 1, 2, 3])), m)
    assert "out of range for num_experts=60" in _reason(dumps(route(ids=[1, 2, 3, 60])), m)
    assert "negative expert id" in _reason(dumps(route(ids=[-1, 2, 3, 4])), m)


def test_route_rejects_nan_weights_as_pythons_json_writes_them() -> None:
    line = json.dumps(route(weights=[0.5, float("nan"), 0.1, 0.1]))
    assert "NaN" in line
    assert _reason(line, _meta()) == "topk_weights has a non-finite value: nan"


def test_route_at_a_layer_not_logged_is_rejected() -> None:
    assert "not in layers_logged [12]" in _reason(dumps(route(layer=5)), _meta())


def test_route_phase_is_optional_but_must_be_known() -> None:
    assert schema.parse_route(dumps(route())).phase is None
    assert "phase" in _reason(dumps(route(phase="warmup")))


def test_route_step_is_optional_and_a_non_negative_int() -> None:
    m = _meta()
    assert schema.parse_route(dumps(route()), m).step is None  # older logs, other tools
    assert schema.parse_route(dumps(route(step=None)), m).step is None
    assert schema.parse_route(dumps(route(phase="decode", step=17)), m).step == 17
    assert schema.parse_route(dumps(route(step=0)), m).step == 0
    assert list(json.loads(dumps(route(phase="decode", step=3)))) == list(layout.FIELDS)
    assert _reason(dumps(route(step=-1)), m) == (
        "step: Input should be greater than or equal to 0 (got -1)"
    )
    for bad in ("3", 1.0, True, [3]):
        assert _reason(dumps(route(step=bad)), m).startswith("step: Input should be a valid int")
    big = schema.parse_route(dumps(route(step=schema.INT64_MAX + 1)), m)  # valid JSON and type
    assert schema.range_problem(0, 12, [0], [0.5], big.step) == "an integer field exceeds 64 bits"
    assert schema.range_problem(0, 12, [0], [0.5], schema.INT64_MAX) is None
    assert schema.range_problem(0, 12, [0], [0.5], None) is None


def test_explain_names_missing_fields_and_bad_json() -> None:
    rec = route()
    del rec["token_idx"]
    assert _reason(dumps(rec)) == "missing field 'token_idx'"
    assert _reason('{"type":"route",').startswith("not valid JSON")


def test_expected_routes_leave_out_the_last_sampled_token() -> None:
    rec = schema.OutputRecord(req_id="0", prompt_tokens=40, generated_tokens=67)
    assert rec.expected_routes == 106
    assert schema.OutputRecord(req_id="1", prompt_tokens=5, generated_tokens=0).expected_routes == 5


def test_meta_dict_stamps_the_schema_version() -> None:
    d = schema.meta_dict(
        model_id="m", vllm_version="1", torch_version="2", device="cpu", layers_logged=[1], top_k=2
    )
    assert d["schema_version"] == schema.SCHEMA_VERSION and d["type"] == "meta"


def test_ids_valid_is_route_problem_s_id_rules_vectorised() -> None:
    rng = np.random.default_rng(0)
    m = _meta(top_k=4, num_experts=8)
    ids = rng.integers(-1, 9, (2000, 4))
    want = [
        schema.route_problem(row.tolist(), [0.1] * 4, 12, m) is None for row in ids
    ]  # repeats, negatives and ids beyond num_experts all occur
    assert schema.ids_valid(ids, m.num_experts).tolist() == want
    assert 0 < sum(want) < len(want)
    wide = rng.integers(0, 40, (500, 12))  # more than 8 ids: the sorting branch
    want = [schema.route_problem(r.tolist(), [0.1] * 12, 12, None) is None for r in wide]
    assert schema.ids_valid(wide, None).tolist() == want
    assert not schema.ids_valid(np.zeros((3, 0), np.int64), None).any()


def test_range_problem_names_what_a_reader_cannot_hold() -> None:
    assert schema.range_problem(1, 12, [0, 1], [0.5, 0.25]) is None
    assert schema.range_problem(schema.INT64_MAX + 1, 12, [0], [0.5]) == (
        "an integer field exceeds 64 bits"
    )
    assert schema.range_problem(0, 12, [0], [-1e39]) == (
        "topk_weights has a value beyond float32 range"
    )
    assert schema.weights_valid(np.array([0.5, np.nan, 1e39, -np.inf])).tolist() == [
        True,
        False,
        False,
        False,
    ]


def test_the_hook_s_line_has_the_record_s_fields_in_order_and_reads_back() -> None:
    columns = (
        ['"r-1"', '"r\\"2"'],
        np.array([0, 5]),
        np.array([[1, 7], [2, 0]]),
        np.array([[0.5, 0.25], [1e-8, 0.125]], np.float32),
        np.array([True, False]),
    )
    m = _meta(top_k=2, layers_logged=[3, 12])
    per_row = layout.format_routes(
        layout.route_template(None, 2), *columns, layer=np.array([12, 3]), step=np.array([7, 8])
    )
    for line, prefill, layer, step in zip(
        per_row.splitlines(), (True, False), (12, 3), (7, 8), strict=True
    ):
        assert list(json.loads(line)) == list(schema.RouteRecord.model_fields)
        rec = schema.parse_route(line, m)
        assert rec.phase == schema.PHASES[0 if prefill else 1]
        assert (rec.layer, rec.step) == (layer, step)
    assert per_row.splitlines()[0].endswith('"phase":"prefill","step":7}')
    assert [schema.parse_route(line).req_id for line in per_row.splitlines()] == ["r-1", 'r"2']
    # A layer written in as a constant: the same lines as a column of that layer.
    constant = layout.format_routes(layout.route_template(12, 2), *columns, step=np.array([7, 8]))
    column = layout.format_routes(
        layout.route_template(None, 2), *columns, layer=np.array([12, 12]), step=np.array([7, 8])
    )
    assert constant == column
    # Older logs: without a step (the column is not needed then).
    old = layout.format_routes(layout.route_template(12, 2, omit=("step",)), *columns)
    assert [schema.parse_route(line, m).step for line in old.splitlines()] == [None, None]


def test_format_routes_names_a_column_the_template_needs() -> None:
    columns = (['"a"'], np.array([0]), np.array([[0, 1]]), np.array([[0.5, 0.25]]))
    per_row = layout.route_template(None, 2)
    with pytest.raises(ValueError, match="pass step"):
        layout.format_routes(per_row, *columns, np.array([True]), layer=np.array([3]))
    with pytest.raises(ValueError, match="pass layer"):
        layout.format_routes(per_row, *columns, np.array([True]), step=np.array([3]))
    with pytest.raises(ValueError, match="pass prefill"):
        layout.format_routes(per_row, *columns, None, layer=np.array([3]), step=np.array([3]))
    bare = layout.route_template(None, 2, omit=("phase", "step"))
    text = layout.format_routes(bare, *columns, None, layer=np.array([3]))
    assert text == '{"type":"route","req_id":"a","token_idx":0,"layer":3,"topk_ids":[0,1],' + (
        '"topk_weights":[0.5,0.25]}\n'
    )


def test_route_layout_is_the_template_cut_at_its_values() -> None:
    for omit in ((), ("phase",), ("step",), ("phase", "step")):
        lay = layout.route_layout(3, omit=omit)
        template = layout.route_template(None, 3, omit=omit)
        specs = re.findall(r"%[.\d]*[dgs]", template)
        assert "".join(t + v for t, v in zip(lay.texts, [*specs, ""], strict=True)) == template
        slots = [f for f in layout.FIELDS if f != "type" and f not in omit]  # type: a constant
        assert list(dict.fromkeys(lay.fields)) == slots
        assert lay.fields.count("topk_ids") == lay.fields.count("topk_weights") == 3
    assert layout.route_layout(3).between("step", None) == "}\n"
    assert layout.route_layout(3).between("phase", "step") == '","step":'
    assert layout.route_layout(3, omit=("step",)).between("phase", None) == '"}\n'
    with pytest.raises(ValueError, match="does not follow"):
        layout.route_layout(3).between("req_id", "layer")
    with pytest.raises(ValueError, match="required"):
        layout.route_template(12, 3, omit=("layer",))
