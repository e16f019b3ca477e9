"""Builders for small moeprof logs in tests: the hook's key order (``moeprof.layout.FIELDS``)
and compact separators unless a test wants otherwise. Lines in the hook's exact byte layout are
built with ``moeprof.layout.route_template`` and ``format_routes`` (:func:`hook_line`,
:func:`hook_lines`).

Like the hook, :func:`hook_line`, :func:`hook_lines`, :func:`sequential_routes` and
:func:`skewed_routes` write each route's engine ``step`` unless told not to (``step=None`` /
``steps=False``: a log as written before the hook logged steps); :func:`route` writes one only
when given."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from typer.testing import CliRunner

from moeprof import layout
from moeprof.cli import app
from moeprof.layout import FIELDS
from moeprof.schema import PHASES

PREFILL, DECODE = PHASES

META: dict[str, Any] = {
    "type": "meta",
    "model_id": "test/tiny-moe",
    "vllm_version": "0.32.0",
    "torch_version": "2.13.0",
    "device": "cpu",
    "seed": 1234,
    "layers_logged": [12],
    "top_k": 4,
    "num_experts": 60,
    "schema_version": 1,
    "prefix_caching": False,
}


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def meta(**overrides: Any) -> dict[str, Any]:
    """The default meta with fields replaced; a value of None removes the field."""
    out = {**META, **overrides}
    return {k: v for k, v in out.items() if v is not None}


def route(
    req_id: str = "0",
    token_idx: int = 0,
    layer: int = 12,
    ids: Sequence[int] = (0, 1, 2, 3),
    weights: Sequence[float] = (0.4, 0.3, 0.2, 0.1),
    phase: str | None = None,
    step: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One route record in the hook's key order; ``phase`` and ``step`` only when given."""
    values: dict[str, Any] = {
        "type": "route",
        "req_id": req_id,
        "token_idx": token_idx,
        "layer": layer,
        "topk_ids": list(ids),
        "topk_weights": list(weights),
        "phase": phase,
        "step": step,
    }
    rec = {f: values[f] for f in FIELDS if f not in ("phase", "step") or values[f] is not None}
    rec.update(extra)
    return rec


def hook_line(
    req: str,
    t: int,
    layer: int,
    ids: Sequence[int],
    weights: Sequence[float],
    phase: str | None = None,
    step: int | None = 0,
) -> str:
    """A route line exactly as the hook writes it (its template and formatter), without the
    newline: with a step (as the hook now writes), without one when ``step`` is None (older
    logs), and without a phase when ``phase`` is None."""
    return hook_lines(
        [req], [t], [layer], [ids], [weights], [phase], None if step is None else [step]
    )[0]


def hook_lines(
    reqs: Sequence[str],
    token_idx: Sequence[int],
    layers: Sequence[int],
    ids: Sequence[Sequence[int]],
    weights: Sequence[Sequence[float]],
    phases: Sequence[str | None],
    steps: Sequence[int | None] | None,
) -> list[str]:
    """Route lines exactly as the hook writes them, one per row of the columns, without
    newlines. Rows whose phase (step) is None, or all rows when ``steps`` is None, leave the
    field out, as older writers did. Each line comes from the hook's own template (the layer a
    per-row column) and formatter."""
    n = len(reqs)
    steps_ = [None] * n if steps is None else list(steps)
    out = []
    for i in range(n):
        omit = tuple(f for f, v in (("phase", phases[i]), ("step", steps_[i])) if v is None)
        text = layout.format_routes(
            layout.route_template(None, len(ids[i]), omit=omit),
            [json.dumps(reqs[i])],
            np.array([token_idx[i]]),
            np.array([ids[i]], np.int64),
            np.array([weights[i]], np.float64),
            None if phases[i] is None else np.array([phases[i] == PREFILL]),
            layer=np.array([layers[i]]),
            step=None if steps_[i] is None else np.array([steps_[i]]),
        )
        out.append(text.removesuffix("\n"))
    return out


def write_log(
    path: Path,
    routes: Iterable[dict[str, Any] | str],
    header: dict[str, Any] | str | None = None,
    *,
    trailing_newline: bool = True,
) -> Path:
    """Write a log: ``header`` (default meta; a str is written verbatim) then the routes (dicts
    are dumped compactly, strings written verbatim as lines)."""
    head = META if header is None else header
    lines = [head if isinstance(head, str) else dumps(head)]
    lines += [r if isinstance(r, str) else dumps(r) for r in routes]
    text = "\n".join(lines) + ("\n" if trailing_newline else "")
    path.write_text(text)
    return path


def sequential_routes(
    requests: dict[str, int],
    layers: Sequence[int] = (12,),
    k: int = 4,
    experts: int = 60,
    *,
    steps: bool = True,
) -> list[dict[str, Any]]:
    """Valid routes: request r gets positions 0..n-1 at every layer, ids rotating. Each token
    is one engine step (its layers share it), numbered in file order; ``steps=False`` leaves
    the step out."""
    out = []
    step = 0
    for req, n in requests.items():
        for t in range(n):
            for layer in layers:
                ids = [
                    (t + j * 7 + int(req) if req.isdigit() else t + j * 7) % experts
                    for j in range(k)
                ]
                w = [round(0.5 / (j + 1), 4) for j in range(k)]
                out.append(route(req, t, layer, ids, w, step=step if steps else None))
            step += 1
    return out


def skewed_routes(
    n_requests: int = 12,
    prompt: int = 60,
    generated: int = 40,
    experts: int = 60,
    k: int = 4,
    seed: int = 0,
    layers: Sequence[int] = (12,),
    *,
    steps: bool = True,
) -> list[dict[str, Any]]:
    """A realistic-shaped log body: each request's prompt prefilled (phase PREFILL) in a step
    of its own, then decode steps with one token per request (DECODE); experts drawn from a
    skewed fixed distribution, prefill and decode slightly different. ``steps=False`` leaves
    the engine step out."""
    rng = np.random.default_rng(seed)
    base = np.log(rng.dirichlet(np.full(experts, 0.8)))
    shift = rng.normal(0, 0.4, experts)

    def pick(phase: str) -> tuple[list[int], list[float]]:
        logp = base + (shift if phase == DECODE else 0)
        scores = logp + rng.gumbel(size=experts)
        ids = np.argsort(-scores)[:k]
        w = np.sort(rng.dirichlet(np.ones(k)) * 0.8)[::-1]
        return [int(i) for i in ids], [float(np.float32(x)) for x in w]

    out = []
    for r in range(n_requests):
        for t in range(prompt):
            for layer in layers:
                ids, w = pick(PREFILL)
                out.append(route(str(r), t, layer, ids, w, PREFILL, r if steps else None))
    for step in range(generated - 1):
        for r in range(n_requests):
            for layer in layers:
                ids, w = pick(DECODE)
                engine_step = n_requests + step if steps else None
                out.append(route(str(r), prompt + step, layer, ids, w, DECODE, engine_step))
    return out


def outputs_file(path: Path, records: Iterable[tuple[str, int, int]]) -> Path:
    """An outputs JSONL: (req_id, prompt_tokens, generated_tokens) per request."""
    lines = [
        dumps({"req_id": r, "prompt_tokens": p, "generated_tokens": g, "finish_reason": "length"})
        for r, p, g in records
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args: str) -> tuple[int, str]:
    """Run ``moeprof ARGS`` in-process: (exit code, output), asserting no traceback escaped."""
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.exit_code, result.output
