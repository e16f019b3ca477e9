"""The routing Hugging Face transformers computes for a checkpoint: the independent reference
the architecture matrix compares moeprof's logs with.

transformers 5 MoE blocks call ``self.experts(hidden_states, top_k_index, top_k_weights)``; a
forward pre-hook on each block's ``experts`` module sees exactly the experts and weights HF
uses, per decoder layer, in one forward pass over a whole sequence (teacher forcing: the prompt
ids followed by the generated ids but the last, the tokens vLLM routed).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def load_model(path: Path, *, zero_correction_bias: bool = False) -> Any:
    """The checkpoint in transformers, float32, eval mode. ``zero_correction_bias``: with every
    ``e_score_correction_bias`` zeroed, i.e. routed the way vLLM's CPU router routes a model
    whose bias it ignores (softmax routing without groups, Ernie-4.5)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if zero_correction_bias:
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if name.endswith("e_score_correction_bias"):
                    t.zero_()
    return model


def experts_modules(model: Any) -> dict[int, Any]:
    """Decoder layer -> its MoE block's ``experts`` module."""
    found: dict[int, Any] = {}
    for name, module in model.named_modules():
        if not name.endswith(".experts"):
            continue
        m = _LAYER.search(name + ".")
        if m:
            found[int(m.group(1))] = module
    return found


def routes(model: Any, token_ids: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Layer -> (ids, weights), each ``(len(token_ids), top_k)``, as HF routes the sequence.

    Weights given to the experts as a dense ``(tokens, num_experts)`` tensor (gpt-oss) are
    gathered at the ids.
    """
    import torch

    return capture(model, lambda: model(torch.tensor([token_ids])))


def capture(model: Any, forward: Any) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Layer -> (ids, weights) the ``experts`` modules of ``model`` (any module whose
    ``named_modules`` name decoder layers) receive while ``forward()`` runs."""
    import torch

    captured: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    handles = []
    for layer, module in experts_modules(model).items():

        def hook(_mod: Any, args: tuple, kwargs: dict, layer: int = layer) -> None:
            if len(args) + len(kwargs) < 3:
                return  # experts of pre-weighted inputs (Llama-4): see _llama4_hook
            ids, weights = _routing_args(args, kwargs)
            ids = ids.reshape(-1, ids.shape[-1])
            weights = weights.reshape(ids.shape[0], -1)
            if weights.shape[1] != ids.shape[1]:  # dense scores over all experts
                weights = torch.gather(weights, 1, ids.long())
            captured[layer] = (ids.long().numpy().copy(), weights.float().numpy().copy())

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    for name, module in model.named_modules():
        m = _LAYER.search(name + ".")
        if m and type(module).__name__ == "Llama4Router":
            handles.append(module.register_forward_hook(_llama4_hook(captured, int(m.group(1)))))
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    return captured


def _llama4_hook(captured: dict, layer: int) -> Any:
    """Llama-4 hands its experts pre-weighted inputs, not ids: its router's logits give the
    top-k ids, and the weights are the sigmoid of the top-k logits."""
    import torch

    def hook(module: Any, _args: tuple, output: tuple) -> None:
        logits = output[1].float()
        values, ids = torch.topk(logits, module.top_k, dim=-1)
        captured[layer] = (ids.long().numpy().copy(), torch.sigmoid(values).numpy().copy())

    return hook


def _routing_args(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    values = list(args[1:3])
    for key in ("top_k_index", "router_indices", "routing_indices"):
        if key in kwargs:
            values = [kwargs[key], kwargs.get("top_k_weights", kwargs.get("routing_weights"))]
    if len(values) != 2:
        raise ValueError(f"experts called with {len(args)} positional args, kwargs {list(kwargs)}")
    return values[0], values[1]


def logged_routes(path: Path) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Request -> layer -> (ids, weights) in token order, from a JSONL log."""
    import json

    rows: dict[str, dict[int, list[tuple[int, list[int], list[float]]]]] = {}
    with open(path) as fh:
        for line in fh:
            r = json.loads(line)
            if r.get("type") != "route":
                continue
            rows.setdefault(r["req_id"], {}).setdefault(r["layer"], []).append(
                (r["token_idx"], r["topk_ids"], r["topk_weights"])
            )
    result: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for req, layers in rows.items():
        result[req] = {}
        for layer, items in layers.items():
            items.sort(key=lambda t: t[0])
            result[req][layer] = (
                np.array([t[1] for t in items], np.int64),
                np.array([t[2] for t in items], np.float64),
            )
    return result


class Agreement(dict):
    """``pairs`` (token, layer) compared, ``ids_equal`` of them with the same top-k set,
    ``max_rel_err`` of the weights over those (after ``weight_scale``)."""


def compare(
    logged: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]],
    reference: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]],
    weight_scale: float = 1.0,
    first_tokens: int | None = None,
) -> Agreement:
    """How far a log agrees with the reference routing of the same tokens.

    Top-k *sets* are compared (the order of equal-set ids is the implementation's); where they
    are equal, each expert's weight is compared with the reference weight times
    ``weight_scale``: relative error ``|w - s*w_ref| / max(|s*w_ref|, 1e-6)``. With
    ``first_tokens``, only each request's first tokens are compared.
    """
    pairs = equal = 0
    max_rel = 0.0
    for req, layers in reference.items():
        for layer, (ref_ids, ref_w) in layers.items():
            ids, w = logged[req][layer]
            n = ref_ids.shape[0]
            if ids.shape[0] != n:
                raise ValueError(f"request {req} layer {layer}: {ids.shape[0]} routes vs {n}")
            for t in range(n if first_tokens is None else min(n, first_tokens)):
                pairs += 1
                a, b = np.argsort(ids[t]), np.argsort(ref_ids[t])
                if not np.array_equal(ids[t][a], ref_ids[t][b]):
                    continue
                equal += 1
                expected = ref_w[t][b] * weight_scale
                rel = np.abs(w[t][a] - expected) / np.maximum(np.abs(expected), 1e-6)
                max_rel = max(max_rel, float(rel.max()))
    return Agreement(pairs=pairs, ids_equal=equal, max_rel_err=max_rel)
