"""The hook inside real vLLM (the CPU build) on the embedded tiny model.

Engine starts are the cost here (30-60 s each on two cores), so one module-scoped pair of runs,
compiled as users run it and logging every layer, carries most of the tests; eager mode with a
list of layers, one layer under preemption, the flag-off probe and the failure cases start one
engine each.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")

from tiny_engine import MAX_TOKENS, PROMPTS, run_tiny

from moeprof import generate
from moeprof.tiny import CONFIG, tiny_model_path

pytestmark = pytest.mark.vllm

LAYERS = list(range(CONFIG["num_hidden_layers"]))
"""The tiny model's MoE layers: all of them."""
TOP_K = CONFIG["num_experts_per_tok"]


def _read_log(path: Path) -> tuple[dict, list[dict], dict | None]:
    """(meta, routes, closing record or None)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    end = records.pop() if records[-1].get("type") == "end" else None
    return records[0], records[1:], end


def _compiled_artifacts(cache_root: Path) -> dict[str, str]:
    """vLLM's saved compiled models under ``cache_root`` (path -> sha256 of the file)."""
    return {
        str(p.relative_to(cache_root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(cache_root.glob("torch_compile_cache/**/model"))
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("hook")
    log = tmp / "routes.jsonl"
    # The pair shares a compile cache of its own, as two runs of one user share ~/.cache/vllm.
    cache = tmp / "vllm-cache"
    env = {"VLLM_CACHE_ROOT": str(cache)}
    baseline = run_tiny("baseline", tmp, None, extra_env=env)
    cached_by_baseline = _compiled_artifacts(cache)
    logged = run_tiny("logged", tmp, log, extra_env=env)
    meta, routes, end = _read_log(log)
    return {
        "end": end,
        "baseline": baseline,
        "logged": logged,
        "log": log,
        "meta": meta,
        "routes": routes,
        "tmp": tmp,
        "cache": cache,
        "cached_by_baseline": cached_by_baseline,
    }


def _by_request(routes: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for r in routes:
        grouped[r["req_id"]].append(r)
    return grouped


def test_logged_run_has_one_route_per_real_token_and_layer(runs: dict) -> None:
    grouped = _by_request(runs["routes"])
    outputs = runs["logged"]["outputs"]
    assert len(grouped) == len(PROMPTS)
    for out in outputs:
        expected = list(range(out["prompt_tokens"] + out["generated_tokens"] - 1))
        for layer in LAYERS:
            positions = [r["token_idx"] for r in grouped[out["req_id"]] if r["layer"] == layer]
            assert sorted(positions) == expected, (out["req_id"], layer)


def test_a_clean_shutdown_closes_the_log_with_what_it_holds(runs: dict) -> None:
    end = runs["end"]
    assert end is not None, "no closing record after a clean shutdown"
    assert end["routes"] == len(runs["routes"]) and end["dropped"] == 0
    assert end["stopped"] is None
    assert end["requests"] == len(PROMPTS)
    assert end["steps"] == len({r["step"] for r in runs["routes"]})


def test_a_tokens_layers_are_written_together_in_layer_order(runs: dict) -> None:
    keys = [(r["req_id"], r["token_idx"], r["step"]) for r in runs["routes"]]
    n = len(LAYERS)
    for i in range(0, len(keys), n):
        assert len(set(keys[i : i + n])) == 1
        assert [r["layer"] for r in runs["routes"][i : i + n]] == LAYERS


def test_all_rows_of_one_forward_pass_share_a_step_and_steps_increase(runs: dict) -> None:
    routes = runs["routes"]
    steps = [r["step"] for r in routes]
    assert steps == sorted(steps)  # the log is in step order
    assert sorted(set(steps)) == list(range(len(set(steps))))  # every logged pass numbered
    decode_per_step: dict[int, list[str]] = defaultdict(list)
    for r in routes:
        if r["phase"] == "decode" and r["layer"] == LAYERS[0]:
            decode_per_step[r["step"]].append(r["req_id"])
    for step, reqs in decode_per_step.items():  # one decode token per request per pass
        assert len(reqs) == len(set(reqs)), step
    for req, rs in _by_request(routes).items():
        first = [r for r in rs if r["layer"] == LAYERS[0]]
        prefill_steps = {r["step"] for r in first if r["phase"] == "prefill"}
        decode_steps = [r["step"] for r in first if r["phase"] == "decode"]
        assert max(prefill_steps) < min(decode_steps), req
        assert decode_steps == list(range(decode_steps[0], decode_steps[0] + len(decode_steps)))


def test_the_engine_reports_what_logging_cost(runs: dict) -> None:
    text = (runs["tmp"] / "logged.txt").read_text()
    stats = [
        json.loads(line.split("moeprof: stats ", 1)[1])
        for line in text.splitlines()
        if "moeprof: stats " in line
    ]
    assert len(stats) == 1, text[-2000:]
    (s,) = stats
    assert s["routes"] == len(runs["routes"]) and s["layers"] == len(LAYERS)
    assert s["writer_cpu_sec"] > 0 and s["ring_bytes"] > 0 and s["device_bytes"] > 0


def test_a_logged_run_neither_loads_nor_saves_vllms_compiled_model(runs: dict) -> None:
    """vLLM keys its saved compiled model by config and vLLM's own variables only, so a logged
    run and a plain one share the key: loading the plain run's graph would drop the capture
    (nothing logged), and saving a graph with it would hand the capture to plain runs."""
    cached = runs["cached_by_baseline"]
    assert cached, "the baseline saved no compiled model: this test would prove nothing"
    assert _compiled_artifacts(runs["cache"]) == cached  # the logged run saved nothing
    text = (runs["tmp"] / "logged.txt").read_text()
    for artifact in cached:  # and did not try to load the baseline's
        assert artifact.rsplit("/", 2)[0] not in text, text[-3000:]


def test_req_ids_are_the_ids_of_the_request_outputs(runs: dict) -> None:
    assert {r["req_id"] for r in runs["routes"]} == {o["req_id"] for o in runs["logged"]["outputs"]}


def test_prompt_tokens_are_prefill_and_fed_back_tokens_are_decode(runs: dict) -> None:
    grouped = _by_request(runs["routes"])
    for out in runs["logged"]["outputs"]:
        for r in grouped[out["req_id"]]:
            expected = "prefill" if r["token_idx"] < out["prompt_tokens"] else "decode"
            assert r["phase"] == expected, r


def test_meta_header_describes_the_run(runs: dict) -> None:
    meta = runs["meta"]
    assert meta["type"] == "meta"
    assert meta["layers_logged"] == LAYERS
    assert meta["top_k"] == TOP_K
    assert meta["num_experts"] == CONFIG["num_experts"]
    assert meta["prefix_caching"] is False
    assert meta["seed"] == 1234
    assert meta["vllm_version"] == runs["logged"]["vllm_version"]


def test_logging_does_not_change_generated_tokens(runs: dict) -> None:
    assert generate.token_ids(runs["baseline"]) == generate.token_ids(runs["logged"])
    assert all(len(ids) == MAX_TOKENS for ids in generate.token_ids(runs["logged"]))


def test_every_route_has_top_k_distinct_experts_and_finite_weights(runs: dict) -> None:
    for r in runs["routes"]:
        assert r["layer"] in LAYERS
        assert len(set(r["topk_ids"])) == TOP_K
        assert all(0 <= e < CONFIG["num_experts"] for e in r["topk_ids"])
        assert np.isfinite(r["topk_weights"]).all()


@pytest.fixture(scope="module")
def hf_router_probs() -> list[list[np.ndarray]]:
    """Per prompt, per layer: router probabilities of every prompt token, from transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = tiny_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    result = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model(ids, output_router_logits=True)
        result.append([torch.softmax(lg.float(), dim=-1).numpy() for lg in out.router_logits])
    return result


def _assert_routes_match_reference(
    routes: list[dict], outputs: list[dict], layers: list[int], reference: list[list[np.ndarray]]
) -> None:
    grouped = _by_request(routes)
    checked = 0
    for out in outputs:
        for r in grouped[out["req_id"]]:
            if r["phase"] != "prefill":
                continue
            probs = reference[out["prompt_idx"]][r["layer"]]
            assert probs.shape[0] == out["prompt_tokens"]
            p = probs[r["token_idx"]]
            kth = np.sort(p)[-TOP_K]
            ours = set(r["topk_ids"])
            theirs = set(np.argsort(p)[-TOP_K:].tolist())
            for expert in ours ^ theirs:  # only near-ties may flip
                assert abs(p[expert] - kth) < 1e-3, (r, p[expert], kth)
            for expert, weight in zip(r["topk_ids"], r["topk_weights"], strict=False):
                assert weight == pytest.approx(p[expert], abs=1e-4)
            checked += 1
    assert checked == sum(o["prompt_tokens"] for o in outputs) * len(layers)


def test_logged_routes_equal_transformers_router_top_k(runs: dict, hf_router_probs: list) -> None:
    _assert_routes_match_reference(
        runs["routes"], runs["logged"]["outputs"], LAYERS, hf_router_probs
    )


def test_eager_mode_logs_a_list_of_layers_with_their_own_routes(
    runs: dict, hf_router_probs: list
) -> None:
    log = runs["tmp"] / "eager-layers.jsonl"
    result = run_tiny("eager", runs["tmp"], log, layer="0,2", enforce_eager=True)
    meta, routes, _ = _read_log(log)
    assert meta["layers_logged"] == [0, 2]
    assert {r["layer"] for r in routes} == {0, 2}
    assert len(routes) == len(runs["routes"]) // len(LAYERS) * 2
    _assert_routes_match_reference(routes, result["outputs"], [0, 2], hf_router_probs)
    layer0 = [r["topk_ids"] for r in routes if r["layer"] == 0]
    layer2 = [r["topk_ids"] for r in routes if r["layer"] == 2]
    assert sum(a != b for a, b in zip(layer0, layer2, strict=True)) > len(layer0) // 2


def test_log_passes_validate_with_outputs(runs: dict) -> None:
    outputs = runs["tmp"] / "outputs.jsonl"
    generate.write_outputs(outputs, runs["logged"])
    proc = subprocess.run(
        [sys.executable, "-m", "moeprof", "validate", str(runs["log"]), "--outputs", str(outputs)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _probe(tmp: Path, env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_LOG_MOE", "_MOEPROF"))}
    env |= {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "VLLM_CPU_KVCACHE_SPACE": "1"} | env_extra
    result = tmp / "probe.json"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("vllm_probe.py")), str(result)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(result.read_text())


def test_with_the_flag_unset_only_the_plugin_entry_point_is_imported(tmp_path: Path) -> None:
    probe = _probe(tmp_path, {})
    (modules,) = probe["worker_modules"]
    assert modules == ["moeprof", "moeprof.hook", "moeprof.hook.plugin"]


def _expect_start_failure(tmp: Path, env_extra: dict[str, str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_LOG_MOE", "_MOEPROF"))}
    env |= {"VLLM_CPU_KVCACHE_SPACE": "1"} | env_extra
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("vllm_probe.py")), str(tmp / "r.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (tmp / "r.json").exists()


def test_a_layer_that_is_not_an_moe_layer_stops_the_engine_start(tmp_path: Path) -> None:
    _expect_start_failure(
        tmp_path,
        {"VLLM_LOG_MOE": str(tmp_path / "log.jsonl"), "VLLM_MOE_LAYER": "7"},
        "VLLM_MOE_LAYER=7 is not an MoE layer of",
    )


def test_an_unwritable_log_path_stops_the_engine_start(tmp_path: Path) -> None:
    _expect_start_failure(
        tmp_path,
        {"VLLM_LOG_MOE": str(tmp_path / "missing-dir" / "log.jsonl")},
        "does not exist",
    )


def test_an_existing_log_is_not_overwritten(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("precious\n")
    _expect_start_failure(tmp_path, {"VLLM_LOG_MOE": str(log)}, "already exists")
    assert log.read_text() == "precious\n"


def test_preempted_requests_are_logged_once_per_token(tmp_path: Path) -> None:
    """Three KV blocks (128 tokens each on CPU) cannot hold four requests growing past 200 tokens,
    so vLLM preempts some and recomputes their tokens later; each is still logged once. One
    layer, as the hook logged before layer selections existed."""
    log = tmp_path / "preempt.jsonl"
    result = run_tiny(
        "preempt",
        tmp_path,
        log,
        layer=1,
        max_tokens=200,
        ignore_eos=True,
        engine_args={"num_gpu_blocks_override": 3},
    )
    assert "recomputed after preemption are logged once" in (tmp_path / "preempt.txt").read_text()
    meta, routes, _ = _read_log(log)
    assert meta["layers_logged"] == [1] and {r["layer"] for r in routes} == {1}
    grouped = _by_request(routes)
    for out in result["outputs"]:
        positions = [r["token_idx"] for r in grouped[out["req_id"]]]
        assert sorted(positions) == list(range(out["prompt_tokens"] + out["generated_tokens"] - 1))
