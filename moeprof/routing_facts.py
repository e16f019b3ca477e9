"""What a logged ``topk_weights`` means: the routing semantics of the router moeprof tapped.

``topk_weights`` is the router's output as the MoE kernel receives it: the weights the kernel
multiplies each selected expert's output by. What the model does besides that differs by
family, and the meta's ``routing`` field records what moeprof can read off the loaded router
and MoE runner (:func:`routing_meta`):

``router``
    The vLLM router class (``CPURouter`` on the CPU build; ``FusedTopKRouter``,
    ``FusedTopKBiasRouter``, ``GroupedTopKRouter``, ``CustomRoutingRouter`` on CUDA).
``scoring``
    How router logits become scores: ``softmax``, ``sigmoid``, ``sqrtsoftplus``; None when a
    model-specific routing function decides (see ``custom_routing_function``).
``renormalize``
    Whether the top-k weights are divided by their sum (so they sum to 1, or to the factor
    applied in the router).
``grouped_topk``
    Experts are chosen within the best ``topk_group`` of ``num_expert_group`` groups
    (DeepSeek-V2/V3).
``correction_bias``
    The model has an ``e_score_correction_bias`` (DeepSeek-V3, GLM-4.5, Ernie-4.5, ...).
``correction_bias_used``
    Whether this router applies it to choose experts. vLLM's CPU router ignores it for softmax
    routing without groups (Ernie-4.5): the log is then what vLLM ran, not what the model
    card describes.
``routed_scaling_factor``
    The factor the model scales routed experts' combined output by (1.0: none).
``scaling_in_router``
    True: ``topk_weights`` already include the factor. False: the MoE runner applies it to
    the output after the kernel (DeepSeek-V3, GLM-4.5 on vLLM), so ``topk_weights`` are the
    Hugging Face weights divided by the factor.
``custom_routing_function``
    The name of a model-specific routing function (Llama-4's sigmoid top-1, ...), or None.

Scaling a model applies in its own code outside vLLM's MoE runner is invisible here.
"""

from __future__ import annotations

from typing import Any


def routing_meta(
    *,
    router_class: str,
    scoring: str | None,
    renormalize: bool | None,
    grouped_topk: bool,
    num_expert_group: int | None,
    topk_group: int | None,
    correction_bias: bool,
    custom_routing_function: str | None,
    scaling_in_router: float,
    scaling_on_output: float,
) -> dict[str, Any]:
    """The meta's ``routing`` dict from plain facts about the router (see the module doc).

    ``scaling_in_router`` is the router's own ``routed_scaling_factor`` (applied to
    ``topk_weights``), ``scaling_on_output`` the MoE runner's (applied after the kernel).
    """
    in_router = scaling_in_router != 1.0
    factor = scaling_in_router if in_router else scaling_on_output
    return {
        "router": router_class,
        "scoring": None if custom_routing_function else scoring,
        "renormalize": renormalize,
        "grouped_topk": grouped_topk,
        "num_expert_group": num_expert_group if grouped_topk else None,
        "topk_group": topk_group if grouped_topk else None,
        "correction_bias": correction_bias,
        "correction_bias_used": correction_bias
        and correction_bias_applied(router_class, scoring, grouped_topk, custom_routing_function),
        "routed_scaling_factor": float(factor),
        "scaling_in_router": in_router,
        "custom_routing_function": custom_routing_function,
    }


def correction_bias_applied(
    router_class: str, scoring: str | None, grouped_topk: bool, custom_routing_function: str | None
) -> bool:
    """Whether a router that holds a correction bias uses it to choose experts.

    vLLM 0.32's ``CPURouter`` reads the bias only in grouped top-k and in DeepSeek-V4's
    ``sqrtsoftplus`` routing; its plain softmax top-k ignores it. CUDA routers with a bias
    (``FusedTopKBiasRouter``, ``GroupedTopKRouter``) apply it.
    """
    if router_class == "CPURouter":
        return grouped_topk or scoring == "sqrtsoftplus"
    return custom_routing_function is None
