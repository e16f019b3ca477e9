"""The meta's ``routing``: what a logged ``topk_weights`` means, read off the loaded router.

Real routers are covered per family by ``test_archs_vllm.py``; these pin the rules on routers
built here with the attributes vLLM 0.32's router classes carry.
"""

from __future__ import annotations

from typing import Any

from moeprof.hook.compat import routing_of
from moeprof.routing_facts import correction_bias_applied


class CPURouter:
    def __init__(self, **attrs: Any) -> None:
        base = dict(
            use_grouped_topk=False,
            num_expert_group=None,
            topk_group=None,
            renormalize=True,
            scoring_func="softmax",
            routed_scaling_factor=1.0,
            e_score_correction_bias=None,
            custom_routing_function=None,
        )
        self.__dict__.update(base | attrs)


class FusedTopKBiasRouter(CPURouter):
    pass


class Runner:
    def __init__(self, routed_scaling_factor: float = 1.0) -> None:
        self.routed_scaling_factor = routed_scaling_factor


def test_a_factor_the_runner_applies_after_the_kernel_is_not_in_the_weights() -> None:
    """DeepSeek-V3 / GLM-4.5 on vLLM: the router gets 1.0, the runner scales the output."""
    router = CPURouter(
        use_grouped_topk=True,
        num_expert_group=8,
        topk_group=4,
        scoring_func="sigmoid",
        e_score_correction_bias=object(),
    )
    routing = routing_of(Runner(2.5), router)
    assert routing is not None
    assert routing["routed_scaling_factor"] == 2.5
    assert routing["scaling_in_router"] is False
    assert routing["grouped_topk"] is True
    assert (routing["num_expert_group"], routing["topk_group"]) == (8, 4)
    assert routing["correction_bias"] and routing["correction_bias_used"]


def test_a_factor_the_router_applies_is_in_the_weights() -> None:
    """HY-V3, AFMoE, EXAONE-MoE: the factor reaches the router."""
    router = CPURouter(
        use_grouped_topk=True, num_expert_group=1, topk_group=1, routed_scaling_factor=2.826
    )
    routing = routing_of(Runner(1.0), router)
    assert routing is not None
    assert routing["routed_scaling_factor"] == 2.826
    assert routing["scaling_in_router"] is True


def test_the_cpu_router_ignores_a_correction_bias_in_softmax_routing_without_groups() -> None:
    """Ernie-4.5 on the CPU build: the bias is loaded but plain softmax top-k runs."""
    routing = routing_of(Runner(), CPURouter(e_score_correction_bias=object()))
    assert routing is not None
    assert routing["correction_bias"] is True
    assert routing["correction_bias_used"] is False


def test_cuda_bias_routers_apply_the_correction_bias() -> None:
    routing = routing_of(Runner(), FusedTopKBiasRouter(e_score_correction_bias=object()))
    assert routing is not None
    assert routing["router"] == "FusedTopKBiasRouter"
    assert routing["correction_bias_used"] is True
    assert correction_bias_applied("GroupedTopKRouter", "sigmoid", True, None)
    assert correction_bias_applied("CPURouter", "sqrtsoftplus", False, None)


def test_a_model_routing_function_is_named_and_scoring_left_open() -> None:
    def custom_routing_function(**_: Any) -> None:
        return None

    routing = routing_of(Runner(), CPURouter(custom_routing_function=custom_routing_function))
    assert routing is not None
    assert routing["scoring"] is None
    assert routing["custom_routing_function"].endswith("custom_routing_function")


def test_a_router_without_these_attributes_gives_defaults_not_an_error() -> None:
    class Bare:
        pass

    routing = routing_of(object(), Bare())
    assert routing is not None
    assert routing["router"] == "Bare"
    assert routing["renormalize"] is None and routing["correction_bias"] is False
