"""Everything the hook knows about vLLM's internals, in one place.

Read from vLLM 0.26 (CUDA, Model Runner V2 by default) to 0.32 (CPU build, V1 runner):

- ``vllm.v1.worker.gpu_worker.Worker`` (the CPU worker subclasses it) owns ``load_model``,
  ``execute_model`` and ``shutdown``. The worker's ``execute_model`` runs only for real
  scheduler steps: warm-up, memory profiling and CUDA-graph capture call the model runner's
  ``_dummy_run``/``execute_model(dummy_run=True)`` directly, never the worker's.
- MoE layers hold an ``MoERunner`` whose ``layer_id`` is the decoder layer index and whose
  ``router`` (a ``BaseRouter``) computes ``(topk_weights, topk_ids)`` in ``_compute_routing``.
  Monolithic kernels (``is_monolithic``) route inside the kernel and never call it.
- After a real step, V1 runners keep the batch in ``input_batch`` (``req_ids``,
  ``num_computed_tokens_cpu``) and ``query_start_loc.np``; V2 runners keep it in
  ``execute_model_state.input_batch`` (``req_ids``, ``query_start_loc_np``,
  ``num_computed_tokens_np``, ``num_tokens``) until ``sample_tokens``.
- The engine renames request ``"0"`` to ``"0-1a2b3c4d"`` (8 random hex characters) unless
  ``VLLM_DISABLE_REQUEST_ID_RANDOMIZATION`` is set; users hold the name without the suffix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from moeprof.hook.rows import StepBatch

WORKER_MODULE = "vllm.v1.worker.gpu_worker"
WORKER_CLASS = "Worker"
SUPPORTED = "vLLM 0.26 to 0.33 (V1 engine)"


class UnsupportedVllm(RuntimeError):
    """vLLM's internals are not the ones this module describes."""


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def unsupported(what: str) -> UnsupportedVllm:
    return UnsupportedVllm(
        f"moeprof: vLLM {vllm_version()} is not supported: {what} (moeprof knows {SUPPORTED})"
    )


def moe_runner_class() -> type:
    try:
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
    except ImportError as e:
        raise unsupported(f"no MoERunner ({e})") from None
    return MoERunner


def moe_layers(model: Any) -> dict[int, Any]:
    """Decoder layer index -> that layer's MoE runner."""
    runner_cls = moe_runner_class()
    return {m.layer_id: m for m in model.modules() if isinstance(m, runner_cls)}


def router_of(runner: Any, layer: int) -> Any:
    if runner.is_monolithic:
        raise RuntimeError(
            f"moeprof: layer {layer} runs a monolithic MoE kernel that routes inside the "
            "kernel, so there is no topk_ids/topk_weights to log; pick a backend with a "
            "modular kernel (e.g. unquantized weights)"
        )
    router = getattr(runner, "router", None)
    if router is None or not callable(getattr(router, "_compute_routing", None)):
        raise unsupported(f"the MoE runner of layer {layer} has no router._compute_routing")
    return router


def step_batch_reader(model_runner: Any) -> Callable[[int], StepBatch]:
    """A function that copies the batch of the step that just ran (the runner reuses its
    arrays). Which runner it is gets decided once, not every step."""
    state = getattr(model_runner, "execute_model_state", None)
    if hasattr(getattr(state, "input_batch", None), "query_start_loc_np"):

        def read_v2(num_tokens: int) -> StepBatch:
            batch = model_runner.execute_model_state.input_batch
            num_reqs = len(batch.req_ids)
            return StepBatch(
                list(batch.req_ids),
                batch.query_start_loc_np[: num_reqs + 1].tolist(),
                batch.num_computed_tokens_np[:num_reqs].tolist(),
                int(batch.num_tokens),
            )

        return read_v2
    v1_batch = getattr(model_runner, "input_batch", None)
    qsl = getattr(getattr(model_runner, "query_start_loc", None), "np", None)
    if v1_batch is None or qsl is None or not hasattr(v1_batch, "num_computed_tokens_cpu"):
        raise unsupported("the model runner exposes neither a V1 nor a V2 input batch")

    def read_v1(num_tokens: int) -> StepBatch:
        batch = model_runner.input_batch
        req_ids = list(batch.req_ids)
        num_reqs = len(req_ids)
        return StepBatch(
            req_ids,
            model_runner.query_start_loc.np[: num_reqs + 1].tolist(),
            batch.num_computed_tokens_cpu[:num_reqs].tolist(),
            num_tokens,
        )

    return read_v1


def new_prompt_lens(scheduler_output: Any) -> dict[str, int]:
    lens: dict[str, int] = {}
    for req in scheduler_output.scheduled_new_reqs:
        ids = getattr(req, "prompt_token_ids", None)
        if ids is None:
            embeds = getattr(req, "prompt_embeds", None)
            lens[req.req_id] = len(embeds) if embeds is not None else -1
        else:
            lens[req.req_id] = len(ids)
    return lens


_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def external_request_id(internal: str) -> str:
    """The request id the user holds (``RequestOutput.request_id``, the API's id)."""
    if os.environ.get("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "") not in ("", "0"):
        return internal
    return _SUFFIX.sub("", internal, count=1)


def device_name(device: Any) -> str:
    import torch

    if getattr(device, "type", "cpu") == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({cpu})"
