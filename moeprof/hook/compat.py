"""Everything the hook knows about vLLM's internals, in one place.

This is the only module of the hook that reads attributes of vLLM's objects (configs, worker,
model runner, MoE runners, routers, scheduler output); the others get plain values from here.

Read from vLLM 0.26 (CUDA, Model Runner V2 by default) to 0.32 (CPU build, V1 runner):

- ``vllm.v1.worker.gpu_worker.Worker`` (the CPU worker subclasses it) owns ``load_model``,
  ``execute_model`` and ``shutdown``. The worker's ``execute_model`` runs only for real
  scheduler steps: warm-up, memory profiling and CUDA-graph capture call the model runner's
  ``_dummy_run``/``execute_model(dummy_run=True)`` directly, never the worker's.
  ``compile_or_warm_up_model`` (overridden by the CPU worker) is the last thing a worker does
  before serving.
- MoE layers hold an ``MoERunner`` whose ``layer_id`` is the decoder layer index and whose
  ``router`` (a ``BaseRouter``) computes ``(topk_weights, topk_ids)`` in ``_compute_routing``.
  Monolithic kernels (``is_monolithic``) route inside the kernel and never call it.
- With data parallelism the router may see every DP rank's tokens at once (naive
  dispatch/combine gathers them before routing), only its own (modular kernels exchange tokens
  after routing) or, under sequence parallelism, every rank's shards; ``rank_rows`` finds this
  rank's span from the forward context's ``dp_metadata``, as vLLM's ``RoutedExpertsCapturer``
  does. The capture buffer is sized for all ranks' tokens.
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
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, NamedTuple

from moeprof.errors import HookRefusal
from moeprof.hook.rows import StepBatch

WORKER_MODULE = "vllm.v1.worker.gpu_worker"
WORKER_CLASS = "Worker"
SUPPORTED = "vLLM 0.26 to 0.33 (V1 engine)"

# The worker methods the hook wraps (see the module docstring for what each one means).
LOAD_MODEL = "load_model"
EXECUTE_MODEL = "execute_model"
WARM_UP = "compile_or_warm_up_model"
SHUTDOWN = "shutdown"


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def unsupported(what: str) -> HookRefusal:
    return HookRefusal(
        f"vLLM {vllm_version()} is not supported: {what} (moeprof knows {SUPPORTED})"
    )


def worker_class(module: Any) -> type:
    """The worker class of ``WORKER_MODULE``, checked for the methods the hook wraps."""
    cls = getattr(module, WORKER_CLASS, None)
    if cls is None or not all(hasattr(cls, m) for m in (LOAD_MODEL, EXECUTE_MODEL)):
        raise unsupported(f"{WORKER_MODULE}.{WORKER_CLASS} has changed")
    return cls


@dataclass(frozen=True)
class EngineFacts:
    """What the hook needs to know about the engine a worker belongs to, read once at load."""

    model_id: str
    seed: int | None
    dtype: str
    """Without the ``torch.`` prefix: ``"bfloat16"``."""
    enforce_eager: bool
    prefix_caching: bool
    cudagraph_mode: str
    speculative: bool
    pipeline_parallel_size: int
    tensor_parallel_size: int
    tensor_parallel_rank: int
    data_parallel_rank: int
    data_parallel_size: int
    max_router_tokens: int
    """Most tokens one forward pass may route on this worker (all DP ranks' under DP)."""
    num_experts: int | None
    """Routed experts per layer, when the model config says."""
    device: Any
    """The ``torch.device`` the model runs on."""


def engine_facts(worker: Any) -> EngineFacts:
    import torch

    vcfg = worker.vllm_config
    model_cfg, par, comp = vcfg.model_config, vcfg.parallel_config, vcfg.compilation_config
    graph_max = getattr(comp, "max_cudagraph_capture_size", None) or 0
    step_max = max(vcfg.scheduler_config.max_num_batched_tokens, graph_max)
    num_experts = getattr(model_cfg, "get_num_experts", lambda: 0)()
    return EngineFacts(
        model_id=model_cfg.model,
        seed=model_cfg.seed,
        dtype=str(model_cfg.dtype).removeprefix("torch."),
        enforce_eager=bool(model_cfg.enforce_eager),
        prefix_caching=bool(vcfg.cache_config.enable_prefix_caching),
        cudagraph_mode=str(getattr(comp, "cudagraph_mode", None)),
        speculative=getattr(vcfg, "speculative_config", None) is not None,
        pipeline_parallel_size=par.pipeline_parallel_size,
        tensor_parallel_size=par.tensor_parallel_size,
        tensor_parallel_rank=tensor_parallel_rank(),
        data_parallel_rank=par.data_parallel_rank,
        data_parallel_size=par.data_parallel_size,
        max_router_tokens=step_max * max(par.data_parallel_size, 1),
        num_experts=int(num_experts) if num_experts else None,
        device=torch.device(worker.model_runner.device),
    )


def tensor_parallel_rank() -> int:
    """This worker's rank in its tensor-parallel group (distributed state is up at load)."""
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


def moe_runner_class() -> type:
    try:
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
    except ImportError as e:
        raise unsupported(f"no MoERunner ({e})") from None
    return MoERunner


def moe_runners(worker: Any) -> dict[int, Any]:
    """Decoder layer index -> that layer's MoE runner, in the model this worker loaded."""
    runner_cls = moe_runner_class()
    model = worker.model_runner.get_model()
    return {m.layer_id: m for m in model.modules() if isinstance(m, runner_cls)}


@dataclass(frozen=True)
class Router:
    """The router of the logged layer and what it routes to."""

    router: Any
    top_k: int
    num_experts: int | None
    """All experts the router chooses from (``global_num_experts``), when it says."""
    routing: dict[str, Any] | None = None
    """What its ``topk_weights`` mean (:func:`moeprof.routing_facts.routing_meta`)."""


def router_of(runner: Any, layer: int) -> Router:
    if runner.is_monolithic:
        raise HookRefusal(
            f"layer {layer} runs a monolithic MoE kernel that routes inside the "
            "kernel, so there is no topk_ids/topk_weights to log; pick a backend with a "
            "modular kernel (e.g. unquantized weights)"
        )
    refuse_unsupported_token_layout(runner, layer)
    router = getattr(runner, "router", None)
    if router is None or not callable(getattr(router, "_compute_routing", None)):
        raise unsupported(f"the MoE runner of layer {layer} has no router._compute_routing")
    num_experts = getattr(router, "global_num_experts", None)
    return Router(
        router,
        int(router.top_k),
        int(num_experts) if num_experts else None,
        routing_of(runner, router),
    )


def routing_of(runner: Any, router: Any) -> dict[str, Any] | None:
    """The routing semantics of a loaded router (vLLM 0.32's router classes keep them as
    attributes; ``GroupedTopKRouter`` is grouped by class, ``CPURouter`` by a flag)."""
    from moeprof.routing_facts import routing_meta

    try:
        custom = getattr(router, "custom_routing_function", None)
        bias = getattr(router, "e_score_correction_bias", None)
        renormalize = getattr(router, "renormalize", None)
        grouped = bool(getattr(router, "use_grouped_topk", False)) or (
            type(router).__name__ == "GroupedTopKRouter"
        )
        return routing_meta(
            router_class=type(router).__name__,
            scoring=getattr(router, "scoring_func", None),
            renormalize=bool(renormalize) if renormalize is not None else None,
            grouped_topk=grouped,
            num_expert_group=getattr(router, "num_expert_group", None),
            topk_group=getattr(router, "topk_group", None),
            correction_bias=bias is not None,
            custom_routing_function=getattr(custom, "__qualname__", None) or repr(custom)
            if custom
            else None,
            scaling_in_router=float(getattr(router, "routed_scaling_factor", 1.0) or 1.0),
            scaling_on_output=float(getattr(runner, "routed_scaling_factor", 1.0) or 1.0),
        )
    except (TypeError, ValueError):  # an attribute of an unexpected type: say nothing
        return None


def tap_routing(router: Router, tap: Callable[[Any, Any], None]) -> None:
    """Call ``tap(topk_ids, topk_weights)`` right after the router computes them.

    The instance's ``_compute_routing`` is wrapped; the class stays untouched. The wrapper runs
    inside the forward pass (traced by Dynamo, recorded by CUDA graphs), so ``tap`` must be
    graph-safe: no host sync, no allocation, no branch on tensor values.
    """
    target = router.router
    compute: Callable[..., tuple[Any, Any]] = target._compute_routing

    def _compute_routing_and_capture(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        topk_weights, topk_ids = compute(*args, **kwargs)
        tap(topk_ids, topk_weights)
        return topk_weights, topk_ids

    target._compute_routing = _compute_routing_and_capture


# --- Which of the router's rows are this data-parallel rank's tokens ---------------------------


def refuse_unsupported_token_layout(runner: Any, layer: int) -> None:
    """Refuse, at load, the layouts in which no rank's router sees all of its own tokens.

    With prefill context parallelism the runner all-gathers the tokens of every PCP rank before
    routing; with sequence parallelism and a modular kernel (no naive dispatch) each TP rank
    routes a ``1/TP`` shard of its DP rank's tokens, and only a collective could reassemble
    them (vLLM's ``RoutedExpertsCapturer`` all-gathers across the TP group there).
    """
    cfg = getattr(runner, "moe_config", None)
    if cfg is None:
        return
    if int(getattr(cfg, "pcp_size", 1) or 1) > 1:
        raise HookRefusal(
            f"layer {layer}: prefill context parallelism gathers the tokens of every PCP rank "
            "before routing; logging it is not supported"
        )
    if bool(getattr(cfg, "is_sequence_parallel", False)) and not bool(
        getattr(runner, "do_naive_dispatch_combine", True)
    ):
        raise HookRefusal(
            f"layer {layer}: sequence-parallel MoE with a modular kernel routes a 1/TP shard "
            "of the tokens on each tensor-parallel rank; logging it is not supported (run "
            "without expert parallelism, or with tensor_parallel_size=1)"
        )


class RankRows(NamedTuple):
    """This DP rank's tokens in the rows one router call returned: ``rows[start:start+count]``,
    in the rank's own token order (``count`` may include padding rows past the real tokens)."""

    start: int
    count: int


def rank_rows(num_rows: int, dp_rank: int, dp_metadata: Any) -> RankRows | None:
    """Where this DP rank's tokens are among the ``num_rows`` rows a router returned, or None
    when the count matches no layout below.

    ``dp_metadata`` is vLLM's ``ForwardContext.dp_metadata`` of the forward pass (None without
    data or sequence parallelism): ``num_tokens_across_dp_cpu[r]`` is rank ``r``'s token count
    (padded alike on every rank under CUDA graphs), ``local_sizes`` the all-gather shard sizes
    while a sequence-parallel MoE layer runs. The layouts (as vLLM's own
    ``routed_experts_capturer.py`` reads them, checked in this order):

    - no ``dp_metadata``: every row is this rank's;
    - ``num_rows == sum(counts)``, naive dispatch: all DP ranks' tokens concatenated in rank
      order, so this rank's start after the counts of the ranks before it;
    - ``num_rows == counts[dp_rank]``, a modular kernel (the DP exchange happens inside the
      experts' kernel, after routing): only this rank's tokens;
    - ``num_rows == sum(local_sizes)``, naive dispatch under sequence parallelism: the SP shards
      of every DP rank gathered in DP-then-TP order, each rank's shards padded to
      ``ceil(count / sp)``, so this rank's tokens start after the shards of the ranks before
      it and its padding trails its last shard.
    """
    if dp_metadata is None:
        return RankRows(0, num_rows)
    across = dp_metadata.num_tokens_across_dp_cpu
    counts = [int(c) for c in (across.tolist() if hasattr(across, "tolist") else across)]
    local = counts[dp_rank]
    if num_rows == sum(counts):
        return RankRows(sum(counts[:dp_rank]), local)
    if num_rows == local:
        return RankRows(0, local)
    shards = getattr(dp_metadata, "local_sizes", None)
    if shards and num_rows == sum(shards) and len(shards) % len(counts) == 0:
        per_rank = len(shards) // len(counts)
        return RankRows(sum(shards[: dp_rank * per_rank]), local)
    return None


def rank_rows_reader(dp_rank: int) -> Callable[[int], RankRows | None]:
    """:func:`rank_rows` of the forward pass under way (read from vLLM's forward context), for
    a router that returned ``num_rows`` rows. Called inside the forward pass, outside what
    Dynamo traces (see ``capture.py``)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    def read(num_rows: int) -> RankRows | None:
        if not is_forward_context_available():
            return RankRows(0, num_rows)
        return rank_rows(num_rows, dp_rank, get_forward_context().dp_metadata)

    return read


class ScheduledStep(NamedTuple):
    """What a real step scheduled, copied off vLLM's objects (a tuple: built every step)."""

    finished: Collection[str]
    """Requests that finished before this step."""
    batch: StepBatch | None
    """The batch layout, or None when the step scheduled no tokens."""
    new_prompt_lens: dict[str, int]
    """Prompt length of each request this step starts (-1 when unknown)."""


class StepReader:
    """Reads a step from the scheduler output and the worker's model runner.

    Which model runner it is (V1 or V2) is decided at the first step that scheduled tokens,
    once, not every step.
    """

    def __init__(self, worker: Any) -> None:
        self._worker = worker
        self._read_batch: Callable[[int], StepBatch] | None = None

    def __call__(self, scheduler_output: Any) -> ScheduledStep:
        finished = scheduler_output.finished_req_ids
        num_tokens = scheduler_output.total_num_scheduled_tokens
        if num_tokens == 0:
            return ScheduledStep(finished, None, {})
        if self._read_batch is None:
            self._read_batch = step_batch_reader(self._worker.model_runner)
        batch = self._read_batch(num_tokens)
        return ScheduledStep(finished, batch, new_prompt_lens(scheduler_output))


def step_batch_reader(model_runner: Any) -> Callable[[int], StepBatch]:
    """A function that copies the batch of the step that just ran (the runner reuses its
    arrays), given the step's scheduled token count."""
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
