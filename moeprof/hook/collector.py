"""The host side of the hook: one per worker process that owns the logged layer.

After each real step it snapshots the batch layout, copies the captured rows into the host ring
(on a GPU: a non-blocking copy into pinned memory, then an event), and queues both for the
writer thread. That is all the model's thread does: no sync, no thread wake-up, no formatting,
no I/O.
"""

from __future__ import annotations

import atexit
import datetime
import logging
from collections.abc import Callable
from typing import Any

import torch

from moeprof import __version__
from moeprof.hook import compat
from moeprof.hook.capture import RouteCapture
from moeprof.hook.config import ENV_LAYER, HookConfig
from moeprof.hook.ring import HostRing
from moeprof.hook.rows import StepBatch
from moeprof.hook.writer import LogWriter, StepItem
from moeprof.schema import meta_dict

logger = logging.getLogger("moeprof.hook")

RING_WAIT_SEC = 30.0
"""How long a step waits for the writer to free host memory before logging stops."""
MIN_RING_ROWS = 1 << 17
NUM_EVENTS = 64


def ring_rows(max_tokens: int) -> int:
    """At least four of the largest steps, so a half-full ring still takes two more."""
    return max(MIN_RING_ROWS, 4 * max_tokens)


class StepCollector:
    def __init__(self, capture: RouteCapture, writer: LogWriter, device: torch.device) -> None:
        self.capture = capture
        self.writer = writer
        self.ring = writer.ring
        on_host = device.type == "cpu"
        self._rows_np = capture.rows.numpy() if on_host else None
        self._events = (
            [torch.cuda.Event() for _ in range(NUM_EVENTS)] if device.type == "cuda" else []
        )
        self._next_event = 0
        self._pending_finished: set[str] = set()
        self._read_batch: Callable[[int], StepBatch] | None = None
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
        top_k = int(router.top_k)
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
            top_k=top_k,
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
            top_k,
            compat.external_request_id,
            overwrite=config.overwrite,
            ring=HostRing(ring_rows(max_tokens), top_k, pin=device.type == "cuda"),
        )
        capture = RouteCapture(max_tokens, top_k, device)
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
            if self._read_batch is None:
                self._read_batch = compat.step_batch_reader(model_runner)
            batch = self._read_batch(num_tokens)
            if self.writer.failed:
                self.disabled = True  # the writer has said why
                return
            n = batch.num_tokens
            start = self.ring.reserve(n, self.writer.wake, RING_WAIT_SEC)
            row = start % self.ring.capacity
            event = None
            if self._rows_np is not None:
                self.ring.rows_np[row : row + n] = self._rows_np[:n]
            else:
                self.ring.rows[row : row + n].copy_(
                    self.capture.rows[:n], non_blocking=bool(self._events)
                )
                if self._events:
                    event = self._events[self._next_event]
                    self._next_event = (self._next_event + 1) % NUM_EVENTS
                    event.record()
            finished, self._pending_finished = self._pending_finished, set()
            self.writer.submit(
                StepItem(batch, start, event, compat.new_prompt_lens(scheduler_output), finished)
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
