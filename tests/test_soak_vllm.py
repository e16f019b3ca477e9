"""A short soak (bench/soak.py): a logged OpenAI server under mixed concurrent load with a KV cache
small enough to preempt, then SIGTERM; the log is exact for every request the clients saw end.

The bench's own numbers (RSS over time, duration) are not asserted here: they are bench output.
The fast tests after it pin the soak's log checker on hand-made logs, so that a real run's
verdict means what the bench says it means.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "soak.py"
_spec = importlib.util.spec_from_file_location("bench_soak", _PATH)
assert _spec is not None and _spec.loader is not None
soak = importlib.util.module_from_spec(_spec)
sys.modules["bench_soak"] = soak
_spec.loader.exec_module(soak)


@pytest.mark.vllm
def test_a_short_soak_logs_every_request_exactly_and_closes_the_log(tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")
    result = soak.run_soak(
        tmp_path,
        duration=30.0,
        clients=6,
        max_requests=400,
        kv_blocks=soak.DEFAULT_KV_BLOCKS,
        rss_every=2.0,
        rss_flat_mib=16.0,
    )
    check = result.check
    statuses = result.requests
    assert statuses.get("error", 0) == 0, statuses
    assert set(result.by_kind) == set(soak.KINDS)
    assert check["finished"] >= 10 and check["aborted"] >= 2, statuses
    assert check["finished_exact"] == check["finished"], check["problems"]
    assert check["aborted_ok"] == check["aborted"], check["problems"]
    assert check["duplicates"] == 0 and check["missing"] == 0 and check["unknown_in_log"] == 0
    assert result.preemptions_logged, "the small KV cache did not force a preemption"
    assert check["end"] is not None, "no closing record after SIGTERM"
    assert check["end"]["routes"] == check["routes"]
    # an upper bound on the requests the stop cut (see schema.EndRecord)
    assert check["end"]["requests_unfinished"] >= check["cut_in_log"]
    assert check["problems"] == []


# ------------------------------------------------------------------ the checker, on made-up logs

META = {
    "type": "meta",
    "model_id": "tiny",
    "vllm_version": "0.32.0",
    "torch_version": "2.13.0",
    "device": "cpu",
    "seed": 0,
    "layers_logged": [0, 1],
    "top_k": 2,
    "num_experts": 4,
    "prefix_caching": False,
}


def _log(path: Path, routes: dict[str, list[int]], end: dict | None) -> Path:
    lines = [json.dumps(META)]
    for req, positions in routes.items():
        for t in positions:
            for layer in (0, 1):
                route = {
                    "type": "route",
                    "req_id": req,
                    "token_idx": t,
                    "layer": layer,
                    "topk_ids": [0, 1],
                    "topk_weights": [0.5, 0.25],
                }
                lines.append(json.dumps(route))
    if end is not None:
        lines.append(json.dumps({"type": "end", **end}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _ok(cid: str, prompt: int, completion: int) -> object:
    o = soak.Outcome("normal", completion, status="ok", completion_id=cid)
    o.prompt_tokens, o.completion_tokens = prompt, completion
    return o


def test_an_exact_log_with_an_aborted_and_a_cut_request_passes(tmp_path: Path) -> None:
    outcomes = [
        _ok("a", 3, 4),  # 6 routes a layer
        soak.Outcome("abort", 20, status="aborted", completion_id="b", chunks=2),
        soak.Outcome("long", 500, status="cut"),  # cut before its id reached the client
    ]
    routes = {"a-0": list(range(6)), "b-0": list(range(5)), "x-0": list(range(9))}
    end = {"routes": 40, "requests": 3, "requests_unfinished": 1}
    check = soak.check_log(_log(tmp_path / "log.jsonl", routes, end), outcomes)
    assert check.problems == []
    assert (check.finished_exact, check.aborted_ok, check.cut_in_log) == (1, 1, 1)


def test_a_closing_record_that_calls_a_cut_request_finished_is_wrong(tmp_path: Path) -> None:
    outcomes = [_ok("a", 3, 4), soak.Outcome("long", 500, status="cut")]
    routes = {"a-0": list(range(6)), "x-0": list(range(9))}
    end = {"routes": 30, "requests": 2, "requests_unfinished": 0}
    check = soak.check_log(_log(tmp_path / "log.jsonl", routes, end), outcomes)
    assert any("requests_unfinished=0" in p for p in check.problems), check.problems
    # more than the cut ones is allowed: requests finishing in the last step count too
    end["requests_unfinished"] = 2
    check = soak.check_log(_log(tmp_path / "log2.jsonl", routes, end), outcomes)
    assert check.problems == []


@pytest.mark.parametrize(
    ("routes", "end", "problem"),
    [
        ({"a-0": list(range(5))}, {"routes": 10}, "expected positions 0..5"),
        ({"a-0": [*range(6), 3]}, {"routes": 14}, "duplicate"),
        ({"a-0": [0, 1, 2, 4, 5, 6]}, {"routes": 12}, "expected positions 0..5"),
        ({}, {"routes": 0}, "not in the log"),
        ({"a-0": list(range(6))}, None, "no closing record"),
        ({"a-0": list(range(6))}, {"routes": 11}, "closing record says 11 routes"),
        ({"a-0": list(range(6)), "z-0": [0, 1]}, {"routes": 16}, "no client made"),
    ],
)
def test_the_checker_names_what_is_wrong(
    tmp_path: Path, routes: dict, end: dict | None, problem: str
) -> None:
    check = soak.check_log(_log(tmp_path / "log.jsonl", routes, end), [_ok("a", 3, 4)])
    assert not check.ok
    assert any(problem in p for p in check.problems), check.problems


def test_rss_is_flat_when_the_second_half_does_not_grow() -> None:
    mib = 2**20
    flat = [(t, 500 * mib + (mib if t % 2 else 0)) for t in range(0, 600, 10)]
    growing = [(t, 500 * mib + t * mib // 10) for t in range(0, 600, 10)]
    assert abs(soak.rss_trend(flat)["growth_mib"]) <= 1
    trend = soak.rss_trend(growing)
    assert trend["growth_mib"] > 20 and trend["slope_mib_per_min"] == pytest.approx(6.0, rel=0.05)
