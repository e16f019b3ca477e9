"""Device-side capture of one MoE layer's routing, safe under CUDA graphs and Dynamo.

Invariants:
    - The buffer is allocated once, before warm-up, compilation and graph capture, sized for
      the largest batch the engine may run (``max_num_batched_tokens`` rows).
    - Inside the forward pass the only work is two slice copies into that buffer, inside one
      opaque operator (``moeprof::capture_routes``): no host sync, no allocation, no Python
      branch on tensor values. CUDA graphs record the copies and replay them; Dynamo puts the
      operator into the compiled graph without letting Inductor fuse it into the router.
    - Every forward, dummy or real, overwrites rows ``[:n]``; padding rows beyond the real
      tokens hold garbage. Only the host side, which knows the real token count of a real
      step, decides which rows are read (see ``collector.py``).
    - Ids are the logical expert ids the router returns, before any EPLB logical-to-physical
      mapping (``compat.tap_routing`` says where they come from).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _capture_routes(rows: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    """The two slice copies, as an operator the compiler cannot see into.

    Written inline, the copies become extra stores that Inductor fuses into the router's
    top-k kernel; that changed the order of the selected experts, and with it the bf16
    rounding of the expert sum, so a logged run could generate other tokens than an unlogged
    one. Behind an opaque operator the router's kernels stay exactly as without logging.
    """
    n, k = topk_ids.shape
    rows[:n, :k].copy_(topk_ids)
    rows[:n, k:].view(torch.float32).copy_(topk_weights)


# Registered on the dispatcher directly, the way vLLM's ``direct_register_custom_op`` does:
# ``torch.library.custom_op`` wraps each call in Python dispatch logic that cost ~18 us a call
# on CPU, against ~2 us here. CompositeExplicitAutograd gives every backend this kernel and is
# never decomposed by Inductor, so the operator stays opaque in compiled graphs.
_LIB = torch.library.Library("moeprof", "DEF")
_LIB.define("capture_routes(Tensor(a!) rows, Tensor topk_ids, Tensor topk_weights) -> ()")
_LIB.impl("capture_routes", _capture_routes, "CompositeExplicitAutograd")


@torch.library.register_fake("moeprof::capture_routes", lib=_LIB)
def _(rows: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    return None


class RouteCapture:
    """A static buffer that one router writes its ``topk_ids``/``topk_weights`` into.

    One int32 row per token: the k ids, then the k float32 weights stored bit for bit, so
    that moving a step's rows to the host is one copy, not two.
    """

    def __init__(self, max_tokens: int, top_k: int, device: torch.device) -> None:
        self.rows = torch.zeros((max_tokens, 2 * top_k), dtype=torch.int32, device=device)

    def tap(self) -> Callable[[torch.Tensor, torch.Tensor], None]:
        """What the router calls with its ``topk_ids``/``topk_weights`` (see
        :func:`moeprof.hook.compat.tap_routing`): the capture operator on this buffer."""
        rows = self.rows

        def capture(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
            torch.ops.moeprof.capture_routes(rows, topk_ids, topk_weights)

        return capture
