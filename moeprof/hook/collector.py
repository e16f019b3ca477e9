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
from moeprof.errors import HookRefusal
from moeprof.hook import compat
from moeprof.hook.capture import RouteCapture
from moeprof.hook.config import ENV_LAYER, HookConfig
from moeprof.hook.ring import HostRing
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
    def __init__(
        self,
        capture: RouteCapture,
        writer: LogWriter,
        device: torch.device,
        read_step: Callable[[Any], compat.ScheduledStep],
    ) -> None:
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
        self._read_step = read_step
        self.disabled = False
        self.armed = False
        """False until the engine's warm-up is over (see ``install._arm_after_warmup``)."""
        atexit.register(self.close)

    @classmethod
    def start(cls, worker: Any, config: HookConfig) -> StepCollector | None:
        """Check the request against the loaded model, then start capturing.

        Raises :class:`HookRefusal` when the layer cannot be logged; returns None when this
        worker has nothing to write (another pipeline stage holds the layer, or it is not
        tensor-parallel rank 0: every TP rank routes the same tokens, and rank 0 writes them).
        """
        facts = compat.engine_facts(worker)
        refuse_unsupported_engine(facts)
        router = router_to_log(compat.moe_runners(worker), config.layer, facts)
        if router is None or facts.tensor_parallel_rank != 0:
            return None
        return cls.open(facts, router, config, compat.StepReader(worker))

    @classmethod
    def open(
        cls,
        facts: compat.EngineFacts,
        router: compat.Router,
        config: HookConfig,
        read_step: Callable[[Any], compat.ScheduledStep],
    ) -> StepCollector:
        """Open the log, allocate the buffers and tap the router."""
        path = config.path_for_dp_rank(facts.data_parallel_rank, facts.data_parallel_size)
        max_tokens = facts.max_router_tokens
        writer = LogWriter(
            path,
            log_meta(facts, router, config.layer),
            config.layer,
            router.top_k,
            compat.external_request_id,
            overwrite=config.overwrite,
            ring=HostRing(ring_rows(max_tokens), router.top_k, pin=facts.device.type == "cuda"),
        )
        capture = RouteCapture(max_tokens, router.top_k, facts.device)
        compat.tap_routing(router, capture.tap())
        logger.info("moeprof: logging MoE layer %d of %s to %s", config.layer, facts.model_id, path)
        return cls(capture, writer, facts.device, read_step)

    def after_step(self, scheduler_output: Any) -> None:
        """Hand a real step's rows to the writer; a failure stops logging, never the engine."""
        if self.disabled or not self.armed:
            return
        try:
            step = self._read_step(scheduler_output)
            self._pending_finished.update(step.finished)
            batch = step.batch
            if batch is None:
                return
            if self.writer.failed:
                self.disabled = True  # the writer has said why
                return
            start = self.ring.reserve(batch.num_tokens, self.writer.wake, RING_WAIT_SEC)
            event = self._copy_rows(batch.num_tokens, start % self.ring.capacity)
            finished, self._pending_finished = self._pending_finished, set()
            self.writer.submit(StepItem(batch, start, event, step.new_prompt_lens, finished))
        except Exception as e:
            self.disabled = True
            logger.error(
                "moeprof: logging stopped: %s: %s (the engine goes on)", type(e).__name__, e
            )

    def _copy_rows(self, n: int, row: int) -> torch.cuda.Event | None:
        """Copy the step's first ``n`` captured rows to ring row ``row``; on a GPU, return the
        event that marks the end of the (non-blocking) copy."""
        if self._rows_np is not None:
            self.ring.rows_np[row : row + n] = self._rows_np[:n]
            return None
        self.ring.rows[row : row + n].copy_(self.capture.rows[:n], non_blocking=bool(self._events))
        if not self._events:
            return None
        event = self._events[self._next_event]
        self._next_event = (self._next_event + 1) % NUM_EVENTS
        event.record()
        return event

    def close(self) -> None:
        self.writer.close()


def refuse_unsupported_engine(facts: compat.EngineFacts) -> None:
    if facts.speculative:
        raise HookRefusal(
            "speculative decoding routes draft tokens that may be rejected; "
            "logging it is not supported, run without a speculative config"
        )


def router_to_log(
    runners: dict[int, Any], layer: int, facts: compat.EngineFacts
) -> compat.Router | None:
    """The router of ``layer``, or None when another pipeline stage holds that layer."""
    if layer not in runners:
        if facts.pipeline_parallel_size > 1 and runners:
            return None
        if not runners:
            raise HookRefusal(f"{facts.model_id} has no MoE layer to log")
        raise HookRefusal(
            f"{ENV_LAYER}={layer} is not an MoE layer of {facts.model_id}; "
            f"its MoE layers are {_ranges(sorted(runners))}"
        )
    return compat.router_of(runners[layer], layer)


def log_meta(facts: compat.EngineFacts, router: compat.Router, layer: int) -> dict[str, Any]:
    """The log's first line."""
    return meta_dict(
        model_id=facts.model_id,
        vllm_version=compat.vllm_version(),
        torch_version=torch.__version__,
        device=compat.device_name(facts.device),
        seed=facts.seed,
        layers_logged=[layer],
        top_k=router.top_k,
        num_experts=facts.num_experts or router.num_experts,
        prefix_caching=facts.prefix_caching,
        dtype=facts.dtype,
        enforce_eager=facts.enforce_eager,
        cudagraph_mode=facts.cudagraph_mode,
        tensor_parallel_size=facts.tensor_parallel_size,
        data_parallel_rank=facts.data_parallel_rank,
        data_parallel_size=facts.data_parallel_size,
        moeprof_version=__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


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
