"""The embedded tiny MoE model: a small Qwen2MoE checkpoint built locally, no download.

It has the reference model's architecture (Qwen2MoeForCausalLM: routed experts, top-4,
``norm_topk_prob=false``, one always-on shared expert) at a size that runs on two CPU cores.
Weights come from a fixed seed; the router's rows get different scales so routing is skewed
the way trained routers are, instead of uniform. Built once into a cache folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = 1
SEED = 1234

CONFIG = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 256,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 4,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
    "torch_dtype": "float32",
    "use_cache": True,
}
VOCAB_SIZE = 1024
"""The most merges the tokenizer may learn; the corpus yields fewer, the model uses that."""
EOS = "<|endoftext|>"

# Text the tokenizer learns its merges from: grade-school word problems in our own words.
_CORPUS = """\
A farmer has 12 cows and buys 7 more. Each cow gives 3 liters of milk a day. How many liters \
of milk does the farmer get in a week? Tom reads 20 pages every day. His book has 340 pages. \
How many days does he need to finish it? A shop sells pencils at $2 each and notebooks at $5 \
each. Sara buys 4 pencils and 3 notebooks. How much does she pay in dollars? A train travels \
60 miles per hour for 3 hours and then 45 miles per hour for 2 hours. What is the total \
distance? Maria baked 48 cookies and gave a quarter of them to her friends. She ate 5 herself. \
How many cookies are left? There are 25 students in a class. Each student needs 3 books and \
every book costs $12. What is the total cost for the class? John earns $15 per hour and works \
8 hours a day, 5 days a week. How much does he earn in 4 weeks? A garden is 10 meters long and \
6 meters wide. What is its area, and how much fence is needed to go around it? Half of the \
apples in a basket are red, one third are green and the rest are yellow. If there are 36 \
apples, how many are yellow? The price of a jacket was $80 and it is now 25 percent off. What \
is the new price? Let's think step by step. First we find the total, then we subtract. The \
answer is the number of items left after the sale. She makes twice as many as her brother, \
who makes half as many as their mother. Every morning, every evening, each week, per month.
"""


def cache_dir() -> Path:
    root = os.environ.get("MOEPROF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moeprof"
    )
    return Path(root)


def tiny_model_path() -> Path:
    """The tiny model's folder, built on first use (seconds) and reused after."""
    target = cache_dir() / f"tiny-qwen2moe-v{TINY_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build_tiny_model(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_model(out: Path) -> None:
    eos_id, vocab_size = _build_tokenizer(out)
    config = dict(CONFIG, vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos_id, "bos_token_id": eos_id}) + "\n"
    )
    _build_weights(out, config)


def _build_tokenizer(out: Path) -> tuple[int, int]:
    """A byte-level BPE learnt from ``_CORPUS``: returns (eos id, vocabulary size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.split(". "), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": EOS,
                "pad_token": EOS,
                "model_max_length": CONFIG["max_position_embeddings"],
            }
        )
        + "\n"
    )
    eos_id = tok.token_to_id(EOS)
    assert eos_id is not None
    return eos_id, tok.get_vocab_size()


def _build_weights(out: Path, config: dict) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(SEED)
    h = config["hidden_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = h // heads
    n_exp, moe_i = config["num_experts"], config["moe_intermediate_size"]
    shared_i, vocab = config["shared_expert_intermediate_size"], config["vocab_size"]

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    # Router rows scaled from 0.5x to 2x: some experts win far more often, as in trained models.
    expert_scale = torch.logspace(-1, 1, n_exp, base=2.0)[torch.randperm(n_exp, generator=gen)]
    w: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": normal(vocab, h, std=1.0),
        "model.norm.weight": torch.ones(h),
        "lm_head.weight": normal(vocab, h, std=h**-0.5),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = torch.ones(h)
        w[f"{p}.post_attention_layernorm.weight"] = torch.ones(h)
        for name, rows in (("q", heads * head_dim), ("k", kv * head_dim), ("v", kv * head_dim)):
            w[f"{p}.self_attn.{name}_proj.weight"] = normal(rows, h, std=h**-0.5)
            w[f"{p}.self_attn.{name}_proj.bias"] = torch.zeros(rows)
        w[f"{p}.self_attn.o_proj.weight"] = normal(h, h, std=h**-0.5)
        gate = normal(n_exp, h, std=h**-0.5) * expert_scale[:, None]
        w[f"{p}.mlp.gate.weight"] = gate
        for e in range(n_exp):
            q = f"{p}.mlp.experts.{e}"
            w[f"{q}.gate_proj.weight"] = normal(moe_i, h, std=h**-0.5)
            w[f"{q}.up_proj.weight"] = normal(moe_i, h, std=h**-0.5)
            w[f"{q}.down_proj.weight"] = normal(h, moe_i, std=moe_i**-0.5)
        w[f"{p}.mlp.shared_expert.gate_proj.weight"] = normal(shared_i, h, std=h**-0.5)
        w[f"{p}.mlp.shared_expert.up_proj.weight"] = normal(shared_i, h, std=h**-0.5)
        w[f"{p}.mlp.shared_expert.down_proj.weight"] = normal(h, shared_i, std=shared_i**-0.5)
        w[f"{p}.mlp.shared_expert_gate.weight"] = normal(1, h, std=h**-0.5)
    save_file(
        {k: v.contiguous() for k, v in w.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
