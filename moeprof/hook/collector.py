"""The host side of the hook: one per worker process that owns the logged layer.

After each real step it snapshots the batch layout, starts a non-blocking copy of the captured
rows into a pinned host slot, and hands both to the writer thread. That is all the model's
thread does: no sync, no formatting, no I/O.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import queue
from typing import Any

import torch

from moeprof import __version__
from moeprof.hook import compat
from moeprof.hook.capture import RouteCapture
from moeprof.hook.config import ENV_LAYER, HookConfig
from moeprof.hook.writer import LogWriter, StepItem
from moeprof.schema import meta_dict

logger = logging.getLogger("moeprof.hook")

NUM_SLOTS = 4
SLOT_WAIT_SEC = 30.0
"""Host slots in flight: the model thread waits only if the writer is 4 steps behind."""


class _Slot:
    def __init__(self, rows: int, top_k: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.ids = torch.empty((rows, top_k), dtype=torch.int32, pin_memory=pin)
        self.weights = torch.empty((rows, top_k), dtype=torch.float32, pin_memory=pin)
        self.ids_np = self.ids.numpy()
        self.weights_np = self.weights.numpy()
        self.event = torch.cuda.Event() if pin else None


class StepCollector:
    def __init__(self, capture: RouteCapture, writer: LogWriter, device: torch.device) -> None:
        self.capture = capture
        self.writer = writer
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for _ in range(NUM_SLOTS):
            self._free.put(_Slot(capture.max_tokens, capture.top_k, device))
        self._pending_finished: set[str] = set()
        self.disabled = False
        self.armed = False
        """False until the engine's warm-up is over (see ``install._arm_after_warmup``)."""
        atexit.register(self.close)

    @classmethod
    def start(cls, worker: Any, config: HookConfig) -> StepCollector | None:
        """Check the request against the loaded model, then start capturing (or raise)."""
        vcfg = worker.vllm_config
        model_id = vcfg.model_config.model
        if getattr(vcfg, "speculative_config", None) is not None:
            raise RuntimeError(
                "moeprof: speculative decoding routes draft tokens that may be rejected; "
                "logging it is not supported, run without a speculative config"
            )
        layers = compat.moe_layers(worker.model_runner.get_model())
        pp_size = vcfg.parallel_config.pipeline_parallel_size
        if config.layer not in layers:
            if pp_size > 1 and layers:
                return None  # another pipeline stage holds the layer
            if not layers:
                raise RuntimeError(f"moeprof: {model_id} has no MoE layer to log")
            raise RuntimeError(
                f"moeprof: {ENV_LAYER}={config.layer} is not an MoE layer of {model_id}; "
                f"its MoE layers are {_ranges(sorted(layers))}"
            )
        router = compat.router_of(layers[config.layer], config.layer)
        from vllm.distributed import get_tensor_model_parallel_rank

        if get_tensor_model_parallel_rank() != 0:
            return None  # every TP rank routes the same tokens; rank 0 writes them
        par = vcfg.parallel_config
        device = torch.device(worker.model_runner.device)
        graph_max = getattr(vcfg.compilation_config, "max_cudagraph_capture_size", None) or 0
        max_tokens = max(vcfg.scheduler_config.max_num_batched_tokens, graph_max)
        max_tokens *= max(par.data_parallel_size, 1)
        num_experts = getattr(vcfg.model_config, "get_num_experts", lambda: 0)() or getattr(
            router, "global_num_experts", None
        )
        path = config.path_for_dp_rank(par.data_parallel_rank, par.data_parallel_size)
        meta = meta_dict(
            model_id=model_id,
            vllm_version=compat.vllm_version(),
            torch_version=torch.__version__,
            device=compat.device_name(device),
            seed=vcfg.model_config.seed,
            layers_logged=[config.layer],
            top_k=int(router.top_k),
            num_experts=int(num_experts) if num_experts else None,
            prefix_caching=bool(vcfg.cache_config.enable_prefix_caching),
            dtype=str(vcfg.model_config.dtype).removeprefix("torch."),
            enforce_eager=bool(vcfg.model_config.enforce_eager),
            cudagraph_mode=str(getattr(vcfg.compilation_config, "cudagraph_mode", None)),
            tensor_parallel_size=par.tensor_parallel_size,
            data_parallel_rank=par.data_parallel_rank,
            data_parallel_size=par.data_parallel_size,
            moeprof_version=__version__,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        writer = LogWriter(
            path,
            meta,
            config.layer,
            int(router.top_k),
            compat.external_request_id,
            overwrite=config.overwrite,
        )
        capture = RouteCapture(max_tokens, int(router.top_k), device)
        capture.attach(router)
        logger.info("moeprof: logging MoE layer %d of %s to %s", config.layer, model_id, path)
        return cls(capture, writer, device)

    def after_step(self, model_runner: Any, scheduler_output: Any) -> None:
        """Hand a real step's rows to the writer; a failure stops logging, never the engine."""
        if self.disabled or not self.armed:
            return
        try:
            self._pending_finished.update(scheduler_output.finished_req_ids)
            num_tokens = scheduler_output.total_num_scheduled_tokens
            if num_tokens == 0:
                return
            batch = compat.step_batch(model_runner, num_tokens)
            try:
                slot = self._free.get(timeout=SLOT_WAIT_SEC)
            except queue.Empty:
                raise RuntimeError(
                    f"the writer has not freed a host slot in {SLOT_WAIT_SEC:.0f} s"
                ) from None
            n = batch.num_tokens
            slot.ids[:n].copy_(self.capture.ids[:n], non_blocking=True)
            slot.weights[:n].copy_(self.capture.weights[:n], non_blocking=True)
            if slot.event is not None:
                slot.event.record()
            finished, self._pending_finished = frozenset(self._pending_finished), set()
            self.writer.submit(
                StepItem(
                    batch=batch,
                    ids=slot.ids_np,
                    weights=slot.weights_np,
                    ready=slot.event,
                    new_prompt_lens=compat.new_prompt_lens(scheduler_output),
                    finished=finished,
                    release=lambda: self._free.put(slot),
                )
            )
        except Exception as e:
            self.disabled = True
            logger.error(
                "moeprof: logging stopped: %s: %s (the engine goes on)", type(e).__name__, e
            )

    def close(self) -> None:
        self.writer.close()


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5': a 60-layer list stays readable in one error line."""
    out: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if v is not None:
            start = prev = v
    return ", ".join(out)
