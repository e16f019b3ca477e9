"""bench/overhead.py's pure functions: the round order, the bootstrap interval of the median
ratio and its verdict, and reading the hook's stats line out of an engine's output."""

from __future__ import annotations

import importlib.util
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "overhead.py"
_spec = importlib.util.spec_from_file_location("bench_overhead", _PATH)
assert _spec is not None and _spec.loader is not None
overhead = importlib.util.module_from_spec(_spec)
sys.modules["bench_overhead"] = overhead
_spec.loader.exec_module(overhead)


def test_rounds_form_a_cyclic_latin_square() -> None:
    arms = ["baseline", "logged[1]", "logged[all]"]
    orders = [overhead.round_order(arms, i) for i in range(6)]
    assert orders[0] == arms
    assert orders[1] == ["logged[1]", "logged[all]", "baseline"]
    assert orders[2] == ["logged[all]", "baseline", "logged[1]"]
    assert orders[3] == orders[0]
    for position in range(3):  # every arm in every position once per 3 rounds
        assert sorted(o[position] for o in orders[:3]) == sorted(arms)
    assert overhead.round_order(["baseline", "logged[0]"], 1) == ["logged[0]", "baseline"]


def test_equal_ratios_give_a_point_interval() -> None:
    assert overhead.bootstrap_median_ci([1.02] * 7) == (pytest.approx(1.02), pytest.approx(1.02))
    assert overhead.bootstrap_median_ci([0.99]) == (pytest.approx(0.99), pytest.approx(0.99))


def test_interval_contains_the_median_and_narrows_with_more_rounds() -> None:
    rng = np.random.default_rng(7)
    draws = list(1.01 + 0.03 * rng.standard_normal(200))
    widths = []
    for n in (6, 24, 200):
        ratios = draws[:n]
        lo, hi = overhead.bootstrap_median_ci(ratios)
        assert lo <= statistics.median(ratios) <= hi
        assert min(ratios) <= lo and hi <= max(ratios)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]


def test_interval_is_deterministic_and_follows_the_level() -> None:
    ratios = [0.98, 1.01, 1.02, 1.04, 0.99, 1.07, 1.00, 1.03]
    assert overhead.bootstrap_median_ci(ratios) == overhead.bootstrap_median_ci(ratios)
    lo95, hi95 = overhead.bootstrap_median_ci(ratios)
    lo50, hi50 = overhead.bootstrap_median_ci(ratios, level=0.5)
    assert lo95 <= lo50 <= hi50 <= hi95
    with pytest.raises(ValueError):
        overhead.bootstrap_median_ci([])
    with pytest.raises(ValueError):
        overhead.bootstrap_median_ci(ratios, level=1.0)


def test_target_is_met_only_when_the_upper_end_is_within_it() -> None:
    assert overhead.ratio_stats([1.01] * 5, 1.03)["target_met"] is True
    assert overhead.ratio_stats([1.03] * 5, 1.03)["target_met"] is True
    # median 1.01 but a wide interval: not met
    wide = overhead.ratio_stats([0.95, 1.0, 1.01, 1.06, 1.10], 1.03)
    assert wide["median"] == pytest.approx(1.01)
    assert wide["ci_high"] > 1.03 and wide["target_met"] is False
    assert (wide["min"], wide["max"], wide["rounds"]) == (0.95, 1.10, 5)


def test_too_few_rounds_never_meet_the_target() -> None:
    assert overhead.ratio_stats([1.0] * 4, 1.03)["target_met"] is False


STATS = (
    '{"routes": 4000, "layers": 4, "writer_cpu_sec": 0.012, "ring_bytes": 4194304, '
    '"device_bytes": 524288, "steps": 120}'
)


def test_stats_line_is_read_with_and_without_a_vllm_prefix() -> None:
    text = "\n".join(
        [
            "INFO 11-30 06:00:00 [llm.py:1] something else",
            f"moeprof: stats {STATS}",
            "(EngineCore pid=123) INFO 11-30 06:00:00 [collector.py:90] moeprof: stats " + STATS,
            "(EngineCore pid=123) INFO moeprof: stats {not json",
            "moeprof: logging MoE layer 1 of tiny to /tmp/x.jsonl",
        ]
    )
    found = overhead.parse_hook_stats(text)
    assert len(found) == 2
    assert found[0] == found[1]
    assert found[0]["routes"] == 4000 and found[0]["ring_bytes"] == 4194304


def test_engine_stats_derive_us_per_route_and_mib() -> None:
    one = overhead.engine_stats(overhead.parse_hook_stats(f"x moeprof: stats {STATS}\n"))
    assert one is not None
    assert one["writer_us_per_route"] == pytest.approx(3.0)
    assert one["ring_mib"] == pytest.approx(4.0)
    assert one["device_mib"] == pytest.approx(0.5)
    assert (one["layers"], one["steps"], one["workers"]) == (4, 120, 1)
    two = overhead.engine_stats(overhead.parse_hook_stats(f"moeprof: stats {STATS}\n" * 2))
    assert two is not None
    assert two["routes"] == 8000 and two["ring_mib"] == pytest.approx(8.0)
    assert two["writer_us_per_route"] == pytest.approx(3.0)


def test_missing_stats_are_not_available_not_an_error() -> None:
    assert overhead.parse_hook_stats("INFO nothing from the hook here\n") == []
    assert overhead.engine_stats([]) is None
    partial = overhead.engine_stats([{"routes": 10}])
    assert partial is not None and partial["writer_us_per_route"] is None
    arm = overhead.arm_hook_stats([None, None])
    assert arm["writer_us_per_route"] is None and arm["engines_with_stats"] == 0
    assert overhead.fmt(None, ".2f") == "n/a"
    mixed = overhead.arm_hook_stats([None, overhead.engine_stats([{"routes": 10}])])
    assert mixed["engines_with_stats"] == 1 and mixed["routes"] == 10


def test_layer_selections_become_named_arms() -> None:
    arms = overhead.logged_arms(["1", "all", "0-3"])
    assert [a.name for a in arms] == ["logged[1]", "logged[all]", "logged[0-3]"]
    assert overhead.naive_layer(arms) == 1
    assert overhead.naive_layer(overhead.logged_arms(["all"])) is None
    with pytest.raises(ValueError):
        overhead.logged_arms(["1", " 1 "])
    both = overhead.logged_arms(["all"], ["jsonl", "parquet"])
    assert [(a.name, a.sink) for a in both] == [
        ("logged[all]", "jsonl"),
        ("logged[all]/parquet", "parquet"),
    ]
    assert len({a.slug for a in both}) == 2  # their logs do not collide
    writers = overhead.parse_args(["--layers", "all", "--writer", "thread", "--writer", "process"])
    assert [(a.name, a.writer) for a in writers.arms] == [
        ("logged[all]", "thread"),
        ("logged[all]/process", "process"),
    ]
    crossed = ["--layers", "1", "--layers", "all", "--writer", "thread", "--writer", "process"]
    picked = overhead.parse_args([*crossed, "--only", "logged[1]", "--only", "logged[all]/process"])
    assert [a.name for a in picked.arms] == ["logged[1]", "logged[all]/process"]
    with pytest.raises(SystemExit):
        overhead.parse_args(["--layers", "all", "--only", "logged[2]"])
    args = overhead.parse_args(["--layer", "2"])
    assert [a.name for a in args.arms] == ["logged[2]"]
    assert [a.name for a in overhead.parse_args([]).arms] == ["logged[0]"]
    args = overhead.parse_args(["--layers", "1", "--layers", "all", "--pairs", "6"])
    assert [a.name for a in args.arms] == ["logged[1]", "logged[all]"] and args.pairs == 6


# --- bench/overhead_interleaved.py: the interval over blocks of rounds ----------------------

sys.path.insert(0, str(_PATH.parent))  # overhead_interleaved imports its sibling overhead
_ispec = importlib.util.spec_from_file_location(
    "bench_overhead_interleaved", _PATH.with_name("overhead_interleaved.py")
)
assert _ispec is not None and _ispec.loader is not None
interleaved = importlib.util.module_from_spec(_ispec)
sys.modules["bench_overhead_interleaved"] = interleaved
_ispec.loader.exec_module(interleaved)


def test_one_block_gives_the_plain_bootstrap_interval() -> None:
    ratios = [0.98, 1.01, 1.02, 1.04, 0.99, 1.07, 1.00, 1.03]
    plain = overhead.bootstrap_median_ci(ratios, resamples=4000)
    blocked = interleaved.block_bootstrap_median_ci([ratios], resamples=4000)
    assert blocked == pytest.approx(plain, abs=0.006)


def test_blocks_that_disagree_widen_the_interval_beyond_the_pooled_rounds() -> None:
    rng = np.random.default_rng(3)
    # Three blocks whose engines ran at different speeds: within a block the rounds agree.
    blocks = [list(level + 0.005 * rng.standard_normal(12)) for level in (0.99, 1.02, 1.05)]
    pooled_lo, pooled_hi = overhead.bootstrap_median_ci([r for b in blocks for r in b])
    lo, hi = interleaved.block_bootstrap_median_ci(blocks)
    assert hi - lo > 2 * (pooled_hi - pooled_lo)
    assert lo <= statistics.median([r for b in blocks for r in b]) <= hi


def test_blocked_verdict_needs_the_upper_end_within_the_target() -> None:
    agree = [[1.00, 1.01, 0.99, 1.00, 1.01, 1.00]] * 3
    met = interleaved.blocked_ratio_stats(agree, target=1.03)
    assert met["target_met"] and met["blocks"] == 3 and met["rounds"] == 18
    assert met["block_medians"] == [pytest.approx(1.0)] * 3
    spread = [[1.00] * 6, [1.06] * 6, [1.02] * 6]
    assert not interleaved.blocked_ratio_stats(spread, target=1.03)["target_met"]
    with pytest.raises(ValueError):
        interleaved.block_bootstrap_median_ci([[1.0], []])


# --- both overhead scripts: one set of arm options ---------------------------------------


@pytest.mark.parametrize("script", [overhead, interleaved], ids=["overhead", "interleaved"])
def test_both_overhead_scripts_build_the_same_arms_from_the_same_options(script) -> None:
    args = script.parse_args(
        [
            *("--layers", "1", "--layer", "all", "--sink", "parquet", "--writer", "process"),
            *("--only", "logged[all]/parquet/process", "--only", "logged[1]/parquet/process"),
        ]
    )
    assert [a.name for a in args.arms] == [
        "logged[1]/parquet/process",
        "logged[all]/parquet/process",
    ]
    assert {(a.layers, a.sink, a.writer) for a in args.arms} == {
        ("1", "parquet", "process"),
        ("all", "parquet", "process"),
    }


@pytest.mark.parametrize("script", [overhead, interleaved], ids=["overhead", "interleaved"])
def test_an_unknown_only_arm_is_refused_by_name(script, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--layers", "all", "--only", "logged[2]"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--only 'logged[2]': not an arm of these options (logged[all])" in err


@pytest.mark.parametrize("script", [overhead, interleaved], ids=["overhead", "interleaved"])
@pytest.mark.parametrize("option", ["--gsm8k", "--token-prompts"])
def test_a_missing_prompt_file_is_one_line_and_exit_2_before_any_engine(
    script, option: str, tmp_path: Path, capsys
) -> None:
    missing = tmp_path / "no-such.jsonl"
    code = script.main([option, str(missing), "--workdir", str(tmp_path / "work")])
    assert code == 2
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())  # rich wraps long lines
    assert f"{option} {missing}" in text
    assert "Traceback" not in text
    assert not (tmp_path / "work").exists()  # stopped before any engine was started


@pytest.mark.parametrize("script", [overhead, interleaved], ids=["overhead", "interleaved"])
def test_hook_from_runs_each_logged_arm_again_with_another_trees_hook(
    script, tmp_path: Path, capsys
) -> None:
    before = tmp_path / "before"
    (before / "moeprof" / "hook").mkdir(parents=True)
    (before / "moeprof" / "hook" / "plugin.py").write_text("")
    args = script.parse_args(["--layers", "all", "--writer", "process", "--hook-from", str(before)])
    assert [a.name for a in args.arms] == ["logged[all]/process", "logged[all]/process@before"]
    now, then = args.arms
    assert now.env() == {"VLLM_LOG_MOE_WRITER": "process"}
    assert then.env()["VLLM_LOG_MOE_WRITER"] == "process"
    assert then.env()["PYTHONPATH"].split(os.pathsep)[0] == str(before)  # its moeprof first
    assert then.env()["PYTHONSAFEPATH"] == "1"  # not the working directory's
    assert now.slug != then.slug  # their logs do not collide
    with pytest.raises(SystemExit):
        script.parse_args(["--layers", "all", "--hook-from", str(tmp_path)])
    assert "no moeprof/hook/plugin.py in it" in capsys.readouterr().err


# --- bench/overhead_interleaved.py: a failed block lets its other engines go ------------------


def test_an_engine_refused_at_its_gate_exits_instead_of_waiting(
    tmp_path: Path, monkeypatch
) -> None:
    from moeprof import engine_run

    gate = tmp_path / "gate"
    os.mkfifo(gate)
    assert not interleaved.refuse_at_gate(gate)  # nobody waits there yet
    monkeypatch.setenv(engine_run.PASS_GATE, str(gate))
    exits: list[BaseException] = []

    def engine_at_gate() -> None:
        try:
            engine_run._wait_for_turn(_NoEvents(), 3)
        except SystemExit as e:
            exits.append(e)

    waiter = threading.Thread(target=engine_at_gate)
    waiter.start()
    deadline = time.monotonic() + 10
    while not interleaved.refuse_at_gate(gate):
        assert time.monotonic() < deadline, "the engine never reached its gate"
        time.sleep(0.05)
    waiter.join(5)
    assert not waiter.is_alive()
    assert len(exits) == 1 and "closed without a go" in str(exits[0])


class _NoEvents:
    def emit(self, event: str, **fields: object) -> None:
        pass


def test_sigterm_unwinds_the_interleaved_bench_so_its_engines_are_let_go() -> None:
    """A real SIGTERM: it raises in the bench's main thread (SystemExit, a BaseException), which
    ``run_block`` answers by letting every engine go, as for Ctrl-C."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        interleaved.stop_on_sigterm()
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs before this ends
        assert stopped.value.code == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, before)
