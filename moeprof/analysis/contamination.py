"""Signs that a log holds more than real tokens: warm-up/dummy batches and double logging.

Why contamination is checked on every ``analyze`` run: a log polluted by warm-up/dummy batches
produces confident, wrong numbers ("top-3 experts carry 51% of the load"). The detector costs
little, so every analysis says how many records look suspect, and ``--exclude-suspect`` re-reads
the log without them (:class:`SuspectFilter`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeprof.analysis.positions import PositionSet


@dataclass(frozen=True)
class Run:
    """Consecutive records of one layer with identical ids and weights (lines inclusive)."""

    layer: int
    first_line: int
    last_line: int
    length: int


@dataclass
class Contamination:
    """What looks like warm-up/dummy batches or double logging rather than real tokens."""

    records: int = 0
    duplicate_records: int = 0
    """Records whose (req_id, token_idx, layer) key appeared earlier: every copy after the first."""
    duplicate_keys: int = 0
    """Distinct keys that appear more than once."""
    identical_runs: int = 0
    """Runs of >= ``min_run`` consecutive records of one layer with identical ids and weights."""
    identical_run_records: int = 0
    suspect_records: int = 0
    """Records that are a repeated key or sit in such a run (counted once)."""
    longest_run: Run | None = None
    min_run: int = 64

    @property
    def suspect_share(self) -> float:
        return self.suspect_records / self.records if self.records else 0.0

    @property
    def suspicious(self) -> bool:
        return self.suspect_records > 0

    def describe(self) -> str:
        """One sentence: how many records look suspect, and why."""
        parts = []
        if self.duplicate_records:
            parts.append(f"{self.duplicate_records:,} repeat an earlier (req_id, token_idx, layer)")
        if self.identical_runs:
            longest = self.longest_run
            where = (
                f", longest {longest.length:,} at lines {longest.first_line}-{longest.last_line}"
                if longest
                else ""
            )
            parts.append(
                f"{self.identical_run_records:,} sit in {self.identical_runs} run(s) of >= "
                f"{self.min_run} identical routes{where}"
            )
        return (
            f"{self.suspect_records:,} of {self.records:,} records ({self.suspect_share:.1%}) "
            f"look like warm-up/dummy batches or double logging: {'; '.join(parts)}."
        )


class ContaminationDetector:
    """Streams over routes and finds the fingerprints of logs that are not just real tokens.

    Naive hooks log the warm-up, profiling and graph-capture passes vLLM makes with dummy batches:
    thousands of identical tokens, hence thousands of consecutive identical routes, often under
    keys that real tokens use again later. Real consecutive tokens practically never share all k
    ids AND all k float weights, so ``min_run`` identical routes in a row (per layer, in file
    order) flags a run; any repeated (req_id, token_idx, layer) key is flagged too.
    """

    def __init__(self, min_run: int = 64) -> None:
        self.min_run = min_run
        self.positions = PositionSet()
        self._repeated = PositionSet()
        """Keys seen more than once (one bit each, however many copies)."""
        self._records = 0
        self._dup_records = 0
        self._open: dict[int, _OpenRun] = {}
        self._runs: list[Run] = []
        self._run_records = 0
        self._run_count = 0
        self._overlap = 0
        self._longest: Run | None = None

    def add(
        self,
        group: np.ndarray,
        token_idx: np.ndarray,
        layer: np.ndarray,
        ids: np.ndarray,
        weights: np.ndarray,
        line: np.ndarray,
    ) -> np.ndarray:
        """Fold in one chunk (rows in file order); returns the repeated-key mask of its rows."""
        n = group.size
        self._records += n
        dup = self.positions.add(group, token_idx)
        if dup.any():
            self._dup_records += int(dup.sum())
            self._repeated.add(group[dup], token_idx[dup])
        layers = np.unique(layer)
        for lay in layers.tolist():
            rows = slice(None) if layers.size == 1 else layer == lay
            self._scan_runs(int(lay), ids[rows], weights[rows], line[rows], dup[rows])
        return dup

    def _scan_runs(
        self, layer: int, ids: np.ndarray, w: np.ndarray, line: np.ndarray, dup: np.ndarray
    ) -> None:
        n = ids.shape[0]
        if n == 0:
            return
        same = np.empty(n, bool)
        same[1:] = _rows_equal_next(ids) & _rows_equal_next(w)
        cur = self._open.get(layer)
        same[0] = (
            cur is not None
            and bool((cur.ids == ids[0]).all())
            and bool((cur.weights == w[0]).all())
        )
        starts = np.flatnonzero(~same)
        bounds = np.append(starts, n)
        dup_cum = np.concatenate([[0], np.cumsum(dup)])
        head = int(bounds[0])  # rows continuing the open run
        if cur is not None and head:
            cur.length += head
            cur.dups += int(dup_cum[head])
            cur.last_line = int(line[head - 1])
        if starts.size:
            if cur is not None:
                self._close(layer, cur)
            seg_len = np.diff(bounds)
            seg_dup = dup_cum[bounds[1:]] - dup_cum[bounds[:-1]]
            for s in np.flatnonzero(seg_len[:-1] >= self.min_run):
                a, b = int(bounds[s]), int(bounds[s + 1])
                self._record(Run(layer, int(line[a]), int(line[b - 1]), b - a), int(seg_dup[s]))
            a = int(starts[-1])
            self._open[layer] = _OpenRun(
                ids[a].copy(),
                w[a].copy(),
                int(seg_len[-1]),
                int(line[a]),
                int(line[n - 1]),
                int(seg_dup[-1]),
            )

    def _close(self, layer: int, run: _OpenRun) -> None:
        if run.length >= self.min_run:
            self._record(Run(layer, run.first_line, run.last_line, run.length), run.dups)

    def _record(self, run: Run, dups: int) -> None:
        self._run_count += 1
        self._run_records += run.length
        self._overlap += dups
        self._runs.append(run)
        if self._longest is None or run.length > self._longest.length:
            self._longest = run

    def finish(self) -> Contamination:
        """Close open runs and return the verdict; call once, after the last chunk."""
        for layer, run in self._open.items():
            self._close(layer, run)
        self._open.clear()
        dup_keys = int(self._repeated.count.sum())
        return Contamination(
            records=self._records,
            duplicate_records=self._dup_records,
            duplicate_keys=dup_keys,
            identical_runs=self._run_count,
            identical_run_records=self._run_records,
            suspect_records=self._dup_records + self._run_records - self._overlap,
            longest_run=self._longest,
            min_run=self.min_run,
        )

    @property
    def runs(self) -> list[Run]:
        return self._runs


def _rows_equal_next(a: np.ndarray) -> np.ndarray:
    """out[i] = row i+1 equals row i, bit for bit; comparing rows as 64-bit words where they
    fit is several times cheaper than an element-wise compare and reduce. (Integer rows of any
    width in whole words qualify: for them bits and values are the same thing.)"""
    width = a.shape[1] * a.itemsize
    words_ok = width in (8, 16) or (a.dtype.kind in "iu" and width % 8 == 0 and width <= 64)
    if a.flags.c_contiguous and words_ok and a.shape[0]:
        words = a.view(np.uint64)
        out = words[1:, 0] == words[:-1, 0]
        for j in range(1, width // 8):
            out &= words[1:, j] == words[:-1, j]
        return out
    return (a[1:] == a[:-1]).all(axis=1)


@dataclass
class _OpenRun:
    ids: np.ndarray
    weights: np.ndarray
    length: int
    first_line: int
    last_line: int
    dups: int


class SuspectFilter:
    """After a :class:`ContaminationDetector` pass, tells which rows of a chunk to drop, in a
    second pass over the same log: every row inside a long identical run (dummy batches), then,
    among the rest, every repeat of a key already kept (double logging keeps its first copy).
    Real tokens whose keys a dummy batch used first are therefore kept."""

    def __init__(self, detector: ContaminationDetector) -> None:
        by_layer: dict[int, list[Run]] = {}
        for run in detector.runs:
            by_layer.setdefault(run.layer, []).append(run)
        self._runs = {}
        for layer, runs in by_layer.items():
            runs.sort(key=lambda r: r.first_line)
            first = np.array([r.first_line for r in runs], np.int64)
            last = np.array([r.last_line for r in runs], np.int64)
            self._runs[layer] = (first, last)
        self._kept = PositionSet()

    def mask(
        self, group: np.ndarray, token_idx: np.ndarray, layer: np.ndarray, line: np.ndarray
    ) -> np.ndarray:
        """True for rows to drop; call once per chunk, in file order."""
        drop = np.zeros(group.size, bool)
        for lay, (first, last) in self._runs.items():
            rows = np.flatnonzero(layer == lay)
            if not rows.size:
                continue
            ln = line[rows]
            k = np.searchsorted(first, ln, side="right") - 1
            inside = (k >= 0) & (ln <= last[np.maximum(k, 0)])
            drop[rows[inside]] = True
        keep = np.flatnonzero(~drop)
        drop[keep[self._kept.add(group[keep], token_idx[keep])]] = True
        return drop
