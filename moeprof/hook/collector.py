"""The host side of the hook: one per worker process that owns the logged layers.

After each real step it snapshots the batch layout, copies the captured rows into the host ring
(on a GPU: a non-blocking copy into pinned memory, then an event), and hands both to the writer:
by default a queue of a writer thread in this process (:mod:`moeprof.hook.writer`), with
``VLLM_LOG_MOE_WRITER=process`` a message to the writer process
(:mod:`moeprof.hook.writer_process`, the ring in shared memory). That is all the model's thread
does: no sync, no thread wake-up, no formatting, no I/O.
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
from moeprof.hook.writer_process import ProcessWriter
from moeprof.layers import LayerSelection, LayerSpecError, format_layers
from moeprof.schema import meta_dict

logger = logging.getLogger("vllm.moeprof")

RING_WAIT_SEC = 30.0
"""How long a step waits for the writer to free host memory before logging stops."""
RING_BYTES = 4 << 20
"""The host ring's size, unless two of the largest steps need more."""
NUM_EVENTS = 64


def ring_rows(max_tokens: int, row_bytes: int) -> int:
    """Rows (tokens, all logged layers each) of the host ring: ``RING_BYTES`` worth, bounded by
    bytes so that logging every layer of a big model does not multiply it, but never fewer
    than two of the largest steps, so that a half-full ring still takes one more."""
    return max(RING_BYTES // row_bytes, 2 * max_tokens)


class StepCollector:
    def __init__(
        self,
        capture: RouteCapture,
        writer: LogWriter | ProcessWriter,
        device: torch.device,
        read_step: Callable[[Any], compat.ScheduledStep],
    ) -> None:
        self.capture = capture
        self.writer = writer
        self.ring = writer.ring
        on_host = device.type == "cpu"
        self._events = (
            [torch.cuda.Event() for _ in range(NUM_EVENTS)] if device.type == "cuda" else []
        )
        self._next_event = 0
        self._pending_finished: set[str] = set()
        self._read_step = read_step
        self._token_rows = capture.token_rows()
        self._token_rows_np = self._token_rows.numpy() if on_host else None
        self.steps = 0
        """Real steps handed to the writer so far: the next one's ``step`` number."""
        self.disabled = False
        self.armed = False
        """False until the engine's warm-up is over (see ``install._arm_after_warmup``)."""
        atexit.register(self.close)

    @classmethod
    def start(cls, worker: Any, config: HookConfig) -> StepCollector | None:
        """Check the request against the loaded model, then start capturing.

        Raises :class:`HookRefusal` when the layers cannot be logged; returns None when this
        worker has nothing to write (another pipeline stage holds the layers, or it is not
        tensor-parallel rank 0: every TP rank routes the same tokens, and rank 0 writes them).
        """
        facts = compat.engine_facts(worker)
        refuse_unsupported_engine(facts)
        routers = routers_to_log(compat.moe_runners(worker), config.layers, facts)
        if routers is None or facts.tensor_parallel_rank != 0:
            return None
        return cls.open(facts, routers, config, compat.StepReader(worker))

    @classmethod
    def open(
        cls,
        facts: compat.EngineFacts,
        routers: dict[int, compat.Router],
        config: HookConfig,
        read_step: Callable[[Any], compat.ScheduledStep],
    ) -> StepCollector:
        """Open the log, allocate the buffers and tap the routers (``routers``: layer ->
        router, in ascending layer order)."""
        layers = sorted(routers)
        top_k = common_top_k(routers)
        path = config.path_for_dp_rank(facts.data_parallel_rank, facts.data_parallel_size)
        max_tokens = facts.max_router_tokens
        row_ints = len(layers) * 2 * top_k
        in_process = config.writer == "process"
        ring = HostRing(
            ring_rows(max_tokens, row_ints * 4),
            len(layers),
            top_k,
            pin=facts.device.type == "cuda",
            shared=in_process,
        )
        writer: LogWriter | ProcessWriter
        if in_process:
            writer = ProcessWriter(
                path,
                log_meta(facts, routers),
                layers,
                top_k,
                config.overwrite,
                ring,
                config.part_sec,
            )
        else:
            writer = LogWriter(
                path,
                log_meta(facts, routers),
                layers,
                top_k,
                compat.external_request_id,
                overwrite=config.overwrite,
                ring=ring,
                part_sec=config.part_sec,
            )
        capture = RouteCapture(
            max_tokens,
            len(layers),
            top_k,
            facts.device,
            # Under DP a router may return other ranks' tokens too: find this rank's span.
            compat.rank_rows_reader(facts.data_parallel_rank)
            if facts.data_parallel_size > 1
            else None,
        )
        for slot, layer in enumerate(layers):
            compat.tap_routing(routers[layer], capture.tap(slot))
        writer.device_bytes = capture.nbytes
        logger.info(
            "moeprof: logging MoE layer%s %s of %s to %s (device buffer %.1f MiB, host ring "
            "%.1f MiB, writer %s; vLLM's compile cache off for this run)",
            "s" if len(layers) > 1 else "",
            format_layers(layers),
            facts.model_id,
            path,
            capture.nbytes / 2**20,
            ring.nbytes / 2**20,
            "process" if in_process else "thread",
        )
        return cls(capture, writer, facts.device, read_step)

    def after_step(self, scheduler_output: Any) -> None:
        """Hand a real step's rows to the writer; a failure stops logging, never the engine."""
        if not self.armed:
            return
        if self.disabled:
            self._count_dropped(scheduler_output)
            return
        try:
            step = self._read_step(scheduler_output)
            self._pending_finished.update(step.finished)
            batch = step.batch
            if batch is None:
                return
            unmatched = self.capture.take_unmatched()
            if unmatched is not None:
                raise RuntimeError(
                    f"a router returned {unmatched} rows, which match none of the data-parallel "
                    "token layouts moeprof knows (see compat.rank_rows); nothing more is logged"
                )
            if self.writer.failed:  # the writer has said why; it counts what is not logged
                self.writer.drop(batch.num_tokens)
                return
            start = self.ring.reserve(batch.num_tokens, self.writer.wake, RING_WAIT_SEC)
            event = self._copy_rows(batch.num_tokens, start % self.ring.capacity)
            finished, self._pending_finished = self._pending_finished, set()
            self.writer.submit(
                StepItem(batch, start, event, step.new_prompt_lens, finished, self.steps)
            )
            self.steps += 1
        except Exception as e:
            self.disabled = True
            self.writer.halt(f"{type(e).__name__}: {e}")  # the closing record says why
            logger.error(
                "moeprof: logging stopped: %s: %s (the engine goes on)", type(e).__name__, e
            )

    def _count_dropped(self, scheduler_output: Any) -> None:
        """After logging stopped, count the step's routes as dropped (the closing record's
        ``dropped``), so a log cut short never reads as complete."""
        try:
            batch = self._read_step(scheduler_output).batch
        except Exception:  # the reason logging stopped may be this very reader
            batch = None
        if batch is not None:
            self.writer.drop(batch.num_tokens)

    def _copy_rows(self, n: int, row: int) -> torch.cuda.Event | None:
        """Copy the step's first ``n`` captured rows to ring row ``row``; on a GPU, return the
        event that marks the end of the (non-blocking) copy."""
        if self._token_rows_np is not None:
            self.ring.rows_np[row : row + n] = self._token_rows_np[:n]
            return None
        self.ring.rows[row : row + n].copy_(self._token_rows[:n], non_blocking=bool(self._events))
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


def routers_to_log(
    runners: dict[int, Any], selection: LayerSelection, facts: compat.EngineFacts
) -> dict[int, compat.Router] | None:
    """The routers of the selected layers (layer -> router), or None when this pipeline stage
    holds none of them.

    Under pipeline parallelism a worker sees only its stage's layers, so it cannot tell a
    dense layer from another stage's: it logs the named layers it holds, and refuses a
    selection that spans stages (the stages would write one file each, not yet supported).
    """
    pp = facts.pipeline_parallel_size > 1
    if pp and runners:
        if selection.is_all:
            raise HookRefusal(
                f"{ENV_LAYER}=all with pipeline parallelism is not supported: each stage holds "
                "other layers; name layers of one stage"
            )
        held = [i for i in selection.indices or () if i in runners]
        if not held:
            return None  # another stage holds the layers
        if len(held) < len(selection.indices or ()):
            raise HookRefusal(
                f"{ENV_LAYER}={selection}: this pipeline stage holds only layers "
                f"{format_layers(held)} of them; name layers of one stage"
            )
    if not runners:
        raise HookRefusal(f"{facts.model_id} has no MoE layer to log")
    try:
        layers = selection.resolve(runners, facts.model_id)
    except LayerSpecError as e:
        raise HookRefusal(f"{ENV_LAYER}={e}") from None
    return {layer: compat.router_of(runners[layer], layer) for layer in layers}


def common_top_k(routers: dict[int, compat.Router]) -> int:
    """The one top_k of the logged layers (a log has one ``top_k``)."""
    ks = {layer: r.top_k for layer, r in routers.items()}
    if len(set(ks.values())) > 1:
        raise HookRefusal(
            f"the selected layers route to different numbers of experts ({ks}); "
            "log layers with the same top_k"
        )
    return next(iter(ks.values()))


def log_meta(facts: compat.EngineFacts, routers: dict[int, compat.Router]) -> dict[str, Any]:
    """The log's first line."""
    router = routers[min(routers)]
    return meta_dict(
        model_id=facts.model_id,
        vllm_version=compat.vllm_version(),
        torch_version=torch.__version__,
        device=compat.device_name(facts.device),
        seed=facts.seed,
        layers_logged=sorted(routers),
        top_k=router.top_k,
        num_experts=facts.num_experts or router.num_experts,
        routing=router.routing,
        routing_differs_in_layers=[
            layer for layer in sorted(routers) if routers[layer].routing != router.routing
        ],
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
