"""Plain fakes of the vLLM objects the hook meets, for unit tests without an engine: a router, an
MoE runner, the engine config, a V1 model runner, a scheduler output and a worker class.

They hold only the attributes :mod:`moeprof.hook.compat` reads; the tests against real vLLM
(``*_vllm.py``) pin that vLLM still has them."""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import torch


class FakeRouter:
    """Stands in for vLLM's ``BaseRouter``: ``_compute_routing`` returns ``(topk_weights,
    topk_ids)``, one row per row of ``hidden``: row ``t`` picks experts ``2t + shift`` and
    ``2t + 1 + shift`` (mod 8) with weights ``0.25 + id / 100``, so ``shift`` lets layers route
    differently. ``output``, when set, is returned instead, as ``(ids, weights)``."""

    top_k = 2
    global_num_experts = 8

    def __init__(self, shift: int = 0) -> None:
        self.shift = shift
        self.output: tuple[torch.Tensor, torch.Tensor] | None = None

    def _compute_routing(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.output is not None:
            ids, weights = self.output
            return weights, ids
        n = hidden.shape[0]
        ids = ((torch.arange(2 * n).reshape(n, 2) + self.shift) % 8).to(torch.int64)
        weights = torch.full((n, 2), 0.25, dtype=torch.float32) + ids / 100
        return weights, ids


class FakeMoERunner:
    """Stands in for vLLM's ``MoERunner``."""

    def __init__(self, layer_id: int, *, monolithic: bool = False, router: Any = None) -> None:
        self.layer_id = layer_id
        self.is_monolithic = monolithic
        self.router = FakeRouter() if router is None else router


def vllm_config(**parallel: Any) -> types.SimpleNamespace:
    """A ``VllmConfig`` of model ``fake/moe`` (8 experts); ``parallel`` overrides the
    ``parallel_config`` fields (pipeline, tensor and data parallel sizes, data-parallel rank)."""
    ns = types.SimpleNamespace
    return ns(
        model_config=ns(
            model="fake/moe",
            seed=1234,
            dtype=torch.bfloat16,
            enforce_eager=False,
            get_num_experts=lambda: 8,
        ),
        cache_config=ns(enable_prefix_caching=False),
        compilation_config=ns(cudagraph_mode="NONE", max_cudagraph_capture_size=None),
        scheduler_config=ns(max_num_batched_tokens=64),
        parallel_config=ns(
            **{
                "pipeline_parallel_size": 1,
                "tensor_parallel_size": 1,
                "data_parallel_rank": 0,
                "data_parallel_size": 1,
            }
            | parallel
        ),
        speculative_config=None,
    )


def v1_runner(runners: list[FakeMoERunner]) -> types.SimpleNamespace:
    """A V1 model runner after a step, its model holding ``runners``; tests fill its batch."""
    ns = types.SimpleNamespace
    model = ns(modules=lambda: [ns(), *runners])  # other modules are skipped
    return ns(
        device="cpu",
        get_model=lambda: model,
        input_batch=ns(req_ids=[], num_computed_tokens_cpu=np.zeros(8, dtype=np.int32)),
        query_start_loc=ns(np=np.zeros(9, dtype=np.int32)),
    )


def loaded_worker(runners: list[FakeMoERunner], **parallel: Any) -> types.SimpleNamespace:
    """A loaded worker: :func:`vllm_config` (``parallel``) and a :func:`v1_runner`."""
    return types.SimpleNamespace(
        vllm_config=vllm_config(**parallel), model_runner=v1_runner(runners)
    )


def scheduled(
    num_tokens: int, new: tuple[Any, ...] | list[Any] = (), finished: frozenset[str] = frozenset()
) -> types.SimpleNamespace:
    """A ``SchedulerOutput``: ``num_tokens`` tokens, the requests ``new`` to the batch (with their
    ``req_id`` and ``prompt_token_ids``), the ids of those ``finished``."""
    return types.SimpleNamespace(
        total_num_scheduled_tokens=num_tokens,
        scheduled_new_reqs=list(new),
        finished_req_ids=finished,
    )


def worker_class(runners: list[FakeMoERunner], warm_up_tokens: int = 0) -> type:
    """A class standing in for ``vllm.v1.worker.gpu_worker.Worker``, for the hook to patch: its
    ``execute_model`` runs every one of ``runners``' routers on the step's scheduled tokens and
    returns ``"output"``; with ``warm_up_tokens``, ``compile_or_warm_up_model`` runs one step of
    that many tokens of a made-up request first; ``shutdown`` sets ``shut_down``."""

    class FakeWorker:
        def __init__(self) -> None:
            self.vllm_config = vllm_config()
            self.model_runner = v1_runner(runners)
            self.shut_down = False

        def load_model(self) -> None:
            pass

        def compile_or_warm_up_model(self) -> None:
            if warm_up_tokens:
                self.execute_model(scheduled(warm_up_tokens))

        def execute_model(self, scheduler_output: Any) -> str:
            n = scheduler_output.total_num_scheduled_tokens
            for runner in runners:
                runner.router._compute_routing(torch.zeros(n, 4))
            return "output"

        def shutdown(self) -> None:
            self.shut_down = True

    return FakeWorker
