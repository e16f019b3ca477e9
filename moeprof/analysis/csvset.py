"""``moeprof export --csv DIR``: a log's routing as CSV files for spreadsheets, in one pass.

Files (vocabulary of :mod:`moeprof.analysis.load_balance`: a *token* is one route, its *load*
on an expert is 1 when the expert is among its top-k):

``expert_load.csv``  ``layer,phase,expert,count,share``
    Per layer, per phase (``all``, then ``prefill``/``decode`` where the log records phases;
    ``unknown`` for routes without one) and per expert: ``count`` tokens selected the expert,
    ``share`` = count / all selections of that layer and phase (the normalized distribution).
``coselection.csv``  ``layer,expert_a,expert_b,count,share,lift``
    Per layer, every pair a < b selected together at least once: ``count`` tokens selected
    both, ``share`` = count / tokens, ``lift`` as :func:`~moeprof.analysis.coselection.
    coselection_lift` defines it (empty where undefined).
``step_load.csv``    ``step,layer,tokens,max_load,mean_load,max_over_mean,cv,active_experts``
    Per engine step (forward pass) and layer with routes there (needs the ``step`` field;
    a header only without it): ``max_load`` the busiest expert's load, ``mean_load`` = k *
    tokens / E, ``max_over_mean`` their ratio (1 is perfectly even; the step's straggler factor
    under one-expert-per-device placement), ``cv`` the population std / mean of the E loads,
    ``active_experts`` experts with a load. Same definitions as :func:`~moeprof.analysis.
    load_balance.load_ratios` and :func:`~moeprof.analysis.load_balance.coefficient_of_variation`.
    E is the meta's ``num_experts`` (or ``--num-experts``); for a log that gives neither, the
    largest id seen so far + 1 when the step is written.
``summary.json``     the meta and closing records, the route count, per layer the numbers of
    ``moeprof analyze`` (:class:`~moeprof.analysis.summary.ExpertStats`), and per layer the mean
    and worst ``max_over_mean`` over steps.

Memory is flat in the log's length: the per-layer sums are E x E at most, and per-step loads are
held only until a step :data:`LAG` numbers later has been seen (rows of a step seen after that
are counted in ``summary.json`` as ``late_routes`` and left out of ``step_load.csv``).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from moeprof.analysis.accumulate import LayerPhaseAccumulators, RoutingAccumulator
from moeprof.analysis.coselection import coselection_lift
from moeprof.analysis.summary import summarize
from moeprof.api import Progress, RouteSource, open_source
from moeprof.errors import UserError
from moeprof.outfiles import refuse_existing, replacing
from moeprof.schema import NO_PHASE, NO_STEP, PHASES

FILES = ("expert_load.csv", "coselection.csv", "step_load.csv", "summary.json")
LAG = 4
"""A step is complete once a step this many numbers later has been seen."""
CELL_CAP = 1 << 22
"""(steps x layers x experts) counters made at once for one batch."""
PHASE_NAMES = {NO_PHASE: "unknown", **dict(enumerate(PHASES))}


def write_csv_set(
    log: Path,
    out_dir: Path,
    *,
    force: bool = False,
    num_experts: int | None = None,
    on_progress: Progress | None = None,
) -> list[Path]:
    """Write :data:`FILES` for ``log`` (JSONL or Parquet) into ``out_dir``; returns their paths."""
    paths = [out_dir / name for name in FILES]
    for p in paths:
        refuse_existing(p, force)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: not a directory")
    source = open_source(log)
    experts = source.meta.get("num_experts") or num_experts
    layers = [int(x) for x in source.meta["layers_logged"]]
    sums = LayerPhaseAccumulators(experts)
    with replacing(paths[2], force=force) as tmp, open(tmp, "w", newline="") as fh:
        steps = StepLoads(layers, source.top_k, experts, fh)
        routes = _read(source, layers, sums, steps, on_progress)
        steps.finish()
    experts = experts or max(sums.widest(), steps.num_experts)
    per_layer = {
        layer: {p: acc.resized(experts) for p, acc in sums.by_phase(slot).items()}
        for slot, layer in enumerate(layers)
    }
    _write_expert_load(paths[0], per_layer, experts, force)
    _write_coselection(paths[1], per_layer, force)
    summary = _summary(source, routes, experts, per_layer, steps)
    with replacing(paths[3], force=force) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return paths


def _read(
    source: RouteSource,
    layers: list[int],
    sums: LayerPhaseAccumulators,
    steps: StepLoads,
    on_progress: Progress | None,
) -> int:
    """Fold every route of ``source`` into ``sums`` and ``steps``; the number of routes."""
    order = np.argsort(layers)
    sorted_layers = np.asarray(layers, np.int64)[order]
    phase_code = {name: i for i, name in enumerate(PHASES)}
    done = 0
    for batch in source.batches():
        n = batch.num_rows
        if n == 0:
            continue
        k = source.top_k
        ids = batch.column("topk_ids").flatten().to_numpy().reshape(n, k).astype(np.int64)
        weights = batch.column("topk_weights").flatten().to_numpy().reshape(n, k)
        layer = batch.column("layer").to_numpy(zero_copy_only=False).astype(np.int64)
        slot = order[np.searchsorted(sorted_layers, layer)]
        phase_col = batch.column("phase")
        names = phase_col.dictionary.to_pylist()
        codes = np.array([phase_code.get(x, NO_PHASE) for x in names] or [NO_PHASE], np.int8)
        idx = phase_col.indices.fill_null(-1).to_numpy(zero_copy_only=False)
        phase = np.where(idx < 0, NO_PHASE, codes[np.maximum(idx, 0)]).astype(np.int8)
        step = batch.column("step").fill_null(NO_STEP).to_numpy(zero_copy_only=False)
        sums.add(slot, phase, ids, weights)
        steps.add(step.astype(np.int64), slot, ids)
        done += n
        if on_progress is not None:
            total = source.total
            on_progress(done, None if total is None else max(total, done))
    if on_progress is not None:
        on_progress(done, done)
    return done


@dataclass
class StepLoads:
    """Per (step, layer) expert loads, written to ``out`` as CSV rows once each step is
    complete (see the module doc)."""

    layers: list[int]
    top_k: int
    num_experts: int | None
    out: IO[str]
    late_routes: int = 0
    steps_written: int = 0
    _pending: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    _done_upto: int = -1
    """Every step <= this has been written."""
    _seen_max: int = -1
    _max_over_mean_sum: np.ndarray | None = None
    _max_over_mean_worst: np.ndarray | None = None
    _steps_per_layer: np.ndarray | None = None

    def __post_init__(self) -> None:
        self._writer = csv.writer(self.out, lineterminator="\n")
        self._writer.writerow(
            [
                "step",
                "layer",
                "tokens",
                "max_load",
                "mean_load",
                "max_over_mean",
                "cv",
                "active_experts",
            ]
        )
        n = len(self.layers)
        self._max_over_mean_sum = np.zeros(n)
        self._max_over_mean_worst = np.zeros(n)
        self._steps_per_layer = np.zeros(n, np.int64)
        if self.num_experts is None:
            self.num_experts = 0

    def add(self, step: np.ndarray, slot: np.ndarray, ids: np.ndarray) -> None:
        keep = step > self._done_upto
        late = int(np.count_nonzero(step[step != NO_STEP] <= self._done_upto))
        self.late_routes += late
        if not keep.all():
            step, slot, ids = step[keep], slot[keep], ids[keep]
        if not step.size:
            return
        widest = int(ids.max()) + 1
        if widest > (self.num_experts or 0):
            self._grow(widest)
        e, nl = int(self.num_experts or 0), len(self.layers)
        steps, inverse = np.unique(step, return_inverse=True)
        inverse = inverse.reshape(-1)
        per_group = max(1, CELL_CAP // (nl * e))
        for g0 in range(0, steps.size, per_group):
            g1 = min(g0 + per_group, steps.size)
            rows = (inverse >= g0) & (inverse < g1) if steps.size > per_group else slice(None)
            local = inverse[rows] - g0
            s = g1 - g0
            cell = (local * nl + slot[rows])[:, None] * e + ids[rows]
            loads = np.bincount(cell.ravel(), minlength=s * nl * e).reshape(s, nl, e)
            tokens = np.bincount(local * nl + slot[rows], minlength=s * nl).reshape(s, nl)
            for i, number in enumerate(steps[g0:g1].tolist()):
                held = self._pending.get(number)
                if held is None:
                    self._pending[number] = (loads[i].copy(), tokens[i].copy())
                else:
                    held[0][...] += loads[i]
                    held[1][...] += tokens[i]
        self._seen_max = max(self._seen_max, int(steps[-1]))
        self._flush(self._seen_max - LAG)

    def _grow(self, experts: int) -> None:
        old = int(self.num_experts or 0)
        for number, (loads, tokens) in list(self._pending.items()):
            grown = np.zeros((loads.shape[0], experts), np.int64)
            grown[:, :old] = loads
            self._pending[number] = (grown, tokens)
        self.num_experts = experts

    def _flush(self, upto: int) -> None:
        ready = sorted(s for s in self._pending if s <= upto)
        if ready:
            loads = np.stack([self._pending[s][0] for s in ready]).astype(np.float64)
            tokens = np.stack([self._pending[s][1] for s in ready])
            for s in ready:
                del self._pending[s]
            self._write(ready, loads, tokens)
        self._done_upto = max(self._done_upto, upto)

    def _write(self, steps: list[int], loads: np.ndarray, tokens: np.ndarray) -> None:
        mean = loads.mean(axis=2)
        peak = loads.max(axis=2)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = peak / mean
            cv = loads.std(axis=2) / mean
        active = np.count_nonzero(loads, axis=2)
        present = tokens > 0
        assert self._steps_per_layer is not None
        assert self._max_over_mean_sum is not None and self._max_over_mean_worst is not None
        self._steps_per_layer += present.sum(axis=0)
        self._max_over_mean_sum += np.where(present, ratio, 0.0).sum(axis=0)
        self._max_over_mean_worst = np.maximum(
            self._max_over_mean_worst, np.where(present, ratio, 0.0).max(axis=0)
        )
        rows = []
        for i, number in enumerate(steps):
            for j, layer in enumerate(self.layers):
                if not present[i, j]:
                    continue
                rows.append(
                    (
                        number,
                        layer,
                        int(tokens[i, j]),
                        int(peak[i, j]),
                        _num(mean[i, j]),
                        _num(ratio[i, j]),
                        _num(cv[i, j]),
                        int(active[i, j]),
                    )
                )
        self._writer.writerows(rows)
        self.steps_written += len(steps)

    def finish(self) -> None:
        self._flush(math.inf)  # type: ignore[arg-type]

    def summary(self) -> dict[str, Any]:
        assert self._steps_per_layer is not None and self._max_over_mean_sum is not None
        assert self._max_over_mean_worst is not None
        per_layer = []
        for j, layer in enumerate(self.layers):
            n = int(self._steps_per_layer[j])
            per_layer.append(
                {
                    "layer": layer,
                    "steps": n,
                    "mean_max_over_mean": float(self._max_over_mean_sum[j] / n) if n else None,
                    "worst_max_over_mean": float(self._max_over_mean_worst[j]) if n else None,
                }
            )
        return {"steps": self.steps_written, "late_routes": self.late_routes, "layers": per_layer}


def _num(x: float) -> str:
    """A float for CSV: shortest repr, empty where undefined."""
    return repr(float(x)) if math.isfinite(x) else ""


def _write_expert_load(
    path: Path, per_layer: dict[int, dict[int, Any]], experts: int, force: bool
) -> None:
    from moeprof.analysis.load_balance import distribution

    with replacing(path, force=force) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["layer", "phase", "expert", "count", "share"])
        for layer, parts in per_layer.items():
            total = _all_phases(parts, experts)
            streams = [("all", total)]
            if any(p != NO_PHASE for p in parts):
                streams += [(PHASE_NAMES[p], parts[p]) for p in sorted(parts)]
            for name, acc in streams:
                share = distribution(acc.counts)
                w.writerows(
                    (layer, name, e, int(c), repr(float(s)))
                    for e, (c, s) in enumerate(zip(acc.counts, share, strict=True))
                )


def _write_coselection(path: Path, per_layer: dict[int, dict[int, Any]], force: bool) -> None:
    with replacing(path, force=force) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["layer", "expert_a", "expert_b", "count", "share", "lift"])
        for layer, parts in per_layer.items():
            total = _all_phases(parts, None)
            pairs = total.coselection()
            if pairs is None or not total.tokens:
                continue
            lift = coselection_lift(pairs, total.counts, total.tokens)
            a, b = np.nonzero(np.triu(pairs, k=1))
            w.writerows(
                (
                    layer,
                    int(i),
                    int(j),
                    int(pairs[i, j]),
                    repr(float(pairs[i, j]) / total.tokens),
                    _num(lift[i, j]),
                )
                for i, j in zip(a.tolist(), b.tolist(), strict=True)
            )


def _all_phases(parts: dict[int, RoutingAccumulator], experts: int | None) -> RoutingAccumulator:
    """One layer's routing over all its phases: the sum of its accumulators by phase code."""
    total = RoutingAccumulator(experts)
    for acc in parts.values():
        total.merge(acc)
    return total


def _summary(
    source: RouteSource,
    routes: int,
    experts: int,
    per_layer: dict[int, dict[int, Any]],
    steps: StepLoads,
) -> dict[str, Any]:
    from moeprof.analysis.analyze import _jsonable

    layers = []
    for layer, parts in per_layer.items():
        stats = _jsonable(summarize(_all_phases(parts, experts), top=5))
        layers.append({"layer": layer, **stats})
    return {
        "log": str(source.path),
        "format": source.kind,
        "meta": source.meta,
        "end": source.end,
        "complete": source.end is not None,
        "routes": routes,
        "num_experts": experts,
        "top_k": source.top_k,
        "layers": layers,
        "step_load": steps.summary(),
        "files": list(FILES),
    }
