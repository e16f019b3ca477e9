"""The log against the router's own input: an exactness check that does not depend on vLLM
computing the same hidden states as Hugging Face transformers.

In the logged vLLM run (in-process engine, eager), forward pre-hooks record, per forward step,
the model's ``input_ids`` and ``positions`` and, per MoE layer, the hidden states entering the
block's router (the ``gate``/``router`` linear module). The test then routes those very hidden
states with transformers' MoE block of the same checkpoint (its ``experts`` pre-hook gives the
top-k HF uses, as in ``hf_routing``) and requires the log to hold exactly those routes: a route
per recorded row, keyed by (layer, position in the request, token id), ids equal on every row
and weights equal to ``rel_tol`` relative (after the scaling the meta describes).

Rows are joined to log records by content (position and token id, from the outputs), not with
moeprof's own row-to-request mapping, so the check is independent of the hook.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_GATE_NAMES = ("gate", "router")


def gate_modules(model: Any, num_experts: int) -> dict[int, Any]:
    """Decoder layer -> vLLM's router module: ``*.gate``/``*.router``, a linear layer with
    ``num_experts`` outputs or a module whose class is a ``...Router`` (Gemma-4)."""
    found: dict[int, Any] = {}
    for name, module in model.named_modules():
        m = _LAYER.search(name + ".")
        if not m or name.rsplit(".", 1)[-1] not in _GATE_NAMES:
            continue
        weight = getattr(module, "weight", None)
        rows = getattr(module, "output_size", None)  # the CPU build may repack the weight
        if rows is None and weight is not None and weight.dim() == 2:
            rows = weight.shape[0]
        if rows != num_experts and not type(module).__name__.endswith("Router"):
            continue
        layer = int(m.group(1))
        if layer in found:
            raise ValueError(f"two router modules in layer {layer}")
        found[layer] = module
    return found


class Recorder:
    """Forward pre-hooks on a vLLM model (in this process) recording router inputs per step."""

    def __init__(self, model: Any, num_experts: int) -> None:
        self.steps: list[tuple[np.ndarray, np.ndarray]] = []
        self.rows: dict[int, list[tuple[int, np.ndarray]]] = {}
        self.gates = gate_modules(model, num_experts)
        self._handles = [model.register_forward_pre_hook(self._on_model, with_kwargs=True)]
        for layer, gate in self.gates.items():
            self._handles.append(gate.register_forward_pre_hook(self._on_gate(layer)))

    def _on_model(self, _mod: Any, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if input_ids is None or positions is None:
            raise ValueError("model called without input_ids/positions")
        self.steps.append(
            (input_ids.detach().cpu().numpy().copy(), positions.detach().cpu().numpy().copy())
        )

    def _on_gate(self, layer: int) -> Any:
        def hook(_mod: Any, args: tuple) -> None:
            hidden = args[0].detach().float().cpu().numpy().copy()
            self.rows.setdefault(layer, []).append((len(self.steps) - 1, hidden))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def save(self, path: Path) -> None:
        """``path`` (.npz): per layer ``hidden_<L>``, ``positions_<L>``, ``input_ids_<L>``,
        one row per token the router saw."""
        arrays: dict[str, np.ndarray] = {}
        for layer, calls in self.rows.items():
            hidden, pos, ids = [], [], []
            for step, h in calls:
                step_ids, step_pos = self.steps[step]
                if h.shape[0] != step_ids.shape[0]:
                    raise ValueError(
                        f"layer {layer}: {h.shape[0]} rows, {step_ids.shape[0]} tokens"
                    )
                hidden.append(h)
                pos.append(step_pos)
                ids.append(step_ids)
            arrays[f"hidden_{layer}"] = np.concatenate(hidden)
            arrays[f"positions_{layer}"] = np.concatenate(pos)
            arrays[f"input_ids_{layer}"] = np.concatenate(ids)
        np.savez(path, **arrays)


def load(path: Path) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Layer -> (hidden, positions, input_ids) as ``Recorder.save`` wrote them."""
    with np.load(path) as data:
        layers = sorted(int(k.split("_")[1]) for k in data.files if k.startswith("hidden_"))
        return {
            layer: (data[f"hidden_{layer}"], data[f"positions_{layer}"], data[f"input_ids_{layer}"])
            for layer in layers
        }


def hf_routes_of_inputs(
    model: Any, inputs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Layer -> (ids, weights) that transformers computes for the recorded hidden states, one
    row per recorded row: the MoE block of that layer (the module holding its ``experts``) run
    on them, its ``experts`` pre-hook giving the top-k (``hf_routing.capture``). Where the
    experts sit in the decoder layer itself (Gemma-4: the layer feeds the router and the experts
    different tensors), the layer's ``router`` run on them, which returns
    ``(scores, top_k_weights, top_k_index)``."""
    import hf_routing
    import torch

    parents: dict[int, tuple[str, Any]] = {}
    modules = dict(model.named_modules())
    for name in modules:
        m = _LAYER.search(name + ".")
        if m and name.endswith(".experts"):
            parent = name.rsplit(".", 1)[0]
            parents[int(m.group(1))] = (parent, modules[parent])
    result: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    with torch.no_grad():
        for layer, (hidden, _pos, _ids) in inputs.items():
            name, parent = parents[layer]
            x = torch.from_numpy(hidden)
            if _LAYER.search(name + ".") and name.endswith(f"layers.{layer}"):
                _scores, weights, ids = parent.router(x)
                result[layer] = (ids.long().numpy().copy(), weights.float().numpy().copy())
                continue
            routed = hf_routing.capture(
                _Named(name, parent), lambda block=parent, x=x: block(x[None])
            )
            result[layer] = routed[layer]
    return result


class _Named:
    """One module seen by ``hf_routing.capture`` under its full name in the model."""

    def __init__(self, name: str, module: Any) -> None:
        self.name, self.module = name, module

    def named_modules(self) -> Any:
        for sub, module in self.module.named_modules():
            yield (f"{self.name}.{sub}" if sub else self.name), module


def compare_with_log(
    logged: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]],
    outputs: list[dict[str, Any]],
    inputs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
    recomputed: dict[int, tuple[np.ndarray, np.ndarray]],
    weight_scale: float = 1.0,
    rel_tol: float = 1e-5,
) -> dict[str, Any]:
    """Match every recorded row with a logged route of the same (layer, position, token id).

    Returns ``rows`` (recorded), ``logged`` (routes in the log), ``matched`` (rows whose ids
    equal a not yet matched logged route of their key and whose weights are within
    ``rel_tol``), ``ids_equal`` (rows whose id set equals one of their key's logged routes)
    and ``max_rel_err`` over the id-equal rows.
    """
    pool: dict[tuple[int, int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    n_logged = 0
    tokens = {o["req_id"]: o["prompt_token_ids"] + o["output_token_ids"] for o in outputs}
    for req, layers in logged.items():
        seq = tokens[req]
        for layer, (ids, w) in layers.items():
            for t in range(ids.shape[0]):
                order = np.argsort(ids[t])
                pool.setdefault((layer, t, seq[t]), []).append((ids[t][order], w[t][order]))
                n_logged += 1
    rows = matched = ids_equal = 0
    max_rel = 0.0
    for layer, (_hidden, positions, input_ids) in inputs.items():
        ref_ids, ref_w = recomputed[layer]
        for r in range(positions.shape[0]):
            rows += 1
            order = np.argsort(ref_ids[r])
            ids, w = ref_ids[r][order], ref_w[r][order] * weight_scale
            candidates = pool.get((layer, int(positions[r]), int(input_ids[r])), [])
            best = None
            for i, (lids, lw) in enumerate(candidates):
                if np.array_equal(lids, ids):
                    rel = float(np.max(np.abs(lw - w) / np.maximum(np.abs(w), 1e-6)))
                    if best is None or rel < best[1]:
                        best = (i, rel)
            if best is None:
                continue
            ids_equal += 1
            max_rel = max(max_rel, best[1])
            if best[1] <= rel_tol:
                matched += 1
                candidates.pop(best[0])
    return {
        "rows": rows,
        "logged": n_logged,
        "matched": matched,
        "ids_equal": ids_equal,
        "max_rel_err": max_rel,
    }
