"""``moeprof validate``: is this log a faithful record of the real tokens, and nothing else?

The schema judges one line at a time; this module adds what only the whole file shows:
truncation, repeated (req_id, token_idx, layer) keys, holes in token positions, layers that saw
different token counts, and, given the run's outputs file, exact per-request accounting
(prompt + generated - 1 routes per request and layer: the last sampled token is never fed back).

With prefix caching the cached prompt prefix skips the router: a request whose outputs record
has ``num_cached_tokens`` must have exactly positions ``num_cached_tokens .. prompt + generated
- 2`` at every logged layer. An outputs file without that field (older ``generate`` runs) next
to a log that says prefix caching was on gets a looser check: positions must reach the last
fed token, and the cached prefix is inferred from the first logged position.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeprof import schema
from moeprof.analysis.outputs import load_outputs
from moeprof.analysis.positions import PositionSet
from moeprof.analysis.reader import Issue, LogBase, LogError
from moeprof.analysis.sources import open_logs

RouteLog = LogBase  # every form of log (JSON Lines, Parquet, several ranks) reads alike here

NOT_CLOSED = "not closed cleanly: the engine was killed or is still running"


@dataclass(frozen=True)
class RequestRoutes:
    req_id: str
    routes: list[int]
    """Distinct token positions logged per layer, in ``layers_logged`` order."""
    first_token: int
    last_token: int


@dataclass(frozen=True)
class CountSummary:
    """Routes per request (at each request's most-logged layer)."""

    requests: int
    min: int
    median: float
    mean: float
    max: int


@dataclass(frozen=True)
class OutputsCheck:
    path: str
    requests: int
    matched: int
    missing_from_log: int
    extra_in_log: int
    mismatched: int
    """(request, layer) pairs whose routes differ from the expected count or positions."""
    expected_routes: int
    """Sum over requests and layers of prompt - cached + generated - 1."""
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache, summed over requests (recorded or inferred)."""
    cached_inferred: int = 0
    """Requests whose cached prefix is inferred from the log's first position, not recorded in
    the outputs (prefix caching on, outputs without ``num_cached_tokens``): for them
    ``expected_routes`` counts what the log shows from there on."""


@dataclass
class ValidationReport:
    path: str
    valid: bool = True
    meta: dict[str, Any] | None = None
    form: str = "jsonl"
    """``jsonl``, ``parquet`` or ``several`` (the files of a run's data-parallel ranks)."""
    files: list[str] = field(default_factory=list)
    """The files read, for ``several``."""
    lines: int = 0
    """Lines read (Parquet: rows)."""
    routes: int = 0
    routes_by_layer: dict[int, int] = field(default_factory=dict)
    duplicates: int = 0
    """Route records repeating an earlier (req_id, token_idx, layer) key."""
    gaps: int = 0
    """(request, layer) pairs whose token positions have holes."""
    summary: CountSummary | None = None
    per_request: list[RequestRoutes] = field(default_factory=list)
    outputs: OutputsCheck | None = None
    error_count: int = 0
    warning_count: int = 0
    errors: list[Issue] = field(default_factory=list)
    """The first ``max_errors`` errors, in file order for line-level ones."""
    warnings: list[Issue] = field(default_factory=list)
    complete: bool | None = None
    """Whether the log was closed cleanly with nothing lost (see :func:`_check_complete`);
    None when that cannot be told: a log of another tool, which has no closing record."""
    completeness: str = ""
    """``complete`` in words, as ``validate`` prints it."""
    end: dict[str, Any] | None = None
    """The closing record (summed over the files of several ranks), when there is one."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("errors", "warnings"):  # where an issue is: only what locates it
            out[key] = [
                {k: v for k, v in i.items() if v is not None or k == "line"} for i in out[key]
            ]
        return out


class _Collector:
    """Counts every issue, keeps the first ``limit`` of each severity."""

    def __init__(self, report: ValidationReport, limit: int) -> None:
        self.report = report
        self.limit = limit

    def __call__(self, issue: Issue) -> None:
        r = self.report
        if issue.severity == "error":
            r.error_count += 1
            if len(r.errors) < self.limit:
                r.errors.append(issue)
        else:
            r.warning_count += 1
            if len(r.warnings) < self.limit:
                r.warnings.append(issue)

    def keeps(self, severity: str) -> bool:
        """Whether the next issue of ``severity`` would be kept (else only counted)."""
        kept = self.report.errors if severity == "error" else self.report.warnings
        return len(kept) < self.limit

    def count_only(self, severity: str, n: int = 1) -> None:
        if severity == "error":
            self.report.error_count += n
        else:
            self.report.warning_count += n


def validate_logs(
    paths: list[str | Path],
    *,
    outputs: str | Path | None = None,
    max_errors: int = 20,
    require_complete: bool = False,
) -> list[ValidationReport]:
    """Check every log ``paths`` name (files, Parquet directories, globs; a run's
    data-parallel ranks as one log: :mod:`moeprof.analysis.sources`), one report each."""
    out_records = load_outputs(outputs) if outputs is not None else None
    return [
        _validate(log, out_records, outputs, max_errors, require_complete)
        for log in open_logs(paths, require_meta=False)
    ]


def validate_log(
    path: str | Path | LogBase,
    *,
    outputs: str | Path | None = None,
    max_errors: int = 20,
    require_complete: bool = False,
) -> ValidationReport:
    """Check a log completely. Raises :class:`LogError` (a UserError) only when the log or the
    outputs file cannot be read at all; everything wrong inside the log goes into the report.

    ``require_complete``: a log the hook did not close cleanly is an error, not a warning
    (see :func:`_check_complete`)."""
    if isinstance(path, LogBase):
        log = path
    else:
        logs = open_logs([path], require_meta=False)
        if len(logs) != 1:
            raise LogError(f"{path}: names {len(logs)} logs; check them with validate_logs")
        log = logs[0]
    out_records = load_outputs(outputs) if outputs is not None else None
    return _validate(log, out_records, outputs, max_errors, require_complete)


def _validate(
    log: LogBase,
    out_records: dict[str, schema.OutputRecord] | None,
    outputs: str | Path | None,
    max_errors: int,
    require_complete: bool,
) -> ValidationReport:
    report = ValidationReport(path=str(log.path), form=log.form)
    if log.form == "several":
        report.files = [str(m.path) for m in log.members]
    sink = _Collector(report, max_errors)
    if log.meta_issue is not None:
        sink(log.meta_issue)
    if log.meta is None:
        for _ in log.chunks(sink):  # without a meta only line-level checks are possible
            pass
        report.lines = log.lines_read
        report.valid = report.error_count == 0
        return report

    report.meta = log.meta.model_dump(mode="json")
    layers = log.layers
    positions = PositionSet()
    by_layer = np.zeros(len(layers), np.int64)
    for chunk in log.chunks(sink):
        report.routes += len(chunk)
        by_layer += np.bincount(log.layer_slot(chunk.layer), minlength=len(layers))
        groups = log.groups(chunk)
        dup = positions.add(groups, chunk.token_idx)
        if dup.any():
            report.duplicates += int(dup.sum())
            for row in np.flatnonzero(dup):
                if not sink.keeps("error"):
                    sink.count_only("error")
                    continue
                req = log.req_ids[int(chunk.req[row])]
                sink(
                    log.issue(
                        int(chunk.line[row]),
                        f"duplicate route: req_id {req!r} token_idx {int(chunk.token_idx[row])} "
                        f"layer {int(chunk.layer[row])} was already logged",
                    )
                )
    report.lines = log.lines_read
    report.routes_by_layer = {lay: int(c) for lay, c in zip(layers, by_layer, strict=True)}
    if report.routes == 0 and report.error_count == 0:
        sink(Issue(None, "the log has a meta record but no routes", "warning"))
    _check_complete(log, report, sink, require_complete)

    counts = _per_group(positions, len(log.req_ids), len(layers))
    _check_positions(log, positions, report, sink)
    _check_layers_agree(log, counts, sink)
    report.per_request = _per_request(log, positions, counts)
    report.summary = _summary(counts)
    if out_records is not None:
        report.outputs = _check_outputs(log, positions, counts, out_records, Path(outputs), sink)
    report.valid = report.error_count == 0
    return report


def _check_complete(
    log: LogBase, report: ValidationReport, sink: _Collector, require_complete: bool
) -> None:
    """Whether the log says it is complete: closed cleanly by the hook (a closing record,
    :class:`~moeprof.schema.EndRecord`), logging not stopped early (``stopped``: an error with
    the reason and the routes dropped), and holding exactly the routes the record counts (an
    error otherwise). For several ranks' files, each file on its own.

    A log without a closing record is warned about ("not closed cleanly: the engine was killed
    or is still running"; an error with ``require_complete``) only when its meta says moeprof
    wrote it (``moeprof_version``): other tools do not close their logs, so their logs are
    never failed or warned for it (``complete`` None: cannot tell), even with
    ``require_complete``."""
    several = log.form == "several"
    complete: bool | None = True
    cut: list[str] = []
    for m in log.members:
        where = str(m.path) if several else None
        end = m.end
        if end is None:
            if m.moeprof_written:
                severity = "error" if require_complete else "warning"
                sink(Issue(None, NOT_CLOSED, severity, file=where))  # type: ignore[arg-type]
                complete = False
                cut.append(str(m.path))
            elif complete:
                complete = None
            continue
        if end.stopped or end.dropped:
            why = f"logging stopped early: {end.stopped}" if end.stopped else "routes were dropped"
            sink(Issue(None, f"{why} ({end.dropped:,} routes dropped)", file=where))
            complete = False
        if end.routes != m.routes_read:
            sink(
                Issue(
                    None,
                    f"the closing record counts {end.routes:,} routes written, but the log holds "
                    f"{m.routes_read:,}",
                    file=where,
                )
            )
            complete = False
    total = log.end
    report.end = total.model_dump(mode="json") if total is not None else None
    report.complete = complete
    if complete:
        assert total is not None
        report.completeness = f"complete (closed cleanly: {total.routes:,} routes)"
    elif complete is None:
        report.completeness = "completeness unknown: no closing record (not written by moeprof)"
    elif cut:
        files = f" ({', '.join(cut)})" if several else ""
        report.completeness = NOT_CLOSED + files
    else:
        report.completeness = "incomplete: see the errors above"


def _per_group(positions: PositionSet, requests: int, layers: int) -> np.ndarray:
    """(requests, layers) distinct positions seen."""
    counts = np.zeros(requests * layers, np.int64)
    counts[: positions.groups] = positions.count
    return counts.reshape(requests, layers)


def _check_positions(
    log: RouteLog, positions: PositionSet, report: ValidationReport, sink: _Collector
) -> None:
    """Positions per (request, layer) must be 0..n-1; with prefix caching the cached prompt
    prefix is legitimately absent, and when the log does not say, a hole is only a warning."""
    caching = log.meta.prefix_caching if log.meta else None
    seen = np.flatnonzero(positions.count > 0)
    lo, hi, cnt = positions.lo[seen], positions.hi[seen], positions.count[seen]
    start = lo if caching else np.zeros_like(lo)
    holes = (hi - start + 1) - cnt
    bad = np.flatnonzero(holes > 0)
    report.gaps = int(bad.size)
    severity = "warning" if caching is None else "error"
    for i in bad:
        if not sink.keeps(severity):
            sink.count_only(severity)
            continue
        g = int(seen[i])
        req, layer = log.group_name(g)
        first = positions.first_missing(g) if lo[i] == 0 or caching else 0
        sink(
            Issue(
                None,
                f"req_id {req!r} layer {layer}: {int(holes[i])} of token positions "
                f"{int(start[i])}..{int(hi[i])} missing (first: {first})"
                + (
                    ""
                    if caching is not None
                    else "; meta does not say whether prefix caching was on"
                ),
                severity,
            )
        )


def _check_layers_agree(log: RouteLog, counts: np.ndarray, sink: _Collector) -> None:
    """Every logged layer sees every token, so a request's counts must agree across layers."""
    if counts.shape[1] < 2:
        return
    uneven = np.flatnonzero(counts.min(axis=1) != counts.max(axis=1))
    for r in uneven:
        per = ", ".join(f"{lay}: {int(c)}" for lay, c in zip(log.layers, counts[r], strict=True))
        sink(Issue(None, f"req_id {log.req_ids[r]!r} has different route counts per layer ({per})"))


def _per_request(log: RouteLog, positions: PositionSet, counts: np.ndarray) -> list[RequestRoutes]:
    n_layers = counts.shape[1]
    lo = np.full(counts.size, -1, np.int64)
    hi = np.full(counts.size, -1, np.int64)
    has = positions.count > 0
    lo[: positions.groups][has] = positions.lo[has]
    hi[: positions.groups][has] = positions.hi[has]
    lo = lo.reshape(-1, n_layers)
    hi = hi.reshape(-1, n_layers)
    # Whole arrays, then plain lists: per-request numpy calls cost microseconds each, and a
    # 10M-route log has tens of thousands of requests.
    big = np.iinfo(np.int64).max
    first = np.where(lo >= 0, lo, big).min(axis=1, initial=big)
    last = hi.max(axis=1, initial=-1)  # absent layers hold -1
    names = log.req_ids
    routes, firsts, lasts = counts.tolist(), first.tolist(), last.tolist()
    return [
        RequestRoutes(req_id=names[r], routes=routes[r], first_token=firsts[r], last_token=lasts[r])
        for r in np.flatnonzero(counts.sum(axis=1) > 0).tolist()
    ]


def _summary(counts: np.ndarray) -> CountSummary | None:
    per = counts.max(axis=1) if counts.size else counts.reshape(-1)
    per = per[per > 0]
    if per.size == 0:
        return None
    return CountSummary(
        requests=int(per.size),
        min=int(per.min()),
        median=float(np.median(per)),
        mean=float(per.mean()),
        max=int(per.max()),
    )


def _check_outputs(
    log: RouteLog,
    positions: PositionSet,
    counts: np.ndarray,
    outputs: dict[str, schema.OutputRecord],
    path: Path,
    sink: _Collector,
) -> OutputsCheck:
    """Exact accounting: every request of the run is in the log with exactly the routes it fed
    the model, and the log has no requests the run did not make."""
    caching = bool(log.meta and log.meta.prefix_caching)
    code = {req: r for r, req in enumerate(log.req_ids) if counts[r].sum() > 0}
    layers = log.layers
    missing = [req for req in outputs if req not in code]
    extra = [req for req in code if req not in outputs]
    mismatched = expected_total = cached_total = inferred = 0
    for req, rec in outputs.items():
        r = code.get(req)
        if r is None:
            expected_total += rec.expected_routes * len(layers)
            cached_total += rec.first_routed
            continue
        spans = [_span(positions, counts, r * len(layers) + slot) for slot in range(len(layers))]
        if rec.num_cached_tokens is None and caching:
            inferred += 1
            start = min((lo for got, lo, _ in spans if got), default=0)
            cached_total += start
        else:
            cached_total += rec.first_routed
        for layer, (got, lo, top) in zip(layers, spans, strict=True):
            expected, problem = _judge(rec, caching, got, lo, top)
            expected_total += expected
            if problem is not None:
                mismatched += 1
                sink(Issue(None, f"req_id {req!r} layer {layer}: {problem}"))
    hint = ""
    if missing and extra and all("-" in e for e in extra):
        hint = " (log ids look like engine-internal ids with a suffix; join on the user-facing id)"
    for req in missing:
        sink(Issue(None, f"req_id {req!r} is in {path.name} but has no routes in the log{hint}"))
    for req in extra:
        sink(Issue(None, f"req_id {req!r} has routes in the log but is not in {path.name}{hint}"))
    return OutputsCheck(
        path=str(path),
        requests=len(outputs),
        matched=len(outputs) - len(missing),
        missing_from_log=len(missing),
        extra_in_log=len(extra),
        mismatched=mismatched,
        expected_routes=expected_total,
        cached_tokens=cached_total,
        cached_inferred=inferred,
    )


def _span(positions: PositionSet, counts: np.ndarray, group: int) -> tuple[int, int, int]:
    """(distinct positions, first position, one past the last) of a (request, layer) group;
    (0, 0, 0) when it has none."""
    got = int(counts.reshape(-1)[group])
    if not got or group >= positions.groups:
        return 0, 0, 0
    return got, int(positions.lo[group]), int(positions.hi[group]) + 1


def _judge(
    rec: schema.OutputRecord, caching: bool, got: int, lo: int, top: int
) -> tuple[int, str | None]:
    """What one (request, layer) should have logged, and what is wrong with it (None: right).

    ``got`` distinct positions from ``lo`` to ``top - 1``; the request fed positions
    ``start .. end - 1``, where ``start`` is the cached prefix (recorded in the outputs, or
    with caching on and nothing recorded, taken from the log).
    """
    end = rec.prompt_tokens + max(rec.generated_tokens - 1, 0)
    fed = f"prompt {rec.prompt_tokens} + generated {rec.generated_tokens} - 1"
    if rec.num_cached_tokens is not None:
        start = rec.num_cached_tokens
        expected = max(end - start, 0)
        if start:
            fed = (
                f"prompt {rec.prompt_tokens} - cached {start} + "
                f"generated {rec.generated_tokens} - 1"
            )
        in_place = got == 0 or (lo == start and top == end)
        if got == expected and in_place:
            return expected, None
        where = f" at positions {lo}..{top - 1}" if got else ""
        want = f" at positions {start}..{end - 1}" if start else ""
        return expected, f"{got} routes{where}, expected {expected}{want} ({fed})"
    if caching:  # prefix caching on, cached prefix not recorded: the positions must reach the end
        expected = end - lo if got else end
        if got <= end and top == end:
            return expected, None
        return expected, (
            f"positions up to {top - 1}, {got} routes, expected positions up to {end - 1} "
            f"({fed}; cached prefix not recorded in the outputs)"
        )
    if got == end:
        return end, None
    return end, f"{got} routes, expected {end} ({fed})"


def report_json(report: ValidationReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


__all__ = [
    "CountSummary",
    "LogError",
    "OutputsCheck",
    "RequestRoutes",
    "ValidationReport",
    "load_outputs",
    "report_json",
    "validate_log",
    "validate_logs",
]
