"""Tiny random-weight checkpoints of every MoE family vLLM's CPU build runs, and a driver that
runs many of them through vLLM in one process.

A checkpoint is built the way a user would make one: a transformers config of the family, a
model from ``from_config`` with seeded weights, ``save_pretrained`` in float32, and moeprof's
embedded tokenizer. Seconds each, cached under ``moeprof.tiny.cache_dir()``.

Weights are re-drawn with ``std = fan_in ** -0.5`` (transformers' default 0.02 makes every
router logit nearly zero, so top-k would be decided by rounding), router rows scaled from 0.5x
to 2x so that routing is skewed as in trained models, and correction biases drawn at random so
that bias-corrected routing is really exercised.

Driver (one vLLM process for many families, the engine in-process):
``python tests/archs.py run {baseline,logged} OUT_DIR FAMILY...`` writes ``OUT_DIR/<arm>.json``
(per family: outputs, seconds, or the error) and, for ``logged``, ``OUT_DIR/<family>.jsonl``
and ``OUT_DIR/<family>.router_inputs.npz`` (the hidden states each MoE layer's router received,
see ``router_inputs.py``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ARCHS_VERSION = 2
SEED = 1234

PROMPTS = [
    "Janet's ducks lay 16 eggs per day. How many dollars does she make?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber.",
    "Hi",
]
MAX_TOKENS = 8

_BASE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "use_cache": True,
}

_MLA: dict[str, Any] = {
    # vLLM's CPU MLA backend needs kv_lora_rank + qk_rope_head_dim == 576.
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "head_dim": 64,  # transformers' rotary embedding of the rope part
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "q_lora_rank": None,
    "num_key_value_heads": 4,
}


def _deepseek_yarn(mscale: float) -> dict[str, Any]:
    """The YaRN rope of the DeepSeek-V2 (``mscale`` 0.707) and V3 (1.0) checkpoints: vLLM runs
    it as ``DeepseekScalingRotaryEmbedding`` (PyTorch on CPU), and it scales the attention
    softmax by ``mscale_all_dim``. With plain rope vLLM's CPU build, eager, would run its C++
    rotary op instead, which mis-rotates MLA's queries (see ``NATIVE_ROPE``)."""
    return {
        "max_position_embeddings": 163840,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": mscale,
            "mscale_all_dim": mscale,
        },
    }


NATIVE_ROPE: dict[str, Any] = {"compilation_config": {"custom_ops": ["all", "-rotary_embedding"]}}
"""vLLM's plain rotary embedding in PyTorch instead of the CPU build's C++ op, for models with
plain rope that hand the op 3-D ``[tokens, heads, dim]`` tensors: MLA's q rope part
(vllm/model_executor/layers/mla.py:228; GLM-4-MoE-Lite, whose real checkpoint GLM-4.7-Flash
has plain rope) and LFM2's q/k after their per-head norms (models/lfm2_moe.py:257).

The C++ op (``torch.ops._C.rotary_embedding``, called by ``RotaryEmbedding.forward_cpu``,
layers/rotary_embedding/base.py:310) takes the head count from ``query.size(-1) // head_size``,
1 there: of the tokens x heads rows it rotates only the first ``tokens`` (with positions 0, 1,
... in (token, head) order) and leaves the rest unrotated, so attention differs from the
model's (and transformers') for every token after a request's first. vLLM runs the op only
with ``custom_ops`` "all", which it picks for ``enforce_eager`` (these tests) on CPU; a default
(compiled) CPU engine picks "none" and runs the PyTorch rotary, as this setting does, and CUDA's
op handles 3-D inputs. DeepSeek-V2/V3 checkpoints use YaRN rope, which has no C++ path on CPU
(``_deepseek_yarn``). ``test_cpu_rope_op_still_mis_rotates_3d_queries`` pins the bug.
"""


REFERENCE_MLA: dict[str, Any] = {"attention_config": {"backend": "CPU_MLA"}}
"""vLLM's reference CPU MLA backend (the one ``_MLA``'s shapes are for), asked for by name: on a
CPU with AMX tiles vLLM's CPU build picks ``AMX_MLA`` by default
(vllm/platforms/cpu.py:156), whose ``process_weights_after_loading`` packs ``W_UK`` with
``torch.ops._C.convert_weight_packed``, which refuses float32 weights ("expect weight to be
bfloat16, float16, int8, fp8_e4m3 or uint8"), so these float32 checkpoints would not load there.
"""


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture of the matrix."""

    name: str
    model_type: str
    """transformers' ``model_type``."""
    architecture: str
    """The class name in ``config.architectures`` (HF and vLLM)."""
    config: dict[str, Any]
    """Overrides of ``_BASE`` and the family config's defaults."""
    weights: str = "equal"
    """How the logged ``topk_weights`` relate to HF's: ``equal``; ``scaled`` (HF's divided by
    ``routed_scaling_factor``: vLLM applies the factor to the MoE output, not in the router)."""
    model_impl: str = "auto"
    """vLLM's ``model_impl`` (``transformers`` runs the Transformers backend)."""
    skip: str | None = None
    """Why this family is not run on the CPU build (the reason, for the support table)."""
    skip_signature: str = ""
    """Text of the traceback that shows the ``skip`` reason still holds."""
    vllm_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keys written into config.json after ``save_pretrained``: ones vLLM reads (the names of
    the original checkpoints) that transformers 5 does not write, or writes differently."""
    hf_differs: str | None = None
    """Why vLLM's routing differs from transformers' for this family (the log is still what
    vLLM ran); None when the two agree."""
    hf_zero_correction_bias: bool = False
    """Compare with transformers routing without the correction bias: what vLLM's CPU router
    runs for this family (it ignores the bias in softmax routing without groups)."""
    routing: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Entries the meta's ``routing`` must have (see ``moeprof.routing_facts``)."""
    llm_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra keyword arguments of ``vllm.LLM`` for this family, both arms (``NATIVE_ROPE``)."""

    @property
    def routed_scaling_factor(self) -> float:
        for key in ("routed_scaling_factor", "router_scaling_factor", "route_scale"):
            if key in self.config:
                return float(self.config[key])
        return 1.0


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "qwen2_moe",
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            {
                "num_experts": 16,
                "num_experts_per_tok": 4,
                "moe_intermediate_size": 64,
                "shared_expert_intermediate_size": 128,
                "norm_topk_prob": False,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
            },
            routing={"scoring": "softmax", "renormalize": False},
        ),
        Family(
            "mixtral",
            "mixtral",
            "MixtralForCausalLM",
            {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64},
            routing={"scoring": "softmax", "renormalize": True},
        ),
        Family(
            "olmoe",
            "olmoe",
            "OlmoeForCausalLM",
            # vLLM hard-codes RMSNorm eps 1e-5 for OLMoE: the checkpoint uses the same.
            {
                "num_experts": 16,
                "num_experts_per_tok": 4,
                "intermediate_size": 64,
                "norm_topk_prob": False,
                "rms_norm_eps": 1e-5,
            },
            routing={"scoring": "softmax", "renormalize": False},
        ),
        Family(
            "deepseek_v3",
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            _MLA
            | {
                "n_routed_experts": 16,
                "num_experts_per_tok": 4,
                "n_group": 4,
                "topk_group": 2,
                "n_shared_experts": 1,
                "moe_intermediate_size": 64,
                "first_k_dense_replace": 1,
                "norm_topk_prob": True,
                "routed_scaling_factor": 2.5,
                "rope_interleave": True,
                # Keys vLLM reads that transformers 5 does not write for DeepSeek-V3.
                "topk_method": "noaux_tc",
                "scoring_func": "sigmoid",
            }
            | _deepseek_yarn(1.0),
            weights="scaled",
            llm_kwargs=REFERENCE_MLA,
            routing={
                "scoring": "sigmoid",
                "grouped_topk": True,
                "correction_bias": True,
                "correction_bias_used": True,
            },
        ),
        Family(
            "qwen3_moe",
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            {
                "num_local_experts": 16,
                "num_experts_per_tok": 4,
                "moe_intermediate_size": 64,
                "norm_topk_prob": True,
            },
            routing={"scoring": "softmax", "renormalize": True},
        ),
        Family(
            "deepseek_v2",
            "deepseek_v2",
            "DeepseekV2ForCausalLM",
            _MLA
            | {
                "n_routed_experts": 16,
                "num_experts_per_tok": 4,
                "n_group": 4,
                "topk_group": 2,
                "topk_method": "group_limited_greedy",
                "n_shared_experts": 1,
                "moe_intermediate_size": 64,
                "first_k_dense_replace": 1,
                "norm_topk_prob": False,
            }
            | _deepseek_yarn(0.707),
            llm_kwargs=REFERENCE_MLA,
            routing={"scoring": "softmax", "grouped_topk": True, "correction_bias": False},
        ),
        Family(
            "glm4_moe",
            "glm4_moe",
            "Glm4MoeForCausalLM",
            {
                "n_routed_experts": 16,
                "num_experts_per_tok": 4,
                "n_group": 1,
                "topk_group": 1,
                "n_shared_experts": 1,
                "moe_intermediate_size": 64,
                "first_k_dense_replace": 1,
                "norm_topk_prob": True,
                "routed_scaling_factor": 2.5,
                "partial_rotary_factor": 0.5,
                "use_qk_norm": False,
            },
            weights="scaled",
            routing={"scoring": "sigmoid", "correction_bias": True, "correction_bias_used": True},
        ),
        Family(
            "glm4_moe_lite",
            "glm4_moe_lite",
            "Glm4MoeLiteForCausalLM",
            _MLA
            | {
                "n_routed_experts": 16,
                "num_experts_per_tok": 4,
                "n_group": 1,
                "topk_group": 1,
                "n_shared_experts": 1,
                "moe_intermediate_size": 64,
                "mlp_layer_types": ["dense", "sparse", "sparse"],
                "norm_topk_prob": True,
                "routed_scaling_factor": 1.8,
            },
            weights="scaled",
            vllm_config={"first_k_dense_replace": 1},
            llm_kwargs=NATIVE_ROPE | REFERENCE_MLA,
            routing={"scoring": "sigmoid", "correction_bias": True, "correction_bias_used": True},
        ),
        Family(
            "gpt_oss",
            "gpt_oss",
            "GptOssForCausalLM",
            {
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
                "intermediate_size": 64,
                "sliding_window": 128,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                "attention_bias": True,
            },
        ),
        Family(
            "granitemoe",
            "granitemoe",
            "GraniteMoeForCausalLM",
            {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64},
        ),
        Family(
            "granitemoeshared",
            "granitemoeshared",
            "GraniteMoeSharedForCausalLM",
            {
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
                "intermediate_size": 64,
                "shared_intermediate_size": 128,
            },
        ),
        Family(
            "ernie4_5_moe",
            "ernie4_5_moe",
            "Ernie4_5_MoeForCausalLM",
            {
                "moe_num_experts": 16,
                "moe_k": 4,
                "moe_intermediate_size": 64,
                "moe_num_shared_experts": 1,
                "moe_layer_start_index": 1,
                "moe_layer_end_index": 2,
            },
            hf_zero_correction_bias=True,
            routing={"scoring": "softmax", "correction_bias": True, "correction_bias_used": False},
        ),
        Family(
            "mimo_v2_flash",
            "mimo_v2_flash",
            "MiMoV2FlashForCausalLM",
            {
                "n_routed_experts": 16,
                "num_experts_per_tok": 4,
                "n_group": 1,
                "topk_group": 1,
                "moe_intermediate_size": 64,
                "norm_topk_prob": True,
                "v_head_dim": 32,
                "sliding_window": 128,
                "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
                "mlp_layer_types": ["dense", "sparse", "sparse"],
            },
            # vLLM's MiMoV2 reads the original checkpoint's keys; without them it runs other
            # attention (rope theta 1e6 on all dims, no sinks) than the model is.
            vllm_config={
                "hybrid_layer_pattern": [0, 1, 1],
                "moe_layer_freq": [0, 1, 1],
                "layernorm_epsilon": 1e-5,
                "swa_num_attention_heads": 4,
                "swa_num_key_value_heads": 4,  # transformers doubles SWA layers' kv heads
                "swa_head_dim": 32,
                "swa_v_head_dim": 32,
                "sliding_window_size": 128,
                "rope_theta": 5000000.0,
                "swa_rope_theta": 10000.0,
                "partial_rotary_factor": 0.334,
                "add_swa_attention_sink_bias": True,
            },
        ),
        Family(
            "hy_v3",
            "hy_v3",
            "HYV3ForCausalLM",
            {
                "num_experts": 16,
                "num_experts_per_tok": 4,
                "num_shared_experts": 1,
                "moe_intermediate_size": 64,
                "router_scaling_factor": 2.826,
                "mlp_layer_types": ["dense", "sparse", "sparse"],
            },
            vllm_config={
                "first_k_dense_replace": 1,
                "expert_hidden_dim": 64,
                "route_norm": True,
                "qk_norm": True,
            },
        ),
        Family(
            "afmoe",
            "afmoe",
            "AfmoeForCausalLM",
            {
                "num_experts": 16,
                "num_experts_per_tok": 4,
                "num_shared_experts": 1,
                "moe_intermediate_size": 64,
                "num_dense_layers": 1,
                "route_scale": 2.0,
                "sliding_window": 128,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            },
            vllm_config={
                "score_func": "sigmoid",
                "route_norm": True,
                "n_group": 1,
                "topk_group": 1,
            },
        ),
        Family(
            "lfm2_moe",
            "lfm2_moe",
            "Lfm2MoeForCausalLM",
            {
                "num_experts": 16,
                "num_experts_per_tok": 4,
                "moe_intermediate_size": 64,
                "num_dense_layers": 1,
                "layer_types": ["conv", "full_attention", "conv"],
            },
            llm_kwargs=NATIVE_ROPE,
            routing={"scoring": "sigmoid", "correction_bias": True, "correction_bias_used": True},
        ),
        Family(
            "exaone_moe",
            "exaone_moe",
            "ExaoneMoeForCausalLM",
            {
                "num_experts": 16,
                "num_experts_per_tok": 4,
                "num_shared_experts": 1,
                "moe_intermediate_size": 64,
                "first_k_dense_replace": 1,
                "sliding_window": 128,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                "mlp_layer_types": ["dense", "sparse", "sparse"],
                "routed_scaling_factor": 2.5,
            },
        ),
        Family(
            "cohere2_moe",
            "cohere2_moe",
            "Cohere2MoeForCausalLM",
            {
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "intermediate_size": 64,
                "sliding_window": 128,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                "mlp_layer_types": ["sparse", "sparse", "sparse"],
            },
        ),
        Family(
            "phimoe",
            "phimoe",
            "PhiMoEForCausalLM",
            # vLLM's PhiMoE needs the attention and lm_head biases (else every weight is NaN).
            {
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
                "intermediate_size": 64,
                "attention_bias": True,
                "lm_head_bias": True,
                # vLLM's sparsemixer hard-codes jitter_eps 0.01, transformers reads this key.
                "router_jitter_noise": 0.01,
            },
        ),
        Family(
            "llama4",
            "llama4_text",
            "Llama4ForCausalLM",
            {
                "num_local_experts": 8,
                "num_experts_per_tok": 1,
                "intermediate_size": 64,
                "intermediate_size_mlp": 256,
                "moe_layers": [0, 1, 2],
                "interleave_moe_layer_step": 1,
                "no_rope_layers": [1, 1, 0],
                "layer_types": ["chunked_attention", "chunked_attention", "full_attention"],
                "attention_chunk_size": 8192,
            },
            routing={
                "scoring": None,
                "custom_routing_function": "Llama4MoE.custom_routing_function",
            },
        ),
        Family(
            "gemma4",
            "gemma4_text",
            "Gemma4ForCausalLM",
            {
                "enable_moe_block": True,
                "num_experts": 8,
                "top_k_experts": 2,
                "moe_intermediate_size": 64,
                "hidden_size_per_layer_input": 0,
                "vocab_size_per_layer_input": 0,
                "sliding_window": 128,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                "per_layer_config": {},
            },
            routing={"scoring": None, "custom_routing_function": "Gemma4Router.routing_function"},
        ),
        Family(
            "granitemoehybrid",
            "granitemoehybrid",
            "GraniteMoeHybridForCausalLM",
            {
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
                "intermediate_size": 64,
                "shared_intermediate_size": 128,
                "layer_types": ["mamba", "attention", "mamba"],
                "mamba_n_heads": 8,
                "mamba_d_head": 32,
                "mamba_d_state": 16,
                "mamba_n_groups": 1,
                "mamba_expand": 2,
                "mamba_chunk_size": 64,
            },
        ),
        Family(
            "minimax_m2",
            "minimax_m2",
            "MiniMaxM2ForCausalLM",
            {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64},
            vllm_config={"rotary_dim": 32, "scoring_func": "sigmoid", "use_routing_bias": True},
            skip=(
                "vLLM's CPU router asserts scoring_func == 'softmax' for sigmoid routing "
                "without groups (fails with logging off too)"
            ),
            skip_signature='assert self.scoring_func == "softmax"',
        ),
        Family(
            "flex_olmo",
            "flex_olmo",
            "FlexOlmoForCausalLM",
            {
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "intermediate_size": 64,
                "norm_topk_prob": False,
            },
            model_impl="transformers",
        ),
    ]
}


def _cache_root() -> Path:
    from moeprof.tiny import cache_dir

    return cache_dir() / f"archs-v{ARCHS_VERSION}"


def checkpoint(name: str) -> Path:
    """The family's tiny checkpoint folder, built on first use and reused after."""
    family = FAMILIES[name]
    target = _cache_root() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(family, tmp)
        with contextlib.suppress(OSError):  # another process built it first
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def hf_config(family: Family, vocab_size: int, eos_id: int) -> Any:
    from transformers import AutoConfig

    kw = _BASE | family.config
    return AutoConfig.for_model(
        family.model_type,
        **kw,
        vocab_size=vocab_size,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        architectures=[family.architecture],
        dtype="float32",
    )


def build(family: Family, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from moeprof.tiny import _build_tokenizer

    eos_id, vocab_size = _build_tokenizer(out)
    config = hf_config(family, vocab_size, eos_id)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit(model, config)
    model.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    saved["architectures"] = [family.architecture]  # transformers writes its class name
    saved.update(family.vllm_config)
    (out / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos_id, "bos_token_id": eos_id}) + "\n"
    )


def _num_experts(config: Any) -> int:
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"no expert count in {type(config).__name__}")


def _reinit(model: Any, config: Any) -> None:
    """Weights of unit-scale activations (see the module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    n_exp = _num_experts(config)
    hidden = config.hidden_size
    scales = torch.logspace(-1, 1, n_exp, base=2.0)[torch.randperm(n_exp, generator=gen)]
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if "correction_bias" in name or "expert_bias" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif p.dim() == 1 or not p.is_floating_point() or name.endswith("inv_freq"):
                continue  # norms stay ones, biases zeros
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
                if p.dim() == 2 and tuple(p.shape) == (n_exp, hidden) and "expert" not in name:
                    p.mul_(scales[:, None])  # a router


# ---------------------------------------------------------------------------------------------
# The driver: several families through vLLM in one process.


def _run_family(name: str, arm: str, out_dir: Path) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from moeprof.engine_run import _output_records

    family = FAMILIES[name]
    path = checkpoint(name)
    t0 = time.perf_counter()
    _inspect_in_process(family.architecture)
    llm = LLM(
        model=str(path),
        seed=SEED,
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        enable_prefix_caching=False,
        model_impl=family.model_impl,
        distributed_executor_backend="uni",
        **copy.deepcopy(family.llm_kwargs),  # vLLM appends to lists it is given
    )
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, seed=SEED, ignore_eos=True)
    recorders: list[Any] = []
    if arm == "logged":
        llm.apply_model(lambda model: recorders.append(_router_recorder(model, family)))
    try:
        results = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    outputs = _output_records(results, 0)
    seconds = time.perf_counter() - t0
    if arm == "logged":
        Path(os.environ["VLLM_LOG_MOE"]).rename(out_dir / f"{name}.jsonl")
        for recorder in recorders:
            recorder.remove()
            if recorder.gates:
                recorder.save(out_dir / f"{name}.router_inputs.npz")
    return {"outputs": outputs, "seconds": seconds}


def _router_recorder(model: Any, family: Family) -> Any:
    """Hooks recording the hidden states entering each MoE layer's router (see
    ``router_inputs``); the engine runs in this process, eager, so they fire."""
    sys.path.insert(0, str(Path(__file__).parent))
    import router_inputs

    kw = _BASE | family.config
    n_exp = next(
        kw[k]
        for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
        if isinstance(kw.get(k), int)
    )
    return router_inputs.Recorder(model, n_exp)


def _inspect_in_process(architecture: str) -> None:
    """Fill vLLM's model-info cache for ``architecture`` in this process.

    vLLM inspects a model class it has not cached in a fresh Python process (to keep CUDA out
    of the parent), 10-25 s on two cores per family; on the CPU build there is no CUDA to keep
    out, so the driver does the same inspection here. Any failure leaves it to vLLM.
    """
    try:
        from vllm.model_executor.models.registry import ModelRegistry, _ModelInfo

        lazy = ModelRegistry.models[architecture]
        if not lazy.module_name.startswith("vllm.model_executor.models."):
            return
        import importlib.util

        spec = importlib.util.find_spec(lazy.module_name)
        if spec is None or spec.origin is None:
            return
        module_hash = lazy._get_modelinfo_module_hash(Path(spec.origin))
        if lazy._load_modelinfo_from_cache(module_hash) is None:
            info = _ModelInfo.from_model_cls(lazy.load_model_cls())
            lazy._save_modelinfo_to_cache(info, module_hash)
    except Exception:
        return


def run(arm: str, out_dir: Path, names: list[str]) -> dict[str, Any]:
    """Each family's engine in turn, in this process; a family that fails does not stop the
    others (its entry holds ``error``)."""
    import gc

    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if arm == "logged":
        os.environ["VLLM_LOG_MOE"] = str((out_dir / "current.jsonl").absolute())
        os.environ["VLLM_MOE_LAYER"] = "all"
        os.environ["VLLM_LOG_MOE_OVERWRITE"] = "1"
    else:
        for key in ("VLLM_LOG_MOE", "VLLM_MOE_LAYER", "VLLM_LOG_MOE_OVERWRITE"):
            os.environ.pop(key, None)
    results: dict[str, Any] = {}
    for name in names:
        checkpoint(name)  # built outside the timed part
        try:
            results[name] = _run_family(name, arm, out_dir)
        except Exception as e:
            results[name] = {
                "error": f"{type(e).__name__}: {e}".splitlines()[0][:500],
                "traceback": traceback.format_exc()[-4000:],
            }
        finally:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
            gc.collect()
    (out_dir / f"{arm}.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "run":
        run(sys.argv[2], Path(sys.argv[3]), sys.argv[4:])
    elif len(sys.argv) >= 2 and sys.argv[1] == "build":
        for n in sys.argv[2:] or list(FAMILIES):
            print(n, checkpoint(n))
    else:
        sys.exit("usage: archs.py run {baseline,logged} OUT_DIR FAMILY... | build [FAMILY...]")
