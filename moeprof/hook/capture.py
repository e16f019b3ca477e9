"""Device-side capture of the logged MoE layers' routing, safe under CUDA graphs and Dynamo.

Invariants:
    - One buffer for all logged layers, allocated once, before warm-up, compilation and graph
      capture, sized for the largest batch the engine may run (``max_num_batched_tokens``
      tokens). Token-major: ``rows[t, slot]`` is token ``t`` at the ``slot``-th logged layer
      (ascending layer order), so a step's first ``n`` tokens are one contiguous block and
      reach the host in one copy.
    - One row is ``2 * top_k`` int32: the k ids, then the k float32 weights stored bit for bit.
      So a token costs ``8 * top_k`` bytes per logged layer (32 B at top-4).
    - Inside the forward pass the only work per logged layer is two slice copies into that
      buffer, inside one opaque operator (``moeprof::capture_routes``): no host sync, no
      allocation, no Python branch on tensor values. CUDA graphs record the copies and replay
      them; Dynamo puts the operator into the compiled graph without letting Inductor fuse it
      into the router.
    - Every forward, dummy or real, overwrites tokens ``[:n]`` of every logged layer with this
      rank's ``n`` tokens; padding rows beyond the real tokens hold garbage. Only the host
      side, which knows the real token count of a real step, decides which rows are read (see
      ``collector.py``).
    - Under data parallelism the router's rows may hold other ranks' tokens too (naive
      dispatch gathers every DP rank's tokens before routing). A capture built with
      ``rank_rows`` (:func:`moeprof.hook.compat.rank_rows_reader`) asks it, inside the opaque
      operator (so outside what Dynamo traces), which rows are this rank's, and copies only
      those to row 0 on. A router output that matches no known layout is not copied; the
      capture remembers it (:meth:`RouteCapture.take_unmatched`) and the host side stops
      logging. Under CUDA graphs that question is asked while a graph is captured, as in
      vLLM's own ``RoutedExpertsCapturer``: DP ranks pad to one token count there, so the
      span holds at replay.
    - Ids are the logical expert ids the router returns, before any EPLB logical-to-physical
      mapping (``compat.tap_routing`` says where they come from).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

RankRows = Callable[[int], tuple[int, int] | None]
"""Given the number of rows a router returned, ``(start, count)`` of this rank's tokens among
them, or None when the count matches no known layout (:func:`moeprof.hook.compat.rank_rows`)."""


class _Layout:
    """How a capture finds its rank's rows, and the last router output that matched nothing."""

    def __init__(self, rank_rows: RankRows) -> None:
        self.rank_rows = rank_rows
        self.unmatched: int | None = None


_LAYOUTS: list[_Layout | None] = [None]
"""Index 0: every row is this rank's (no data parallelism). Each capture built with
``rank_rows`` adds its own entry; the operator gets the index as a constant argument."""


def _capture_routes(
    rows: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slot: int,
    layout: int,
) -> None:
    """The two slice copies into layer ``slot``, as an operator the compiler cannot see into.

    Written inline, the copies become extra stores that Inductor fuses into the router's
    top-k kernel; that changed the order of the selected experts, and with it the bf16
    rounding of the expert sum, so a logged run could generate other tokens than an unlogged
    one. Behind an opaque operator the router's kernels stay exactly as without logging. With
    a ``layout`` other than 0, only this rank's span of the router's rows is copied.
    """
    n, k = topk_ids.shape
    start = 0
    entry = _LAYOUTS[layout]
    if entry is not None:
        span = entry.rank_rows(n)
        if span is None:
            entry.unmatched = n
            return
        start, n = span
    rows[:n, slot, :k].copy_(topk_ids[start : start + n])
    rows[:n, slot, k:].view(torch.float32).copy_(topk_weights[start : start + n])


# Registered on the dispatcher directly, the way vLLM's ``direct_register_custom_op`` does:
# ``torch.library.custom_op`` wraps each call in Python dispatch logic that cost ~18 us a call
# on CPU, against ~2 us here. CompositeExplicitAutograd gives every backend this kernel and is
# never decomposed by Inductor, so the operator stays opaque in compiled graphs. The layer's
# slot is an int argument (a constant in each layer's call site), so every layer writes into
# the one shared buffer, not into a view of it.
_LIB = torch.library.Library("moeprof", "DEF")
_LIB.define(
    "capture_routes(Tensor(a!) rows, Tensor topk_ids, Tensor topk_weights, int slot, int layout)"
    " -> ()"
)
_LIB.impl("capture_routes", _capture_routes, "CompositeExplicitAutograd")


@torch.library.register_fake("moeprof::capture_routes", lib=_LIB)
def _(
    rows: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, slot: int, layout: int
) -> None:
    return None


class RouteCapture:
    """The static buffer the logged layers' routers write their ``topk_ids``/``topk_weights``
    into: ``rows`` is ``(max_tokens, num_layers, 2 * top_k)`` int32 (see the module's
    invariants)."""

    def __init__(
        self,
        max_tokens: int,
        num_layers: int,
        top_k: int,
        device: torch.device,
        rank_rows: RankRows | None = None,
    ) -> None:
        """``rank_rows``: where this rank's tokens are among a router's rows, when the router
        may see other ranks' tokens (data parallelism); None: every row is this rank's."""
        self.rows = torch.zeros(
            (max_tokens, num_layers, 2 * top_k), dtype=torch.int32, device=device
        )
        self._layout = 0
        if rank_rows is not None:
            _LAYOUTS.append(_Layout(rank_rows))
            self._layout = len(_LAYOUTS) - 1

    def take_unmatched(self) -> int | None:
        """The row count of the last router output that matched no known layout since the
        previous call (nothing of it was captured), or None."""
        entry = _LAYOUTS[self._layout]
        if entry is None or entry.unmatched is None:
            return None
        unmatched, entry.unmatched = entry.unmatched, None
        return unmatched

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    def token_rows(self) -> torch.Tensor:
        """The buffer as one row per token (all logged layers side by side), for the copy."""
        return self.rows.view(self.rows.shape[0], -1)

    def tap(self, slot: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
        """What the router of the ``slot``-th logged layer calls with its ``topk_ids`` and
        ``topk_weights`` (see :func:`moeprof.hook.compat.tap_routing`)."""
        if not 0 <= slot < self.rows.shape[1]:
            raise ValueError(f"slot {slot} is outside the {self.rows.shape[1]} logged layers")
        rows, layout = self.rows, self._layout

        def capture(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
            torch.ops.moeprof.capture_routes(rows, topk_ids, topk_weights, slot, layout)

        return capture
