"""Logs written by other tools: dummy batches told apart from broken keys and double logging.

The model case is a public hand-patched vLLM logger's log of Qwen1.5-MoE layer 0: vLLM's two
dummy batches first (8,192 and 256 identical routes), then the real tokens, all under one
req_id with a token_idx counter that restarts with each batch, so keys repeat all the time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from logfactory import meta, route, run_cli, skewed_routes, write_log

from moeprof.analysis.analyze import analyze_log, analyze_logs
from moeprof.analysis.contamination import (
    Contamination,
    ContaminationDetector,
    RepeatedKeys,
    Run,
    SuspectFilter,
    _Restarts,
    degenerate_keys,
    route_fingerprints,
    vllm_batch_size,
)
from moeprof.analysis.reader import RouteLog
from moeprof.render.note import markdown_note

COLUMNS = ("group", "token_idx", "layer", "ids", "weights", "line")
"""The detector's arguments, in order, as :func:`foreign_columns` names them."""
PREFILL_BATCH = 1007
DECODE_BATCHES = 134
DECODE_BATCH = 25
REAL = PREFILL_BATCH + DECODE_BATCHES * DECODE_BATCH  # 4,357
DUMMY = 8192 + 256


def _real_routes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    ids = np.argsort(rng.random((n, 60)), axis=1)[:, :4]
    w = rng.random((n, 4)).astype(np.float32)
    return ids, w


def foreign_columns(layers: tuple[int, ...] = (0,)) -> dict[str, np.ndarray]:
    """The foreign log as columns: dummy runs of 8,192 and 256 identical routes, then a
    prefill batch of 1,007 and 134 decode batches of 25 distinct real routes; one req_id,
    token_idx restarting at 0 with each batch; each token's lines for all ``layers``
    together."""
    rng = np.random.default_rng(13)
    batches: list[tuple[np.ndarray, np.ndarray]] = [
        (
            np.tile([[1, 2, 3, 4]], (8192, 1)),
            np.tile(np.float32([[0.4, 0.3, 0.2, 0.1]]), (8192, 1)),
        ),
        (np.tile([[5, 6, 7, 8]], (256, 1)), np.full((256, 4), 0.25, np.float32)),
    ]
    batches.append(_real_routes(PREFILL_BATCH, rng))
    batches += [_real_routes(DECODE_BATCH, rng) for _ in range(DECODE_BATCHES)]
    ids, w, pos = [], [], []
    for b_ids, b_w in batches:
        n = b_ids.shape[0]
        for_layers = [(b_ids + 9 * i) % 60 if i else b_ids for i in range(len(layers))]
        ids.append(np.stack(for_layers, axis=1).reshape(n * len(layers), 4))
        w.append(np.repeat(b_w, len(layers), axis=0))
        pos.append(np.repeat(np.arange(n), len(layers)))
    n = sum(p.size for p in pos)
    return {
        "ids": np.concatenate(ids),
        "weights": np.concatenate(w),
        "token_idx": np.concatenate(pos),
        "layer": np.tile(np.asarray(layers), n // len(layers)),
        "group": np.tile(np.arange(len(layers)), n // len(layers)),
        "line": np.arange(2, n + 2),
    }


def detect(
    cols: dict[str, np.ndarray], size: int | None = None
) -> tuple[ContaminationDetector, int]:
    """A finished detector (``min_run`` 64) that saw ``cols`` in chunks of ``size`` rows (all
    at once by default) and a second time when it asked (:attr:`needs_reread`), as ``analyze``
    shows it a log; and how many times it saw them."""
    det = ContaminationDetector(min_run=64, layers=int(cols["group"].max()) + 1)
    step = size or cols["line"].size
    chunks = [slice(a, a + step) for a in range(0, cols["line"].size, step)]
    for s in chunks:
        det.add(*(cols[k][s] for k in COLUMNS))
    passes = 1
    if det.needs_reread:
        with pytest.raises(RuntimeError, match="reread"):
            det.finish()
        passes += 1
        for s in chunks:
            det.reread(*(cols[k][s] for k in COLUMNS))
    assert not det.needs_reread
    verdict = det.finish()
    assert isinstance(verdict, Contamination)
    return det, passes


def write_foreign(path: Path, layers: tuple[int, ...] = (0,)) -> Path:
    c = foreign_columns(layers)
    body = [
        route("0", t, lay, i, [float(x) for x in ws])
        for t, lay, i, ws in zip(
            c["token_idx"].tolist(),
            c["layer"].tolist(),
            c["ids"].tolist(),
            c["weights"],
            strict=True,
        )
    ]
    return write_log(
        path, body, meta(layers_logged=list(layers), model_id="Qwen/Qwen1.5-MoE-A2.7B")
    )


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_foreign(tmp_path_factory.mktemp("foreign") / "foreign.jsonl")


# --------------------------------------------------------------------------- the foreign log


def test_foreign_log_classes_add_up_and_only_the_dummy_runs_are_suspect(foreign: Path) -> None:
    c = analyze_log(foreign).contamination
    assert c.records == 12_805
    assert (c.dummy_runs, c.dummy_records, c.run_lengths) == (2, DUMMY, {8192: 1, 256: 1})
    assert c.vllm_sized_runs == 2 and c.longest_run == Run(0, 2, 8193, 8192)
    assert c.key_scheme == "degenerate" and c.req_ids == 1
    assert c.token_idx_restarts == 1 + 1 + DECODE_BATCHES  # every batch after the first
    # every real token repeats a key: the first batch's a dummy batch used, the rest each other's
    assert c.repeated_keys == RepeatedKeys(
        same_route=0, after_dummy=PREFILL_BATCH, different_route=DECODE_BATCHES * DECODE_BATCH
    )
    assert c.double_logged_records == 0
    assert (c.suspect_records, c.kept_records) == (DUMMY, REAL)
    assert c.dummy_records + c.double_logged_records + c.kept_records == c.records
    assert c.suspect_share == pytest.approx(DUMMY / 12_805)


def test_exclude_suspect_drops_exactly_the_dummy_runs_and_keeps_every_real_token(
    foreign: Path,
) -> None:
    a = analyze_log(foreign, exclude_suspect=True)
    assert (a.records, a.excluded) == (REAL, DUMMY)
    cols = foreign_columns()
    counts = np.bincount(cols["ids"][DUMMY:].ravel(), minlength=60)
    assert a.layers[0].stats.counts == counts.tolist()  # the real routes, all of them


def test_the_sentence_states_each_class_and_the_broken_keys(foreign: Path) -> None:
    text = analyze_log(foreign).contamination.describe()
    assert text.startswith("8,448 of 12,805 records (66.0%) look suspect. ")
    assert (
        "Dummy batches: 8,448 records in 2 runs of >= 64 identical routes (8,192 and 256 long, "
        "vLLM's profiling/CUDA-graph batch sizes; longest at lines 2-8,193)."
    ) in text
    assert (
        "Double logging: not detectable, keys do not identify tokens in this log (1 req_id" in text
    )
    assert "token_idx restarts 136 times, 3,350 records repeat a real record's key" in text
    assert "double logging or" not in text and "100.0%" not in text


def test_terminal_markdown_and_json_show_the_classes(foreign: Path) -> None:
    code, out = run_cli("analyze", str(foreign))
    assert code == 0
    assert "contamination: 8,448 of 12,805 records (66.0%) look suspect. Dummy batches:" in out
    assert "keys do not identify tokens" in out and "Rerun with --exclude-suspect" in out
    note = markdown_note(analyze_logs([foreign]))
    assert "- Caution: 8,448 of 12,805 records (66.0%) look suspect. Dummy batches" in note
    code, out = run_cli("analyze", str(foreign), "--json")
    data = json.loads(out[out.index("{") :])["logs"][0]["contamination"]
    assert data["dummy_records"] == DUMMY and data["double_logged_records"] == 0
    assert data["kept_records"] == REAL and data["key_scheme"] == "degenerate"
    assert data["repeated_keys"] == {
        "same_route": 0,
        "after_dummy": PREFILL_BATCH,
        "different_route": DECODE_BATCHES * DECODE_BATCH,
    }
    assert data["run_lengths"] == {"8192": 1, "256": 1}
    assert data["suspect_share"] == pytest.approx(DUMMY / 12_805)
    code, out = run_cli("analyze", str(foreign), "--exclude-suspect")
    assert code == 0 and "4,357 routes" in out and "8,448 suspect records excluded" in out


def test_a_two_layer_foreign_log_has_its_runs_per_layer(tmp_path: Path) -> None:
    log = write_foreign(tmp_path / "two.jsonl", layers=(0, 5))
    a = analyze_log(log, exclude_suspect=True)
    c = a.contamination
    assert c.run_lengths == {8192: 2, 256: 2} and c.dummy_records == 2 * DUMMY
    assert c.req_ids == 1 and c.key_scheme == "degenerate"
    assert (a.records, a.excluded) == (2 * REAL, 2 * DUMMY)
    assert "8,192 (x2) and 256 (x2) long" in c.describe()


# --------------------------------------------------------------------------- hook-like logs


def test_genuinely_double_logged_routes_in_a_hook_like_log_are_flagged_and_excluded(
    tmp_path: Path,
) -> None:
    clean = skewed_routes(n_requests=8, prompt=50, generated=30, seed=5)
    twice = [r for rec in clean for r in ([rec, rec] if rec["req_id"] == "3" else [rec])]
    ref = analyze_log(write_log(tmp_path / "clean.jsonl", clean))
    log = write_log(tmp_path / "twice.jsonl", twice)
    a = analyze_log(log)
    c = a.contamination
    assert c.key_scheme == "distinct" and c.dummy_records == 0
    assert c.double_logged_records == 50 + 29  # request 3's routes, each written twice
    assert c.repeated_keys == RepeatedKeys(same_route=79)
    assert "Double logging: 79 records repeat an earlier record's req_id, token_idx" in (
        c.describe()
    )
    b = analyze_log(log, exclude_suspect=True)
    assert (b.records, b.excluded) == (ref.records, 79)
    assert b.layers[0].stats.counts == ref.layers[0].stats.counts


def test_keys_reused_with_other_routes_in_a_hook_like_log_are_kept_and_said(tmp_path: Path) -> None:
    clean = skewed_routes(n_requests=4, prompt=30, generated=10, seed=2)
    rng = np.random.default_rng(1)
    again = [  # request 1's prompt again, other routes (a recompute with other numerics)
        {**r, "topk_weights": [float(np.float32(x)) for x in rng.random(4)]}
        for r in clean
        if r["req_id"] == "1" and r["phase"] == "prefill"
    ][:10]
    log = write_log(tmp_path / "again.jsonl", clean + again)
    c = analyze_log(log).contamination
    assert not c.suspicious and c.key_scheme == "distinct"  # 10 of 166: not a broken scheme
    assert c.repeated_keys == RepeatedKeys(different_route=10)
    assert (
        c.describe() == "Kept, not double logging: 10 repeat an earlier key with a different route."
    )
    code, out = run_cli("analyze", str(log))
    assert code == 0
    assert "no sign of dummy batches or double logging. Kept, not double logging: 10" in out


def test_a_degenerate_key_scheme_without_dummy_batches_is_said_and_nothing_is_excluded(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(3)
    body = []
    for _ in range(40):  # 40 batches of 20 tokens, token_idx restarting, one req_id
        ids, w = _real_routes(20, rng)
        body += [route("x", t, 12, ids[t].tolist(), w[t].tolist()) for t in range(20)]
    log = write_log(tmp_path / "degenerate.jsonl", body)
    a = analyze_log(log, exclude_suspect=True)
    c = a.contamination
    assert not c.suspicious and c.key_scheme == "degenerate"
    assert (a.records, a.excluded) == (800, 0)
    assert c.repeated_keys == RepeatedKeys(different_route=780)
    assert any("keys do not identify tokens" in w for w in a.warnings)
    assert "- Caution: Double logging: not detectable" in markdown_note(analyze_logs([log]))


# --------------------------------------------------------------------------- the pieces


def test_vllm_batch_sizes_are_capture_sizes_and_powers_of_two() -> None:
    assert all(vllm_batch_size(n) for n in (1, 2, 4, 8, 248, 256, 272, 512, 1024, 8192, 16384))
    assert not any(vllm_batch_size(n) for n in (3, 65, 100, 258, 520, 1000, 4357))
    with pytest.raises(ValueError, match="`n`"):
        vllm_batch_size(0)


def test_degenerate_keys_needs_both_a_share_and_a_minimum() -> None:
    assert degenerate_keys(64, 1280)  # 5% exactly
    assert not degenerate_keys(63, 1000)  # below the minimum
    assert not degenerate_keys(100, 2001)  # below 5%
    assert degenerate_keys(3350, 4357)
    with pytest.raises(ValueError, match="`collisions`"):
        degenerate_keys(10, 5)
    with pytest.raises(ValueError, match="`share`"):
        degenerate_keys(1, 5, share=0)


def test_route_fingerprints_tell_routes_apart_bit_for_bit() -> None:
    ids = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [2, 1, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    w = np.float32([[0.4, 0.3, 0.2, 0.1]] * 5)
    w[3, 0] = np.nextafter(np.float32(0.4), np.float32(1))  # one ulp
    fp = route_fingerprints(ids, w)
    assert fp.dtype == np.uint32 and (fp != 0).all()
    assert fp[0] == fp[1] == fp[4]
    assert len({int(fp[0]), int(fp[2]), int(fp[3])}) == 3  # order and one ulp both count
    zero = route_fingerprints(np.array([[0, 1]]), np.float32([[0.0, 0.0]]))
    neg = route_fingerprints(np.array([[0, 1]]), np.float32([[-0.0, 0.0]]))
    assert zero[0] != neg[0]
    with pytest.raises(ValueError, match="`ids` and `weights`"):
        route_fingerprints(ids, w[:, :3])


def test_restarts_count_token_idx_that_do_not_rise_within_a_group() -> None:
    r = _Restarts()
    r.add(np.array([0, 0, 1, 0, 1]), np.array([0, 1, 0, 0, 1]))  # group 0: 0, 1, 0 -> 1
    r.add(np.array([0, 1]), np.array([0, 1]))  # group 0: 0 after 0; group 1: 1 after 1 -> 2
    assert r.count == 3


def test_suspect_filter_needs_no_fingerprints_when_nothing_was_double_logged() -> None:
    cols = foreign_columns()
    det, _ = detect(cols)
    f = SuspectFilter(det)
    assert f._last is None
    drop = f.mask(*(cols[k] for k in COLUMNS))
    assert drop[:DUMMY].all() and not drop[DUMMY:].any()


def _dummy_log(real: int, dummy: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A dummy batch (identical routes under keys the real tokens reuse) then real tokens."""
    ids, w = _real_routes(real, rng)
    return {
        "group": np.zeros(real + dummy, np.int64),
        "token_idx": np.concatenate([np.arange(dummy), np.arange(real)]),
        "layer": np.full(real + dummy, 12),
        "ids": np.concatenate([np.tile([[1, 2, 3, 4]], (dummy, 1)), ids]),
        "weights": np.concatenate([np.tile(np.float32([[0.4, 0.3, 0.2, 0.1]]), (dummy, 1)), w]),
        "line": np.arange(2, real + dummy + 2),
    }


def test_contamination_finds_a_dummy_batch_run_split_across_chunks() -> None:
    cols = _dummy_log(real=3000, dummy=2000, rng=np.random.default_rng(2))
    det, passes = detect(cols, 700)  # chunk boundaries fall inside the run
    c = det.finish()
    assert (c.dummy_runs, c.dummy_records, c.run_lengths) == (1, 2000, {2000: 1})
    assert c.longest_run == Run(12, 2, 2001, 2000)
    # the real tokens reuse the dummy batch's keys 0..1999 with their own routes: kept, and
    # told apart from double logging by a second look at the repeated keys' routes
    assert passes == 2
    assert c.repeated_keys == RepeatedKeys(same_route=0, after_dummy=2000, different_route=0)
    assert c.double_logged_records == 0 and c.key_scheme == "distinct"
    assert c.suspect_records == 2000 and c.suspect_share == pytest.approx(0.4)
    assert c.kept_records == 3000
    drop = SuspectFilter(det).mask(*(cols[k] for k in COLUMNS))
    assert drop[:2000].all() and not drop[2000:].any()  # real tokens reusing the keys stay


def test_double_logged_tokens_keep_their_first_copy_when_excluded() -> None:
    ids, w = _real_routes(100, np.random.default_rng(4))
    cols = {  # the block written twice
        "group": np.zeros(200, np.int64),
        "token_idx": np.concatenate([np.arange(100), np.arange(100)]),
        "layer": np.full(200, 12),
        "ids": np.concatenate([ids, ids]),
        "weights": np.concatenate([w, w]),
        "line": np.arange(2, 202),
    }
    det, passes = detect(cols)
    c = det.finish()
    assert passes == 2
    assert (c.double_logged_records, c.dummy_runs, c.suspect_records) == (100, 0, 100)
    assert c.repeated_keys == RepeatedKeys(same_route=100)
    drop = SuspectFilter(det).mask(*(cols[k] for k in COLUMNS))
    assert drop.tolist() == [False] * 100 + [True] * 100


def test_short_runs_of_identical_routes_are_not_flagged_and_need_one_pass() -> None:
    cols = _dummy_log(real=500, dummy=63, rng=np.random.default_rng(3))
    cols["token_idx"] = np.arange(cols["line"].size)  # no repeated keys
    det, passes = detect(cols)
    c = det.finish()
    assert passes == 1
    assert not c.suspicious and c.dummy_runs == 0 and c.longest_run is None
    assert c.describe() == ""


# --------------------------------------------------------------------------- two passes


def slow_verdict(cols: dict[str, np.ndarray], min_run: int = 64) -> tuple[int, RepeatedKeys]:
    """(dummy records, repeated keys) the obvious way, one record at a time: runs of at least
    ``min_run`` consecutive identical routes (ids and weight bits) of one layer are dummy;
    then, in file order, each record outside them whose (group, token_idx) key an earlier
    record had is sorted by that previous record: same route, else a dummy-run record, else
    a real one."""
    n = cols["line"].size
    bits = cols["weights"].view(np.uint32)
    routes = [(tuple(cols["ids"][i].tolist()), tuple(bits[i].tolist())) for i in range(n)]
    in_run = np.zeros(n, bool)
    for lay in np.unique(cols["layer"]).tolist():
        rows = np.flatnonzero(cols["layer"] == lay).tolist()
        start = 0
        for j in range(1, len(rows) + 1):
            if j == len(rows) or routes[rows[j]] != routes[rows[j - 1]]:
                if j - start >= min_run:
                    in_run[rows[start:j]] = True
                start = j
    last: dict[tuple[int, int], tuple[tuple, bool]] = {}
    same = after = other = 0
    for i, key in enumerate(zip(cols["group"].tolist(), cols["token_idx"].tolist(), strict=True)):
        prev = last.get(key)
        if prev is not None and not in_run[i]:
            if prev[0] == routes[i]:
                same += 1
            elif prev[1]:
                after += 1
            else:
                other += 1
        last[key] = (routes[i], bool(in_run[i]))
    return int(in_run.sum()), RepeatedKeys(same, after, other)


@pytest.mark.parametrize("layers", [(0,), (0, 5)])
def test_the_verdict_equals_a_slow_reference_wherever_chunks_end(layers: tuple[int, ...]) -> None:
    cols = foreign_columns(layers)
    # double logging too: the foreign log's real part written twice, after its dummy runs
    real = slice(len(layers) * DUMMY, None)
    twice = {k: np.concatenate([cols[k], cols[k][real]]) for k in COLUMNS}
    twice["line"] = np.arange(2, twice["group"].size + 2)
    for log in (cols, twice):
        dummy, repeated = slow_verdict(log)
        verdicts = []
        for size in (log["line"].size, 4096, 700, 63):
            det, passes = detect(log, size)
            verdicts.append(det.finish())
            assert passes == 2  # keys repeat outside the dummy runs: a second look
        assert all(v == verdicts[0] for v in verdicts[1:])
        assert (verdicts[0].dummy_records, verdicts[0].repeated_keys) == (dummy, repeated)
    assert verdicts[0].repeated_keys.same_route > 0  # the second copy (the key scheme is
    # degenerate, so it is not called double logging)


def test_a_hook_log_is_read_once_and_repeated_keys_once_more(
    tmp_path: Path, foreign: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = []
    chunks = RouteLog.chunks

    def counted(self: RouteLog, *args: object, **kwargs: object) -> object:
        reads.append(self.path)
        return chunks(self, *args, **kwargs)

    monkeypatch.setattr(RouteLog, "chunks", counted)

    def times_read(path: Path, **kwargs: object) -> int:
        reads.clear()
        analyze_log(path, **kwargs)  # type: ignore[arg-type]
        return len(reads)

    clean = skewed_routes(n_requests=8, prompt=50, generated=30, seed=5, layers=(3, 12))
    hook = write_log(tmp_path / "hook.jsonl", clean, meta(layers_logged=[3, 12]))
    assert times_read(hook) == 1
    assert times_read(hook, exclude_suspect=True) == 2  # the exclusion pass; nothing to reread
    # keys repeated only inside a dummy run (one key for the whole batch) need no second look
    one_layer = skewed_routes(n_requests=8, prompt=50, generated=30, seed=5)
    dummy = [route("9", 0, ids=[1, 2, 3, 4], weights=[0.4, 0.3, 0.2, 0.1]) for _ in range(300)]
    assert times_read(write_log(tmp_path / "dummy.jsonl", dummy + one_layer)) == 1
    twice = [r for rec in one_layer for r in ([rec, rec] if rec["req_id"] == "3" else [rec])]
    assert times_read(write_log(tmp_path / "twice.jsonl", twice)) == 2
    assert times_read(foreign) == 2
    assert times_read(foreign, exclude_suspect=True) == 3
