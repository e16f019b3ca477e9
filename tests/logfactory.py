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
import pytest
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


def end_record(routes: int, **fields: Any) -> dict[str, Any]:
    """A closing record (``schema.EndRecord``) for ``routes`` routes written."""
    return {"type": "end", "routes": routes, **fields}


def route_columns(routes: Sequence[dict[str, Any]], k: int | None = None) -> dict[str, Any]:
    """Route dicts as the arguments of ``columns.routes_batch`` (request codes in order of
    first appearance, phases as codes, steps ``NO_STEP`` where absent or None when none has
    one)."""
    from moeprof.schema import NO_PHASE, NO_STEP

    names: dict[str, int] = {}
    codes = [names.setdefault(r["req_id"], len(names)) for r in routes]
    width = k if k is not None else (len(routes[0]["topk_ids"]) if routes else 4)
    steps = [r.get("step") for r in routes]
    return {
        "req_code": np.asarray(codes, np.int64),
        "req_names": list(names),
        "token_idx": np.asarray([r["token_idx"] for r in routes], np.int64),
        "layer": np.asarray([r["layer"] for r in routes], np.int64),
        "ids": np.asarray([r["topk_ids"] for r in routes], np.int64).reshape(-1, width),
        "weights": np.asarray([r["topk_weights"] for r in routes], np.float32).reshape(-1, width),
        "phase": np.asarray(
            [NO_PHASE if r.get("phase") is None else PHASES.index(r["phase"]) for r in routes],
            np.int8,
        ),
        "step": None
        if all(s is None for s in steps)
        else np.asarray([NO_STEP if s is None else s for s in steps], np.int64),
    }


def write_parquet_log(
    path: Path,
    routes: Sequence[dict[str, Any]],
    header: dict[str, Any] | None = None,
    *,
    end: dict[str, Any] | None = None,
    parts: int = 1,
) -> Path:
    """Write a Parquet log in ``moeprof.columns``' layout: ``path`` ending in ``.parquet`` and
    ``parts`` > 1 or a directory wanted: a directory of ``part-NNNNN.parquet`` files (the routes
    split evenly, in order), else, with ``parts=0``, one file. Every part carries the meta
    (``header``, default :data:`META`); the last one the closing record ``end`` when given.
    Rows are built with ``columns.routes_batch``, as the hook's sink builds them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moeprof import columns

    head = META if header is None else header
    k = int(head.get("top_k", 4))
    pieces = max(parts, 1)
    bounds = np.linspace(0, len(routes), pieces + 1).astype(int)
    tables = []
    for i in range(pieces):
        rows = list(routes[bounds[i] : bounds[i + 1]])
        cols = route_columns(rows, k)
        batch = columns.routes_batch(**cols)
        meta = {columns.META_KEY: dumps(head).encode()}
        tables.append(pa.Table.from_batches([batch]).replace_schema_metadata(meta))

    def write(table: pa.Table, to: Path, last: bool) -> None:
        # as the hook's sink: the closing record is added to the footer's key-value metadata
        # when the last part is closed (it is not in the Arrow schema stored with the file)
        with pq.ParquetWriter(to, table.schema) as writer:
            writer.write_table(table)
            if end is not None and last:
                writer.add_key_value_metadata({columns.END_KEY: dumps(end).encode()})

    if parts == 0:
        write(tables[0], path, True)
        return path
    path.mkdir(parents=True, exist_ok=True)
    for i, table in enumerate(tables):
        write(table, path / columns.part_name(i), i == len(tables) - 1)
    return path


def foreign_parquet_table(routes: Sequence[dict[str, Any]]) -> Any:
    """``routes`` as another writer might store them in Parquet: variable-length int64 id
    lists, float64 weights, int64 layer and position, a null phase column, no step; with
    moeprof's default meta in the key-value metadata."""
    import pyarrow as pa

    from moeprof.columns import META_KEY

    return pa.table(
        {
            "req_id": [r["req_id"] for r in routes],
            "token_idx": pa.array([r["token_idx"] for r in routes], pa.int64()),
            "layer": pa.array([r["layer"] for r in routes], pa.int64()),
            "topk_ids": pa.array([r["topk_ids"] for r in routes], pa.list_(pa.int64())),
            "topk_weights": pa.array([r["topk_weights"] for r in routes], pa.list_(pa.float64())),
            "phase": [None] * len(routes),
        }
    ).replace_schema_metadata({META_KEY: json.dumps(meta()).encode()})


def read_jsonl_log(
    path: Path,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """(meta, routes, closing record or None) of a JSON Lines log written by :func:`write_log`."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    end = lines.pop() if lines and lines[-1].get("type") == "end" else None
    return lines[0], lines[1:], end


def parquet_twin(jsonl: Path, out: Path, *, parts: int = 1) -> Path:
    """The same log as Parquet (see :func:`write_parquet_log`)."""
    head, routes, end = read_jsonl_log(jsonl)
    return write_parquet_log(out, routes, head, end=end, parts=parts)


def closed_log(
    path: Path, routes: Sequence[dict[str, Any]], header: dict[str, Any] | None = None
) -> Path:
    """A JSON Lines log of ``routes`` closed cleanly (ending in its :func:`end_record`)."""
    return write_log(path, [*routes, end_record(len(routes))], header)


def twin_logs(
    directory: Path,
    routes: Sequence[dict[str, Any]],
    header: dict[str, Any] | None = None,
    *,
    parts: int = 3,
) -> tuple[Path, Path]:
    """The same closed log twice: ``directory/routes.jsonl`` (:func:`closed_log`) and
    ``directory/routes.parquet``, its :func:`parquet_twin` of ``parts`` parts."""
    jsonl = closed_log(directory / "routes.jsonl", routes, header)
    return jsonl, parquet_twin(jsonl, directory / "routes.parquet", parts=parts)


def bad_routes() -> list[dict[str, Any]]:
    """Twelve routes of two requests (at the default meta) of which five break one rule
    each, at 0-based positions 2 (a repeated id), 4 (a layer not logged), 7 (an id beyond
    num_experts), 9 (a NaN weight) and 10 (a negative token_idx)."""
    body = sequential_routes({"0": 6, "1": 6})
    body[2] = route("0", 2, ids=[5, 5, 6, 7], step=2)
    body[4] = route("0", 4, layer=13, step=4)
    body[7] = route("1", 1, ids=[1, 2, 3, 99], step=7)
    body[9] = route("1", 3, weights=[float("nan"), 0.1, 0.1, 0.1], step=9)
    body[10] = route("1", 4, step=10) | {"token_idx": -1}
    return body


def assert_close(a: Any, b: Any, where: str = "") -> None:
    """``a == b`` for nested dicts and lists (as JSON reports are), floats up to 1e-6:
    what differs between two reads of one log that add floats in another order."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-6), where
    else:
        assert a == b, where


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
