"""The column-wise route text (moeprof.route_text) is byte for byte the reference %-format
(moeprof.layout.format_routes_reference): weights over float32 bit patterns and their edge
cases, integers, request ids, templates, chunk sizes, and the JSONL sink's file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from moeprof.hook.sinks import JsonlSink, RouteColumns
from moeprof.layout import format_routes, format_routes_reference, route_template
from moeprof.route_text import route_bytes

rng = np.random.default_rng(11)


def _columns(
    n: int, top_k: int, weights: np.ndarray | None = None, reqs: Sequence[str] = ('"r"',)
) -> dict:
    if weights is None:
        weights = rng.random((n, top_k), dtype=np.float32)
    return {
        "req_json": [reqs[i % len(reqs)] for i in range(n)],
        "token_idx": rng.integers(0, 100_000, n),
        "ids": rng.integers(0, 256, (n, top_k)),
        "weights": weights.reshape(n, top_k),
        "prefill": rng.random(n) < 0.5,
        "layer": rng.integers(0, 61, n),
        "step": rng.integers(0, 10**7, n),
    }


def _assert_same(template: str, cols: dict) -> None:
    args = (template, cols["req_json"], cols["token_idx"], cols["ids"], cols["weights"])
    kw = {"layer": cols["layer"], "step": cols["step"]}
    want = format_routes_reference(*args, cols["prefill"], **kw)
    got = route_bytes(*args, cols["prefill"], **kw)
    if got != want.encode():
        lines = zip(got.decode().splitlines(), want.splitlines(), strict=False)
        first = next(((g, w) for g, w in lines if g != w), (got[:200], want[:200]))
        pytest.fail(f"route_bytes differs from the reference:\n got {first[0]}\nwant {first[1]}")
    assert format_routes(*args, cols["prefill"], **kw) == want


def _weights_in_rows(values: np.ndarray, top_k: int = 8) -> np.ndarray:
    pad = -values.size % top_k
    return np.concatenate([values, values[:pad]]).reshape(-1, top_k)


def _float32(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.uint32).view(np.float32)


def test_weights_match_on_random_float32_bit_patterns() -> None:
    # every exponent, sign, subnormals (non-finite patterns are tested on their own below)
    bits = rng.integers(0, 1 << 32, 1_000_000, dtype=np.uint64)
    values = _float32(bits)
    values = values[np.isfinite(values)]
    # and as many in the range numpy formats itself: exponents 2**-31 .. 2**4
    exponent = rng.integers(127 - 31, 127 + 5, 1_000_000, dtype=np.uint64)
    sign = rng.integers(0, 2, exponent.size, dtype=np.uint64)
    fast = _float32((sign << 31) | (exponent << 23) | (bits & 0x7FFFFF))
    weights = _weights_in_rows(np.concatenate([values, fast]))
    _assert_same(route_template(None, 8), _columns(len(weights), 8, weights))


def test_weights_match_on_ties_powers_of_ten_and_their_neighbours() -> None:
    edge = []
    # short dyadic fractions m * 2**-j: exact decimals, many of them exactly half-way at the
    # tenth significant digit (2**-14 = 6.103515625e-05: a tie, rounded to even)
    m = np.arange(1, 1 << 12, dtype=np.float64)
    for j in range(0, 45):
        edge.append((m * 2.0**-j).astype(np.float32))
    # powers of ten and 40 neighbours on each side, and the same near 9.9999999 * 10**e
    for e in range(-12, 12):
        for center in (10.0**e, 9.9999999 * 10.0**e, 5.0 * 10.0**e, 1.0000001 * 10.0**e):
            x = np.float32(center)
            lo, hi = [x], [x]
            for _ in range(40):
                lo.append(np.nextafter(lo[-1], np.float32(0)))
                hi.append(np.nextafter(hi[-1], np.float32(np.inf)))
            edge.append(np.array(lo + hi, np.float32))
    # the edges of the range formatted by numpy, zeros, the extremes of float32
    f32 = np.finfo(np.float32)
    special = [0.0, 1.1e-9, 9.99, 10.0, 1e-9, 2e-8, 5e7, f32.max, f32.tiny, f32.smallest_subnormal]
    edge.append(np.array(special, np.float32))
    values = np.concatenate(edge)
    values = np.concatenate([values, -values])
    weights = _weights_in_rows(values)
    _assert_same(route_template(None, 8), _columns(len(weights), 8, weights))


def test_non_finite_weights_are_spelled_as_the_reference_does() -> None:
    weights = np.array([[np.nan, np.inf], [-np.inf, 0.5], [-0.0, np.float32(1e-20)]], np.float32)
    cols = _columns(3, 2, weights, reqs=['"info"', '"a"'])
    _assert_same(route_template(None, 2), cols)
    text = route_bytes(
        route_template(0, 2), ['"a"'], np.array([0]), np.array([[0, 1]]),
        np.array([[np.nan, -np.inf]], np.float32), np.array([True]), step=np.array([0]),
    )  # fmt: skip
    assert b'"topk_weights":[NaN,-Infinity]' in text


def test_a_non_finite_weight_leaves_request_ids_that_spell_inf_or_nan_alone() -> None:
    # The reference once replaced "inf" and "nan" anywhere in a chunk with a non-finite weight.
    reqs = ['"info"', '"nancy"', '"-inf"']
    weights = np.array([[np.nan, 0.5], [np.inf, 0.25], [-np.inf, 0.125]], np.float32)
    args = (np.array([0, 1, 2]), np.array([[0, 1]] * 3), weights, np.array([True] * 3))
    for text in (
        route_bytes(route_template(0, 2), reqs, *args, step=np.arange(3)).decode(),
        format_routes_reference(route_template(0, 2), reqs, *args, step=np.arange(3)),
    ):
        lines = [json.loads(line) for line in text.splitlines()]
        assert [r["req_id"] for r in lines] == ["info", "nancy", "-inf"]
        assert [r["topk_weights"][1] for r in lines] == [0.5, 0.25, 0.125]
        assert np.isnan(lines[0]["topk_weights"][0])
        assert [r["topk_weights"][0] for r in lines[1:]] == [float("inf"), float("-inf")]


def test_float64_weights_match_whether_or_not_they_are_float32_values() -> None:
    weights = np.concatenate([rng.random(8000), rng.random(8000).astype(np.float32)])
    weights = _weights_in_rows(weights * 10.0 ** rng.integers(-12, 3, weights.size))
    _assert_same(route_template(None, 8), _columns(len(weights), 8, weights))


@pytest.mark.parametrize("top_k", range(1, 9))
def test_every_top_k_with_negative_and_huge_integers(top_k: int) -> None:
    info = np.iinfo(np.int64)
    cols = _columns(300, top_k)
    _assert_same(route_template(None, top_k), cols)
    big = [0, 9, 10, 9999, 10_000, 99_999_999, 10**8, 2**32 - 1, 2**32, 10**16, info.max]
    cols["step"] = np.array(big * 30)[:300]
    cols["token_idx"] = rng.integers(0, info.max, 300)
    _assert_same(route_template(None, top_k), cols)
    cols["ids"] = cols["ids"] - 128  # negative ids
    cols["layer"] = np.full(300, info.min)
    _assert_same(route_template(None, top_k), cols)
    cols = _columns(50, top_k)
    cols["ids"] = cols["ids"].astype(np.int32)
    cols["step"] = cols["step"].astype(np.uint64)
    _assert_same(route_template(None, top_k), cols)


@pytest.mark.parametrize("n", [0, 1, 64, 1000])
def test_request_ids_with_escapes_and_non_ascii(n: int) -> None:
    ids = ["r-1", 'a "quoted" id', "back\\slash", "tab\there", "日本語", "é", "x" * 70, "\0"]
    for ensure_ascii in (True, False):
        reqs = [json.dumps(r, ensure_ascii=ensure_ascii) for r in ids]
        _assert_same(route_template(None, 4), _columns(n, 4, reqs=reqs))
    # text that is not json.dumps output: a raw NUL, an empty id
    _assert_same(route_template(None, 4), _columns(n, 4, reqs=['"a\0b"', "", '"\0"']))


@pytest.mark.parametrize(
    "layer, omit", [(None, ()), (12, ()), (None, ("step",)), (3, ("phase", "step"))]
)
def test_templates_with_a_constant_layer_and_without_optional_fields(
    layer: int | None, omit: tuple[str, ...]
) -> None:
    template = route_template(layer, 3, omit=omit)
    cols = _columns(500, 3)
    if "phase" in omit:
        cols["prefill"] = None
    if "step" in omit:
        cols["step"] = None
    _assert_same(template, cols)


def test_a_missing_column_is_named_as_the_reference_names_it() -> None:
    cols = _columns(2, 2)
    template = route_template(None, 2)
    args = (template, cols["req_json"], cols["token_idx"], cols["ids"], cols["weights"])
    with pytest.raises(ValueError, match="pass step"):
        route_bytes(*args, cols["prefill"], layer=cols["layer"])
    with pytest.raises(ValueError, match="pass prefill"):
        route_bytes(*args, None, layer=cols["layer"], step=cols["step"])


@pytest.mark.parametrize("odd", [None, "nan", "negative"])
def test_the_jsonl_sink_writes_the_reference_lines_and_counts_them(
    tmp_path: Path, odd: str | None
) -> None:
    # odd: a chunk the reference writes (a non-finite weight, a negative id)
    meta = {"type": "meta", "layers_logged": [0, 1], "top_k": 4}
    sink = JsonlSink(tmp_path / "routes.jsonl", meta, 4, overwrite=False)
    reqs = ["a", 'b"q', "日本", "d"]
    seg_routes = np.array([700, 1, 333, 2000])
    n = int(seg_routes.sum())
    c = _columns(n, 4)
    if odd == "nan":
        c["weights"][1000, 2] = np.nan
    elif odd == "negative":
        c["ids"][1000, 2] = -1
    per_route = [c[k] for k in ("token_idx", "layer", "ids", "weights", "prefill", "step")]
    cols = RouteColumns(reqs, seg_routes, *per_route)
    sink.write(cols)
    assert sink.close(None) is None
    req_json = np.repeat([json.dumps(r) for r in reqs], seg_routes)
    want = format_routes_reference(
        route_template(None, 4), req_json, c["token_idx"], c["ids"], c["weights"], c["prefill"],
        layer=c["layer"], step=c["step"],
    )  # fmt: skip
    meta_line = json.dumps(meta, separators=(",", ":")) + "\n"
    assert (tmp_path / "routes.jsonl").read_text() == meta_line + want
    assert sink.routes == n


def test_typical_routes_are_formatted_by_numpy_not_by_the_fallbacks(monkeypatch) -> None:
    # the reference is never called, Python's per-weight format only for the rare weights
    # that sit on a rounding tie (short dyadic fractions such as 0.7841796875)
    import moeprof.route_text as route_text

    def no_reference(*args: object, **kw: object) -> str:
        raise AssertionError("fell back to the reference")

    calls = []

    class CountingFormat(str):
        def __mod__(self, value: object) -> str:
            calls.append(value)
            return str.__mod__(self, value)

    cols = _columns(2000, 4, reqs=['"a"', '"日本"', '"\\"q\\""'])
    mantissa = 0.2 + 0.8 * rng.random((2000, 4))
    cols["weights"] = (mantissa * 10.0 ** rng.integers(-8, 1, (2000, 4))).astype(np.float32)
    template = route_template(None, 4)
    args = (template, cols["req_json"], cols["token_idx"], cols["ids"], cols["weights"])
    kw = {"layer": cols["layer"], "step": cols["step"]}
    want = format_routes_reference(*args, cols["prefill"], **kw)
    monkeypatch.setattr(route_text, "format_routes_reference", no_reference)
    monkeypatch.setattr(route_text, "WEIGHT_FORMAT", CountingFormat(route_text.WEIGHT_FORMAT))
    assert route_bytes(*args, cols["prefill"], **kw) == want.encode()
    assert len(calls) <= 8  # of 8000 weights
