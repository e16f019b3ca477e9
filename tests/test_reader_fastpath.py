"""The vectorized first path of the reader (``moeprof.analysis.fastparse``) agrees with msgspec
and pydantic: the same rows, bit for bit, and the same problems on the same lines, whatever the
bytes; and it accepts nothing that pydantic would reject."""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from logfactory import dumps, hook_line, hook_lines, meta, route, write_log
from pydantic import ValidationError

from moeprof import layout, schema
from moeprof.analysis import fastparse, reader
from moeprof.analysis.reader import open_log

ROOT = Path(__file__).resolve().parents[1]
DECODER = {"vector": "auto", "msgspec": "msgspec", "pydantic": "pydantic"}
"""How a test reads a log -> the reader's ``decoder``: "vector" uses the byte parser first."""
PREFILL, DECODE = schema.PHASES


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location(
        "analysis_throughput", ROOT / "bench" / "analysis_throughput.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_all(path: Path, how: str, on_decoded: reader.DecodedSink | None = None) -> dict[str, Any]:
    """Everything a pass over the log gives, reading it only the way ``how`` says."""
    log = open_log(path, require_meta=False, decoder=DECODER[how])
    issues: list[reader.Issue] = []
    chunks = list(log.chunks(issues.append, on_decoded=on_decoded))
    out: dict[str, Any] = {
        "issues": [(i.line, i.message, i.severity) for i in issues],
        "lines_read": log.lines_read,
        "req_ids": list(log.req_ids),
    }
    for field in reader.RouteChunk.__dataclass_fields__:
        parts = [getattr(c, field) for c in chunks]
        out[field] = np.concatenate(parts) if parts else None
    if out["weights"] is not None:
        out["weights"] = out["weights"].view(np.uint32)  # compare bits, -0.0 included
        out["req_names"] = [log.req_ids[c] for c in out["req"].tolist()]
    for c in chunks:
        assert c.ids.flags.c_contiguous and c.weights.dtype == np.float32
    return out


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


def vector_ok(text: bytes, m: schema.MetaRecord) -> np.ndarray:
    """Which lines of ``text`` (JSON Lines, each ending with a newline) the parser takes."""
    return parse(text, m)[0].ok


def parse(text: bytes, m: schema.MetaRecord) -> tuple[fastparse.Parsed, np.ndarray]:
    parsed, starts = try_parse(text, m)
    assert parsed is not None
    return parsed, starts


def try_parse(text: bytes, m: schema.MetaRecord) -> tuple[fastparse.Parsed | None, np.ndarray]:
    """The parser on ``text`` at the very end of its padded buffer."""
    p = fastparse.BlockParser(m.top_k, m.layers_logged, m.num_experts)
    buf = bytearray(text + b"\0" * p.pad)
    a = np.frombuffer(buf, np.uint8)
    ends = fastparse.line_bounds(a, 0, len(text), np.empty(len(text) + 64, bool))
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    return p.parse(fastparse.word_view(buf), fastparse.row_view(buf), starts, ends), starts


# --------------------------------------------------------------------------- whole logs


@pytest.mark.parametrize("sub_block", [8192, 97])
def test_vector_and_msgspec_paths_give_identical_chunks_on_a_synthetic_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sub_block: int
) -> None:
    path = tmp_path / "synthetic.jsonl"
    _bench().generate(path, 30_000, seed=7)
    monkeypatch.setattr(reader, "BLOCK_BYTES", 1 << 20)  # several blocks
    monkeypatch.setattr(reader, "SUB_BLOCK_LINES", sub_block)
    calls: list[str] = []

    def on_decoded(decoder: str, first: int, count: int) -> None:
        if decoder == "msgspec":
            calls.append(decoder)

    vector = read_all(path, "vector", on_decoded)
    assert not calls  # every line of the hook's layout was parsed without msgspec
    msgspec = read_all(path, "msgspec", on_decoded)
    assert calls
    assert_same(vector, msgspec)
    assert len(vector["line"]) == 30_000 and not vector["issues"]
    step = vector["step"]  # the bench writes steps as the hook does: from 0, never decreasing
    assert step[0] == 0 and (np.diff(step) >= 0).all() and step[-1] > 100


def test_vector_and_pydantic_paths_agree_on_a_log_of_every_shape(tmp_path: Path) -> None:
    rng = random.Random(3)
    lines = []
    for i in range(400):
        req = rng.choice(["0", "17", "x[1]", "a b", "chatcmpl-" + "9f" * 16, 'q"uote', "é"])
        ids = rng.sample(range(60), 4)
        weights = [float(np.float32(rng.random() * 10 ** -rng.randint(0, 6))) for _ in ids]
        phase = rng.choice([*schema.PHASES, None])
        line = hook_line(req, i // 3, rng.choice([3, 12]), ids, weights, phase)
        if i % 7 == 0:
            line = dumps(json.loads(line))  # Python's json: repr floats, same key order
        if i % 11 == 0:
            line = json.dumps(json.loads(line))  # spaces after separators
        if i % 13 == 0:
            line = dumps(dict(reversed(json.loads(line).items())))  # keys in another order
        lines.append(line)
    path = write_log(tmp_path / "shapes.jsonl", lines, meta(layers_logged=[3, 12]))
    assert_same(read_all(path, "vector"), read_all(path, "pydantic"))
    assert_same(read_all(path, "msgspec"), read_all(path, "pydantic"))


def test_request_codes_follow_first_appearance_when_lines_fall_back(tmp_path: Path) -> None:
    """Lines msgspec decodes for the parser are put back in place, and request ids they bring
    get their codes in file order, not in the order the two paths happened to see them."""
    body: list[Any] = []
    for t in range(30):
        for req in ("a", "b", "c", "d"):
            rec = route(req, t, ids=[t % 60, (t + 1) % 60, (t + 2) % 60, (t + 3) % 60])
            body.append(json.dumps(rec) if req in "bd" else dumps(rec))  # b, d: with spaces
    path = write_log(tmp_path / "mixed.jsonl", body)
    got = read_all(path, "vector")
    assert got["req_ids"] == ["a", "b", "c", "d"]
    assert_same(got, read_all(path, "pydantic"))


def test_each_decoder_choice_reads_with_that_decoder_alone(tmp_path: Path) -> None:
    weights = [0.4, 0.3, 0.2, 0.1]
    lines = [hook_line(str(t % 3), t // 3, 12, [1, 2, 3, 4], weights, DECODE) for t in range(100)]
    path = write_log(tmp_path / "d.jsonl", lines)
    for how in DECODER:
        seen: dict[str, int] = {}

        def on_decoded(decoder: str, first: int, count: int) -> None:
            seen[decoder] = seen.get(decoder, 0) + count  # noqa: B023 (called right here)

        read_all(path, how, on_decoded)
        assert seen == {how: 100}
    with pytest.raises(ValueError, match="decoder must be one of"):
        open_log(path, decoder="fast")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- edge cases


EDGE_WEIGHTS = [
    ("1e-05", 1e-05),
    ("6.181274e-05", 6.181274e-05),
    ("1E+2", 100.0),
    ("-0.0", -0.0),
    ("0.123456789", 0.123456789),
    ("0.0001234567", 0.0001234567),
    ("0", 0.0),
    ("1", 1.0),
    ("12.5", 12.5),
    ("-0.25", -0.25),
    ("5e-324", None),  # subnormal: beyond the exact range, left to msgspec
    ("-0", None),  # the integer 0: +0.0 to a JSON parser
    ("0.1234567890123456", None),  # 16 digits
]


@pytest.mark.parametrize(("text", "value"), EDGE_WEIGHTS)
def test_edge_weights_are_read_exactly_or_left_to_the_fallback(
    tmp_path: Path, text: str, value: float | None
) -> None:
    line = hook_line("0", 0, 12, [1, 2], [0.25, 0.5], DECODE).replace("0.25", text)
    m = schema.MetaRecord.model_validate(meta(top_k=2))
    parsed, _ = parse((line + "\n").encode(), m)
    assert bool(parsed.ok[0]) == (value is not None)
    if value is not None:
        got = parsed.weights[0, 0]
        assert got == value and np.signbit(got) == np.signbit(value)
        assert got == schema.parse_route(line, m).topk_weights[0]
    path = write_log(tmp_path / "w.jsonl", [line] * 3, meta(top_k=2))
    assert_same(read_all(path, "vector"), read_all(path, "pydantic"))


@pytest.mark.parametrize("k", [1, 2, 8, 60])
def test_other_top_k_read_the_same_on_every_path(tmp_path: Path, k: int) -> None:
    rng = np.random.default_rng(k)
    lines = []
    for t in range(200):
        ids = rng.choice(64, size=k, replace=False).tolist()
        w = np.sort(rng.dirichlet(np.ones(k)).astype(np.float32))[::-1].tolist()
        lines.append(hook_line(str(t % 5), t // 5, 12, ids, w, DECODE if t % 2 else None))
    lines[50] = lines[50].replace("[", "[63,", 1)  # k + 1 ids: an error
    path = write_log(tmp_path / "k.jsonl", lines, meta(top_k=k, num_experts=64))
    got = read_all(path, "vector")
    assert_same(got, read_all(path, "pydantic"))
    assert_same(got, read_all(path, "msgspec"))
    assert [i[0] for i in got["issues"]] == [52] and len(got["line"]) == 199
    m = schema.MetaRecord.model_validate(meta(top_k=k, num_experts=64))
    assert vector_ok(("\n".join(lines[:50]) + "\n").encode(), m).all()


@pytest.mark.parametrize("layers", [[12], [3, 12], [0, 5, 1000, 7], list(range(0, 40, 3))])
def test_multi_layer_logs_read_the_same_on_every_path(tmp_path: Path, layers: list[int]) -> None:
    rng = random.Random(len(layers))
    lines = []
    for t in range(60):
        for layer in layers:
            ids = rng.sample(range(60), 4)
            lines.append(hook_line("r", t, layer, ids, [0.5, 0.25, 0.125, 0.0625], PREFILL))
    lines[7] = lines[7].replace('"layer":', '"layer":4', 1)  # a layer that is not logged
    path = write_log(tmp_path / "layers.jsonl", lines, meta(layers_logged=layers))
    got = read_all(path, "vector")
    assert_same(got, read_all(path, "pydantic"))
    assert [i[0] for i in got["issues"]] == [9]
    m = schema.MetaRecord.model_validate(meta(layers_logged=layers))
    ok = vector_ok(("\n".join(lines) + "\n").encode(), m)
    assert ok.sum() == len(lines) - 1 and not ok[7]


@pytest.mark.parametrize(
    ("req", "taken"),
    [
        ("0", True),
        ("x[1],y", True),
        ("chatcmpl-" + "0123456789abcdef" * 2, True),
        ("z" * 127, True),
        ("z" * 128, False),  # longer than the parser reads
        ('a"b', False),  # escaped quote
        ("é", False),  # json.dumps escapes it as \u00e9
        ("tab\there", False),
    ],
)
def test_request_ids_are_read_as_written_or_left_to_the_fallback(
    tmp_path: Path, req: str, taken: bool
) -> None:
    lines = [hook_line(req, t, 12, [1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1], None) for t in range(3)]
    m = schema.MetaRecord.model_validate(meta())
    parsed, _ = parse(("\n".join(lines) + "\n").encode(), m)
    assert parsed.ok.tolist() == [taken] * 3
    path = write_log(tmp_path / "r.jsonl", lines)
    got = read_all(path, "vector")
    assert got["req_names"] == [req] * 3
    assert_same(got, read_all(path, "pydantic"))


def test_raw_utf8_and_whitespace_are_left_to_the_fallback(tmp_path: Path) -> None:
    base = hook_line("0", 0, 12, [1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1], DECODE)
    lines = [
        base.replace('"0"', '"é"'),  # raw UTF-8 in a string: valid JSON
        base.replace(",", ", "),
        base.replace(":", " : "),
        base.replace("[1,", "[ 1,"),
        base.replace("}", " }"),
        base + " ",
        base.replace(f'"{DECODE}"', "null"),
    ]
    m = schema.MetaRecord.model_validate(meta())
    assert not vector_ok(("\n".join(lines) + "\n").encode(), m).any()
    path = write_log(tmp_path / "ws.jsonl", lines)
    got = read_all(path, "vector")
    assert not got["issues"] and len(got["line"]) == len(lines)
    assert_same(got, read_all(path, "pydantic"))


@pytest.mark.parametrize("bad", [b'"ph\xa9se":"decode"', b'"x":"\xed\xa0\x80"', b'"x":"\xc0\xaf"'])
def test_invalid_utf8_where_msgspec_does_not_look_is_an_error_on_every_path(
    tmp_path: Path, bad: bytes
) -> None:
    """msgspec skips unknown keys and their values without checking their UTF-8; pydantic
    rejects the line, so the fast paths must too."""
    good = [hook_line("0", t, 12, [1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1], None) for t in range(80)]
    path = tmp_path / "u.jsonl"
    lines = [dumps(meta()).encode(), *(g.encode() for g in good)]
    lines[40] = lines[40][:-1] + b"," + bad + b"}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    want = read_all(path, "pydantic")
    assert want["issues"] == [(41, "binary data, not a JSON text line", "error")]
    assert_same(read_all(path, "vector"), want)
    assert_same(read_all(path, "msgspec"), want)


def test_ids_at_the_edge_of_num_experts(tmp_path: Path) -> None:
    lines = [
        hook_line("0", 0, 12, [59, 0, 58, 1], [0.4, 0.3, 0.2, 0.1], None),
        hook_line("0", 1, 12, [60, 0, 58, 1], [0.4, 0.3, 0.2, 0.1], None),
        hook_line("0", 2, 12, [5, 0, 5, 1], [0.4, 0.3, 0.2, 0.1], None),
        hook_line("0", 3, 12, [1234567, 0, 58, 1], [0.4, 0.3, 0.2, 0.1], None),
        hook_line("0", 4, 12, [7, 0, 58, 1], [0.4, 0.3, 0.2, 0.1], None).replace("[7", "[07"),
    ]
    m = schema.MetaRecord.model_validate(meta())
    assert vector_ok(("\n".join(lines) + "\n").encode(), m).tolist() == [1, 0, 0, 0, 0]
    path = write_log(tmp_path / "e.jsonl", lines)
    got = read_all(path, "vector")
    assert [i[0] for i in got["issues"]] == [3, 4, 5, 6]
    assert_same(got, read_all(path, "pydantic"))
    no_e = tmp_path / "no_e.jsonl"  # without num_experts any id is in range
    write_log(no_e, lines[:1] + lines[3:4], meta(num_experts=None))
    got = read_all(no_e, "vector")
    assert got["ids"][:, 0].tolist() == [59, 1234567]
    assert_same(got, read_all(no_e, "pydantic"))


# --------------------------------------------------------------------------- fuzzing

ALPHABET = b'0123456789.eE+-,[]{}":\\ aZ_\t\x00\x7f\xc3\xa9'


FEW_LAYERS = [3, 12]
"""Layers the parser matches as part of a literal."""
MANY_LAYERS = list(range(1, 48, 2))
"""More than ``fastparse.MAX_LAYER_VARIANTS``: the parser reads the layer as a number."""


def _step(rng: random.Random, i: int) -> int | None:
    """A step as the hook writes it (mostly), or one of the edge cases: none (older logs), 0,
    7, 8 and 15 digits (the parser's limits), 16 digits, beyond 64 bits."""
    choice = rng.random()
    if choice < 0.15:
        return None
    if choice < 0.25:
        return rng.choice([0, 9_999_999, 10_000_000, 10**15 - 1, 10**15, schema.INT64_MAX])
    return 1000 + i // 3


def _valid_lines(rng: random.Random, n: int, layers: list[int]) -> Iterator[str]:
    reqs = ["0", "41", "cmpl-" + "ab12" * 8 + "-0", "x[1]"]
    specials = ["0", "1", "0.5", "1e-05", "6.181274e-05", "-0.0", "0.123456789", "1.5E+2"]
    for i in range(n):
        k = 4
        ids = rng.sample(range(60), k)
        w: list[Any] = [float(np.float32(rng.random() * 10 ** -rng.randint(0, 5))) for _ in ids]
        phase = rng.choice([*schema.PHASES, None])
        layer = rng.choice(layers)
        line = hook_line(rng.choice(reqs), i, layer, ids, w, phase, _step(rng, i))
        if i % 5 == 0:
            line = line.replace(layout.WEIGHT_FORMAT % w[1], rng.choice(specials), 1)
        yield line


def _mutate(rng: random.Random, line: bytes, edits: int) -> bytes:
    for _ in range(edits):
        i = rng.randrange(len(line) + 1)
        op = rng.randrange(3)
        byte = bytes([rng.choice(ALPHABET)])
        if op == 0 and i < len(line):
            line = line[:i] + byte + line[i + 1 :]
        elif op == 1:
            line = line[:i] + byte + line[i:]
        elif i < len(line):
            line = line[:i] + line[i + 1 :]
    return line


@pytest.mark.parametrize("layers", [FEW_LAYERS, MANY_LAYERS])
def test_fuzz_the_parser_accepts_only_what_pydantic_accepts_with_the_same_values(
    layers: list[int],
) -> None:
    """Thousands of lines with random byte edits: every line the parser takes is one pydantic
    takes, with the same values (weights as doubles, bit for bit)."""
    rng = random.Random(1234)
    m = schema.MetaRecord.model_validate(meta(layers_logged=layers))
    originals = [s.encode() for s in _valid_lines(rng, 4000, layers)]
    taken = vector_ok(b"\n".join(originals) + b"\n", m)
    too_long = [b'"step":%d}' % s for s in (10**15, schema.INT64_MAX)]
    long_steps = [any(x in line for x in too_long) for line in originals]
    assert taken.tolist() == [not x for x in long_steps]  # beyond 15 digits: the fallback's
    assert 0 < sum(long_steps) < 0.05 * len(originals)
    mutated = [_mutate(rng, line, 1 + (i % 3 == 0)) for i, line in enumerate(originals)]
    text = b"\n".join(mutated) + b"\n"
    parsed, starts = parse(text, m)
    valid = 0
    for i, line in enumerate(mutated):
        try:
            rec = schema.parse_route(line, m)
        except ValidationError:
            assert not parsed.ok[i], line
            continue
        valid += 1
        if not parsed.ok[i]:
            continue
        assert parsed.ids[:, i].tolist() == rec.topk_ids, line
        got_w = parsed.weights[:, i]
        want_w = np.array(rec.topk_weights, np.float64)
        assert got_w.view(np.uint64).tolist() == want_w.view(np.uint64).tolist(), line
        assert (parsed.token_idx[i], parsed.layer[i]) == (rec.token_idx, rec.layer), line
        phase = schema.PHASES[parsed.phase[i]] if parsed.phase[i] != schema.NO_PHASE else None
        assert phase == rec.phase, line
        step = None if parsed.step[i] == schema.NO_STEP else int(parsed.step[i])
        assert step == rec.step, line
        first = parsed.rid_first[parsed.rid_inverse[i]]
        at = int(starts[first]) + fastparse.RID_OFFSET
        assert text[at : at + int(parsed.rid_len[first])].decode() == rec.req_id, line
    # The fuzz hit both sides, and most valid mutants are still in the layout the parser reads.
    assert 0.05 * len(mutated) < parsed.ok.sum() < 0.5 * len(mutated)
    assert parsed.ok.sum() > 0.6 * valid


@pytest.mark.parametrize(("layers", "trials"), [(FEW_LAYERS, 200), (MANY_LAYERS, 60)])
def test_fuzz_whole_logs_read_like_pydantic_line_by_line(
    tmp_path: Path, layers: list[int], trials: int
) -> None:
    """Small logs with a few random edits (newlines included): rows, request codes, problems
    and their line numbers are what reading line by line with pydantic gives, whichever
    decoders read them."""
    rng = random.Random(99)
    header = meta(layers_logged=layers)
    alphabet = ALPHABET + b"\n"
    for trial in range(trials):
        lines = [s.encode() for s in _valid_lines(rng, 90, layers)]
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(lines))
            lines[i] = _mutate(rng, lines[i], 1)
            if rng.random() < 0.3:  # a valid but unusual spelling
                lines[i] = lines[i].replace(b",", b", ", 1)
        if trial % 10 == 0:
            i = rng.randrange(len(lines))
            lines[i] = lines[i][:10] + bytes([rng.choice(alphabet)]) + lines[i][10:]
        path = tmp_path / f"fuzz{trial}.jsonl"
        path.write_bytes(b"\n".join([dumps(header).encode(), *lines]) + b"\n")
        want = read_all(path, "pydantic")
        assert_same(read_all(path, "vector"), want)
        assert_same(read_all(path, "msgspec"), want)


def test_parsing_never_reads_outside_the_padded_buffer() -> None:
    """Garbage of every kind, ending at the very end of the buffer: no IndexError."""
    rng = random.Random(5)
    m = schema.MetaRecord.model_validate(meta(top_k=8))
    for _ in range(50):
        good = hook_line("0", 1, 12, list(range(8)), [0.1] * 8, DECODE).encode()
        junk = [
            good[: rng.randrange(len(good))] + bytes(rng.choice(b"0123,.e") for _ in range(300))
            for _ in range(rng.randrange(3))
        ]
        parsed, _ = try_parse(b"\n".join([good, good, *junk]) + b"\n", m)
        assert parsed is not None and parsed.ok[:2].all() and not parsed.ok[2:].any()


def test_a_block_of_foreign_lines_is_declined_whole() -> None:
    m = schema.MetaRecord.model_validate(meta())
    text = "".join(json.dumps(route(str(t), t)) + "\n" for t in range(50)).encode()
    assert try_parse(text, m)[0] is None


def test_pydantic_rejects_what_the_parser_declines_for_range_reasons() -> None:
    """Sanity of the reference itself: the schema has the rules the parser relies on."""
    m = schema.MetaRecord.model_validate(meta())
    bad = hook_line("0", 0, 12, [1, 1, 2, 3], [0.4, 0.3, 0.2, 0.1], None)
    with pytest.raises(ValidationError):
        schema.parse_route(bad, m)


def test_a_log_that_changes_layout_midway_reads_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of another writer's layout send the reader to msgspec for a while; it comes back
    to the parser later, and nothing about the result depends on which path read what."""
    monkeypatch.setattr(reader, "BLOCK_BYTES", 1 << 14)
    monkeypatch.setattr(reader, "SUB_BLOCK_LINES", 64)
    rng = random.Random(8)
    lines = []
    for t in range(3000):
        ids = rng.sample(range(60), 4)
        line = hook_line(str(t % 7), t // 7, 12, ids, [0.5, 0.25, 0.125, 0.0625], DECODE)
        lines.append(json.dumps(json.loads(line)) if 500 <= t < 1500 else line)
    path = write_log(tmp_path / "switch.jsonl", lines)
    taken: list[int] = []  # first line of each block the parser took

    def on_decoded(decoder: str, first: int, count: int) -> None:
        if decoder == "vector":
            taken.append(first)

    got = read_all(path, "vector", on_decoded)
    assert min(taken) < 500 and max(taken) > 1500 and not any(600 < t < 1400 for t in taken)
    assert_same(got, read_all(path, "msgspec"))
    assert len(got["line"]) == 3000 and not got["issues"]


@pytest.mark.parametrize(("k", "layers"), [(2, [3, 12]), (4, [0, 5, 7, 23]), (8, [*range(40)])])
def test_the_parser_reads_every_line_the_hook_writer_formats(k: int, layers: list[int]) -> None:
    """The layout the parser expects is the one ``moeprof.hook.writer`` produces: one template
    for every layer, the layer and the engine step per row."""
    from moeprof.hook.writer import format_routes, route_template

    rng = np.random.default_rng(k)
    n = 800
    ids = np.argsort(rng.random((n, 60)), axis=1)[:, :k]
    weights = (rng.random((n, k)) * 10.0 ** -rng.integers(0, 9, (n, k))).astype(np.float32)
    weights[::97] = 0.0
    weights[::89, 0] = 1.0
    req_json = [json.dumps(r) for r in rng.choice(["7", "cmpl-9f2c1e-0", "a[b]c"], n)]
    layer = np.tile(layers, n // len(layers) + 1)[:n]  # a token's layers side by side
    step = 10**9 - 400 + np.arange(n) // 2  # crosses from 9 to 10 digits
    text = format_routes(
        route_template(None, k),
        req_json,
        rng.integers(0, 5000, n),
        ids,
        weights,
        rng.random(n) < 0.5,
        layer=layer,
        step=step,
    ).encode()
    m = schema.MetaRecord.model_validate(meta(top_k=k, layers_logged=layers))
    parsed, _ = parse(text, m)
    assert parsed.ok.all()
    assert parsed.layer.tolist() == layer.tolist() and parsed.step.tolist() == step.tolist()
    for row, line in enumerate(text.splitlines()):
        rec = schema.parse_route(line, m)
        assert parsed.ids[:, row].tolist() == rec.topk_ids
        assert parsed.weights[:, row].tolist() == rec.topk_weights  # doubles, exactly
        assert (rec.layer, rec.step) == (layer[row], step[row])


# --------------------------------------------------------------------------- the engine step


def _lines_with_steps(rng: random.Random, layers: list[int], tokens: int) -> list[str]:
    """A multi-layer log body as the hook writes it (each token's layers side by side, one step
    per forward pass), then a stretch as older writers wrote it (no step), then steps again on
    every other line (mixed)."""
    reqs, token_idx, layer, ids, weights, phases, steps = [], [], [], [], [], [], []
    for t in range(tokens):
        for lay in layers:
            reqs.append(str(t % 3))
            token_idx.append(t // 3)
            layer.append(lay)
            ids.append(rng.sample(range(60), 4))
            weights.append([float(np.float32(rng.random())) for _ in range(4)])
            phases.append(PREFILL if t < tokens // 4 else rng.choice([DECODE, None]))
            no_step = tokens // 3 <= t < tokens // 2 or (t >= tokens // 2 and t % 2 == 0)
            steps.append(None if no_step else t // 3)
    return hook_lines(reqs, token_idx, layer, ids, weights, phases, steps)


@pytest.mark.parametrize("layers", [[12], [3, 12], [0, 5, 1000, 7], list(range(0, 40, 3))])
def test_logs_with_and_without_steps_read_the_same_on_every_path(
    tmp_path: Path, layers: list[int]
) -> None:
    lines = _lines_with_steps(random.Random(len(layers)), layers, 240)
    path = write_log(tmp_path / "steps.jsonl", lines, meta(layers_logged=layers))
    seen: list[str] = []
    got = read_all(path, "vector", lambda decoder, first, count: seen.append(decoder))
    assert set(seen) == {"vector"}  # every line, with a step or without, at full speed
    assert_same(got, read_all(path, "msgspec"))
    assert_same(got, read_all(path, "pydantic"))
    assert not got["issues"] and got["step"].dtype == np.int64
    want = [json.loads(line).get("step", schema.NO_STEP) for line in lines]
    assert got["step"].tolist() == want and want.count(schema.NO_STEP) > len(lines) // 4
    assert got["layer"].tolist() == [json.loads(line)["layer"] for line in lines]


def test_a_log_without_any_step_reads_as_before(tmp_path: Path) -> None:
    rng = random.Random(4)
    lines = [
        hook_line(str(t % 2), t, 12, rng.sample(range(60), 4), [0.5, 0.25, 0.125, 0.0625], ph, None)
        for t, ph in zip(range(300), [PREFILL, DECODE, None] * 100, strict=True)
    ]
    assert all('"step"' not in line for line in lines)
    path = write_log(tmp_path / "old.jsonl", lines)
    got = read_all(path, "vector")
    assert (got["step"] == schema.NO_STEP).all() and len(got["line"]) == 300
    assert_same(got, read_all(path, "msgspec"))
    assert_same(got, read_all(path, "pydantic"))


STEP_CASES = [
    ("0", 0, True),
    ("9999999", 9_999_999, True),
    ("10000000", 10_000_000, True),
    ("123456789012345", 123_456_789_012_345, True),
    ("1234567890123456", 1_234_567_890_123_456, False),  # 16 digits: msgspec's
    (str(schema.INT64_MAX), schema.INT64_MAX, False),
    ("null", schema.NO_STEP, False),  # JSON null: no step, like a line without one
    ("-1", "step: Input should be greater than or equal to 0 (got -1)", False),
    (str(schema.INT64_MAX + 1), "an integer field exceeds 64 bits", False),
    ("01", "not valid JSON", False),
    ("0123456789", "not valid JSON", False),  # a leading zero where the parser reads two words
    ("1.0", "step: Input should be a valid integer (got 1.0)", False),
    ('"3"', "step: Input should be a valid integer (got '3')", False),
    ("true", "step: Input should be a valid integer (got True)", False),
    ("1e3", "step: Input should be a valid integer", False),
    ("12 ", 12, False),  # a space before the brace: valid JSON, but not the hook's layout
]


@pytest.mark.parametrize(("text", "want", "taken"), STEP_CASES)
def test_steps_are_read_exactly_or_named_as_errors_on_every_path(
    tmp_path: Path, text: str, want: int | str, taken: bool
) -> None:
    """A step the parser reads has the value pydantic gives; a step that is not a non-negative
    integer in range is an error on its line, with pydantic's reason, whichever path read it."""
    good = [hook_line("0", t, 12, [1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1], DECODE, t) for t in range(9)]
    odd = hook_line("0", 9, 12, [1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1], DECODE, 77)
    odd = odd.replace('"step":77}', f'"step":{text}}}')
    lines = [*good, odd, *good]
    m = schema.MetaRecord.model_validate(meta())
    parsed, _ = parse(("\n".join(lines) + "\n").encode(), m)
    assert parsed.ok.tolist() == [True] * 9 + [taken] + [True] * 9
    if taken:
        assert parsed.step[9] == want
    path = write_log(tmp_path / "s.jsonl", lines)
    got = read_all(path, "vector")
    assert_same(got, read_all(path, "msgspec"))
    assert_same(got, read_all(path, "pydantic"))
    if isinstance(want, int):
        assert not got["issues"] and got["step"][9] == want
        return
    # An error: the line is left out and named, as a problem with any other field is.
    assert [(line, msg.startswith(want)) for line, msg, _ in got["issues"]] == [(11, True)]
    assert len(got["line"]) == 18
    with pytest.raises(reader.LogError) as exc:
        list(open_log(path).chunks())
    assert str(exc.value).startswith(f"{path}:11: {want}")


def test_the_step_of_a_truncated_last_line_is_checked_too(tmp_path: Path) -> None:
    lines = [hook_line("0", t, 12, [1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1], DECODE, t) for t in range(4)]
    lines[-1] = lines[-1].replace('"step":3}', '"step":-3}')
    path = write_log(tmp_path / "t.jsonl", lines, trailing_newline=False)
    got = read_all(path, "vector")
    assert got["issues"][0][0] == 5 and "step" in got["issues"][0][1]
    assert_same(got, read_all(path, "pydantic"))
