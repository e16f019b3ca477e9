"""Prefix caching on, in real vLLM (the CPU build) on the tiny model: cached prompt tokens skip
the router, ``outputs.jsonl`` records how many per request, and ``validate --outputs`` is exact.

One engine for the module (``generate`` with ``--prefix-caching --no-baseline --repeat 2``, as
a user runs it, compiled): the second pass repeats every prompt, so every prompt of at least one
KV block (128 tokens on the CPU build; cache hits are whole blocks) hits the cache there.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")

from logfactory import run_cli

from moeprof import generate
from moeprof.analysis.validate import load_outputs, validate_log

pytestmark = pytest.mark.vllm

CPU_BLOCK = 128
"""The CPU build's default KV block size: prefix-cache hits come in multiples of it."""
QUESTIONS = [
    "A farmer has 12 cows and buys 7 more. Each cow gives 3 liters of milk a day. How many "
    "liters of milk does the farmer get in a week?",
    "Tom reads 20 pages every day. His book has 340 pages. How many days does he need to "
    "finish it, and how many pages does he read on the last day?",
    "A shop sells pencils at $2 each and notebooks at $5 each. Sara buys 4 pencils and 3 "
    "notebooks. How much does she pay in dollars, and how much change does she get from $50?",
    "A train travels 60 miles per hour for 3 hours and then 45 miles per hour for 2 hours. "
    "What is the total distance, and what is its average speed over the whole trip?",
]
LONG = " ".join(QUESTIONS * 3)
PROMPTS = [
    LONG,  # several blocks
    " ".join(QUESTIONS[:2] * 3) + " Now answer this: " + QUESTIONS[3],  # shares LONG's start
    "Hi",  # shorter than a block: never cached
    LONG,  # the same prompt again in the same pass
]
LAYERS = "0,2"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("prefix_caching")
    prompts = out / "prompts.txt"
    prompts.write_text("\n\n---\n\n".join(PROMPTS) + "\n")
    job = generate.prepare(
        prompts,
        out_dir=out,
        log=None,
        layer=LAYERS,
        model="tiny",
        baseline=False,
        repeat=2,
        max_tokens=NEW_TOKENS,
        ignore_eos=True,
        max_model_len=1024,
        dtype="float32",
        chat=False,
        prefix_caching=True,
    )
    report = generate.run_job(job, on_event=lambda *_: None)
    lines = job.paths["log"].read_text().splitlines()
    return {
        "job": job,
        "report": report,
        "meta": json.loads(lines[0]),
        "routes": [json.loads(line) for line in lines[1:] if '"type":"end"' not in line],
        "outputs": load_outputs(job.paths["outputs"]),
    }


def test_the_run_had_prefix_caching_on_and_hit_the_cache(run: dict[str, Any]) -> None:
    assert run["meta"]["prefix_caching"] is True and run["report"]["prefix_caching"] is True
    outputs = list(run["outputs"].values())
    assert len(outputs) == 2 * len(PROMPTS)
    assert all(o.num_cached_tokens is not None for o in outputs)
    assert all(o.prompt_token_ids is not None for o in outputs)
    assert min(len(o.prompt_token_ids or []) for o in outputs if o.prompt_idx == 0) > 3 * CPU_BLOCK
    second = [o for o in outputs if getattr(o, "repeat", None) == 1]
    cached = {o.prompt_idx: o.num_cached_tokens or 0 for o in second}
    assert sorted(cached) == list(range(len(PROMPTS)))
    assert cached[0] >= 3 * CPU_BLOCK and cached[3] >= 3 * CPU_BLOCK  # LONG again
    assert cached[1] >= CPU_BLOCK  # its shared start
    assert cached[2] == 0  # "Hi" is shorter than a block
    for o in outputs:
        assert (o.num_cached_tokens or 0) % CPU_BLOCK == 0
        assert (o.num_cached_tokens or 0) < o.prompt_tokens


def test_routes_start_at_the_cached_count_and_are_exact_per_layer(run: dict[str, Any]) -> None:
    positions: dict[tuple[str, int], list[int]] = defaultdict(list)
    for r in run["routes"]:
        positions[r["req_id"], r["layer"]].append(r["token_idx"])
    layers = run["meta"]["layers_logged"]
    assert layers == [0, 2]
    for o in run["outputs"].values():
        end = o.prompt_tokens + o.generated_tokens - 1
        for layer in layers:
            assert sorted(positions[o.req_id, layer]) == list(range(o.first_routed, end)), (
                o.req_id,
                layer,
                o.num_cached_tokens,
            )
    assert len(run["routes"]) == sum(o.expected_routes for o in run["outputs"].values()) * 2


def test_validate_with_outputs_is_exact(run: dict[str, Any]) -> None:
    paths = run["job"].paths
    report = validate_log(paths["log"], outputs=paths["outputs"])
    assert report.valid, [e.message for e in report.errors]
    assert report.error_count == 0 and report.warning_count == 0
    check = report.outputs
    assert check is not None
    assert (check.matched, check.mismatched, check.missing_from_log, check.extra_in_log) == (
        2 * len(PROMPTS),
        0,
        0,
        0,
    )
    assert check.expected_routes == report.routes
    assert check.cached_tokens == sum(o.first_routed for o in run["outputs"].values()) > 0
    assert check.cached_inferred == 0
    code, out = run_cli("validate", str(paths["log"]), "--outputs", str(paths["outputs"]))
    assert code == 0 and "valid" in out and "prefix-cached prompt tokens" in out


def test_a_wrong_cached_count_is_named(run: dict[str, Any], tmp_path: Path) -> None:
    """The same log against outputs claiming one block less was cached: that request's
    layers are reported with the expected count and positions."""
    paths = run["job"].paths
    records = [json.loads(line) for line in paths["outputs"].read_text().splitlines()]
    victim = next(r for r in records if r["num_cached_tokens"] >= 2 * CPU_BLOCK)
    cached = victim["num_cached_tokens"]
    claimed = victim["num_cached_tokens"] = cached - CPU_BLOCK
    wrong = tmp_path / "outputs.jsonl"
    wrong.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = validate_log(paths["log"], outputs=wrong)
    assert not report.valid and report.outputs is not None and report.outputs.mismatched == 2
    prompt, generated = victim["prompt_tokens"], victim["generated_tokens"]
    last = prompt + generated - 2
    assert [e.message for e in report.errors] == [
        f"req_id {victim['req_id']!r} layer {layer}: {last + 1 - cached} routes at positions "
        f"{cached}..{last}, expected {last + 1 - claimed} at positions {claimed}..{last} "
        f"(prompt {prompt} - cached {claimed} + generated {generated} - 1)"
        for layer in (0, 2)
    ]
