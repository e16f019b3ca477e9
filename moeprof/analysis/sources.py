"""Which logs the paths on a command line name: globs, and a run's data-parallel ranks as one.

``validate``, ``analyze``, ``plot`` and ``compare`` take several paths, each a file, a Parquet
log directory or a glob (expanded here, so a quoted pattern works the same as one the shell
expanded; a pattern that matches nothing is an error). :func:`open_logs` then decides which of
the files are one log:

- With data parallelism the hook writes one file per rank (``routes.dp0.jsonl``,
  ``routes.dp1.jsonl``, ...: each rank serves its own requests). Files whose metas say
  ``data_parallel_size`` > 1, that agree on the run (:data:`RUN_FIELDS`: model, versions,
  layers, ``top_k``, ``num_experts``, the DP size, ...) and have different
  ``data_parallel_rank`` are read as ONE log, a :class:`MultiLog`: its routes are the ranks'
  routes one rank after the other, request codes are global, and a request id found in two
  ranks is an error (each request runs on one rank).
- Every other file stays a log of its own: ``analyze A B`` still compares two unrelated logs
  layer by layer, and ``compare A B`` joins two.

When the files of several runs with the same settings are given at once (ranks repeat among
files that agree on :data:`RUN_FIELDS`), files are grouped by directory and name (the hook's
``NAME.dpN.EXT`` naming) first; a group in which a rank still repeats is not merged.

A JSON Lines log and a Parquet log (of different runs) can be given together to ``analyze``
and ``compare``, like any two logs.
"""

from __future__ import annotations

import bisect
import glob
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moeprof import schema
from moeprof.analysis.reader import (
    DecodedSink,
    Issue,
    IssueSink,
    LoadChunk,
    LogBase,
    LogError,
    RouteChunk,
    Severity,
    _Codes,
    open_log,
)
from moeprof.errors import UserError

RUN_FIELDS = (
    "model_id",
    "vllm_version",
    "torch_version",
    "moeprof_version",
    "schema_version",
    "seed",
    "layers_logged",
    "top_k",
    "num_experts",
    "prefix_caching",
    "dtype",
    "tensor_parallel_size",
    "data_parallel_size",
    "run_id",
)
"""Meta fields the ranks of one run share (a field absent from every file is not compared)."""
_MAGIC = re.compile(r"[*?[]")
_DP_NAME = re.compile(r"^(?P<stem>.*)\.dp(?P<rank>\d+)(?P<suffix>(\.[^.]*)?)$")


# --------------------------------------------------------------------------- paths


def expand(patterns: Sequence[str | Path]) -> list[Path]:
    """The paths ``patterns`` name, in order, each once: an existing path as given, else a glob
    pattern's matches in natural order (``dp2`` before ``dp10``). Raises :class:`UserError`
    for a pattern that matches nothing."""
    out: list[Path] = []
    for pattern in patterns:
        text = str(pattern)
        if text == "-" or Path(text).exists() or not _MAGIC.search(text):
            found = [Path(text)]
        else:
            found = sorted((Path(p) for p in glob.glob(text)), key=_natural)
            if not found:
                raise UserError(f"{text}: no file matches this pattern")
        out.extend(p for p in found if p not in out)
    return out


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def open_logs(
    patterns: Sequence[str | Path | LogBase], *, require_meta: bool = True
) -> list[LogBase]:
    """The logs ``patterns`` name (see the module docstring): globs expanded, each file opened
    (:func:`~moeprof.analysis.reader.open_log`), a run's data-parallel ranks merged into one
    :class:`MultiLog`, placed where its first file was. Logs already open pass through."""
    logs: list[LogBase] = []
    for item in patterns:
        if isinstance(item, LogBase):
            logs.append(item)
        else:
            logs.extend(open_log(p, require_meta=require_meta) for p in expand([item]))
    return merge_ranks(logs)


def open_one(pattern: str | Path | LogBase | Sequence[str | Path]) -> LogBase:
    """The one log a path, a glob or a list of them names (the ranks of one run merge);
    :class:`UserError` when they are several unrelated logs."""
    if isinstance(pattern, LogBase):
        return pattern
    items = [pattern] if isinstance(pattern, (str, Path)) else list(pattern)
    logs = open_logs(items)
    if len(logs) != 1:
        names = ", ".join(str(log.path) for log in logs)
        raise UserError(
            f"{' '.join(str(p) for p in items)}: names {len(logs)} logs ({names}), not one log "
            "(only the data-parallel ranks of one run are read as one)"
        )
    return logs[0]


def as_log(item: str | Path | LogBase) -> LogBase:
    """``item`` opened (a path) or as is (an open log)."""
    return item if isinstance(item, LogBase) else open_log(item)


# --------------------------------------------------------------------------- ranks


def merge_ranks(logs: list[LogBase]) -> list[LogBase]:
    """``logs`` with each run's data-parallel ranks merged into one :class:`MultiLog`."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, log in enumerate(logs):
        key = _run_key(log)
        if key is not None:
            groups.setdefault(key, []).append(i)
    merged: dict[int, LogBase] = {}
    dropped: set[int] = set()
    for members in groups.values():
        for group in _split_by_rank(logs, members):
            if len(group) < 2:
                continue
            ordered = sorted(group, key=lambda i: _rank(logs[i]))
            merged[min(group)] = MultiLog([logs[i] for i in ordered])
            dropped.update(group)
    return [merged.get(i, log) for i, log in enumerate(logs) if i in merged or i not in dropped]


def _split_by_rank(logs: list[LogBase], members: list[int]) -> list[list[int]]:
    """Files of one run's settings as groups with distinct ranks: all of them, or else by
    directory and name (``NAME.dpN.EXT``); groups in which ranks still repeat stay apart."""
    if _distinct_ranks(logs, members):
        return [members]
    by_name: dict[tuple[str, str], list[int]] = {}
    for i in members:
        path = logs[i].path
        m = _DP_NAME.match(path.name)
        name = f"{m['stem']}{m['suffix']}" if m else path.name
        by_name.setdefault((str(path.parent), name), []).append(i)
    return [g for g in by_name.values() if _distinct_ranks(logs, g)]


def _distinct_ranks(logs: list[LogBase], group: list[int]) -> bool:
    ranks = [_rank(logs[i]) for i in group]
    return len(set(ranks)) == len(ranks)


def _extra(meta: schema.MetaRecord) -> dict[str, Any]:
    return {**meta.model_dump(), **(meta.model_extra or {})}


def _rank(log: LogBase) -> int:
    assert log.meta is not None
    return int(_extra(log.meta)["data_parallel_rank"])


def _run_key(log: LogBase) -> tuple[Any, ...] | None:
    """The run a rank's file belongs to, or None for a log that is not one rank of several."""
    if log.meta is None or isinstance(log, MultiLog):
        return None
    fields = _extra(log.meta)
    size, rank = fields.get("data_parallel_size"), fields.get("data_parallel_rank")
    if not isinstance(size, int) or size < 2 or not isinstance(rank, int):
        return None
    return tuple(repr(fields.get(f)) for f in RUN_FIELDS)


class MultiLog(LogBase):
    """The files of one run's data-parallel ranks read as one log (see the module docstring).

    ``path`` is a label for the set (``routes.dp[0-1].jsonl`` for the hook's naming), ``paths``
    the files; issues name the file and its own line numbers. :attr:`RouteChunk.line` counts on
    across the files (rank 0's lines, then rank 1's, ...), so lines keep increasing through a
    pass. ``end`` is a closing record summed over the ranks when every rank has one (``stopped``:
    the first rank's reason), else None; ``members`` are the ranks' own logs, each with its own
    ``end``.
    """

    form = "several"

    def __init__(self, members: list[LogBase]) -> None:
        if len(members) < 2:
            raise ValueError("a MultiLog needs at least two files")
        self._members = members
        self.paths = [m.path for m in members]
        self.path = _label(self.paths)
        first = members[0].meta
        assert first is not None
        fields = _extra(first)
        self.ranks = [_rank(m) for m in members]
        self.size = int(fields["data_parallel_size"])
        fields.pop("data_parallel_rank", None)
        fields["data_parallel_ranks"] = self.ranks
        self.meta = schema.MetaRecord.model_validate(fields)
        self.meta_issue = None
        self._codes = _Codes()
        self._owner: list[int] = []
        """The member each request code was first seen in."""
        self._maps: list[np.ndarray] = [np.zeros(0, np.int64) for _ in members]
        """Per member: its request codes -> global codes."""
        self._offsets: list[int] = []
        self._index_layers()

    @property
    def members(self) -> list[LogBase]:
        return list(self._members)

    @property
    def routes_read(self) -> int:
        return sum(m.routes_read for m in self._members)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self._members)

    @property
    def moeprof_written(self) -> bool:
        return all(m.moeprof_written for m in self._members)

    def issue(self, line: int | None, message: str, severity: Severity = "error") -> Issue:
        if line is None or not self._offsets:
            return Issue(line, message, severity)
        at = bisect.bisect_right(self._offsets, line - 1) - 1
        member = self._members[at]
        inner = member.issue(line - self._offsets[at], message, severity)
        return _in_file(inner, member)

    def with_num_experts(self, num_experts: int) -> MultiLog:
        return MultiLog([m.with_num_experts(num_experts) for m in self._members])

    def chunks(
        self, on_issue: IssueSink | None = None, *, on_decoded: DecodedSink | None = None
    ) -> Iterator[RouteChunk]:
        """Each rank's chunks in turn, request codes and line numbers made global; a request
        id met in a second rank is an error (once per request)."""
        sink = on_issue or self._raise_errors
        self._start_pass(sink)
        offset = 0
        for i, member in enumerate(self._members):
            self._offsets.append(offset)

            def member_sink(issue: Issue, member: LogBase = member) -> None:
                sink(_in_file(issue, member))

            def decoded(decoder: str, first: int, count: int, base: int = offset) -> None:
                if on_decoded is not None:
                    on_decoded(decoder, first + base, count)

            for chunk in member.chunks(member_sink, on_decoded=decoded):
                yield self._global(chunk, i, member, offset, sink)
            offset += member.lines_read
        self.lines_read = offset
        self.cut_mid_line = any(m.cut_mid_line for m in self._members)
        self.end = _summed_end([m.end for m in self._members])

    def load_chunks(
        self, on_issue: IssueSink | None = None, *, weights: bool = True
    ) -> Iterator[LoadChunk]:
        """Each rank's :meth:`~moeprof.analysis.reader.LogBase.load_chunks` in turn (a
        request id met in two ranks is :meth:`chunks`' check: it needs ``req_id``)."""
        sink = on_issue or self._raise_errors
        self._start_pass(sink)
        offset = 0
        for member in self._members:
            self._offsets.append(offset)

            def member_sink(issue: Issue, member: LogBase = member) -> None:
                sink(_in_file(issue, member))

            yield from member.load_chunks(member_sink, weights=weights)
            offset += member.lines_read
        self.lines_read = offset
        self.cut_mid_line = any(m.cut_mid_line for m in self._members)
        self.end = _summed_end([m.end for m in self._members])

    def _start_pass(self, sink: IssueSink) -> None:
        self._offsets = []
        self.end = None
        missing = sorted(set(range(self.size)) - set(self.ranks))
        if missing:
            shown = ", ".join(map(str, missing))
            sink(
                Issue(
                    None,
                    f"data-parallel rank{'s' if len(missing) > 1 else ''} {shown} of "
                    f"{self.size} not given: their requests are not in this log",
                    "warning",
                )
            )

    def _global(
        self, chunk: RouteChunk, i: int, member: LogBase, offset: int, sink: IssueSink
    ) -> RouteChunk:
        names = member.req_ids
        known = self._maps[i]
        if len(names) > known.size:
            fresh = []
            for name in names[known.size :]:
                if name in self._codes:
                    other = self._members[self._owner[self._codes[name]]]
                    sink(
                        _in_file(
                            Issue(
                                None,
                                f"req_id {name!r} is also in {other.path}: a request runs on "
                                "one data-parallel rank (files of different runs?)",
                            ),
                            member,
                        )
                    )
                    fresh.append(self._codes[name])
                else:
                    fresh.append(self._codes[name])
                    self._owner.append(i)
            known = self._maps[i] = np.concatenate([known, np.asarray(fresh, np.int64)])
        return RouteChunk(
            ids=chunk.ids,
            weights=chunk.weights,
            layer=chunk.layer,
            token_idx=chunk.token_idx,
            phase=chunk.phase,
            step=chunk.step,
            req=known[chunk.req],
            line=chunk.line + offset,
        )


def _in_file(issue: Issue, member: LogBase) -> Issue:
    """``issue`` of ``member`` named by the member's file (unless it names a part already)."""
    if issue.file is not None:
        return issue
    return Issue(issue.line, issue.message, issue.severity, file=str(member.path), row=issue.row)


def _summed_end(ends: list[schema.EndRecord | None]) -> schema.EndRecord | None:
    if any(e is None for e in ends):
        return None
    done = [e for e in ends if e is not None]

    def total(field: str) -> int | None:
        values = [getattr(e, field) for e in done]
        return None if any(v is None for v in values) else sum(values)

    return schema.EndRecord(
        type="end",
        routes=sum(e.routes for e in done),
        dropped=sum(e.dropped for e in done),
        stopped=next((e.stopped for e in done if e.stopped), None),
        requests=total("requests"),
        requests_unfinished=total("requests_unfinished"),
        steps=None,
    )


def _label(paths: list[Path]) -> Path:
    """A name for a set of rank files: ``dir/routes.dp[0-3].jsonl`` for the hook's naming
    (``[0,2]`` when not a range), else the names joined with ``+``."""
    matches = [_DP_NAME.match(p.name) for p in paths]
    parents = {p.parent for p in paths}
    if all(matches) and len(parents) == 1:
        stems = {(m["stem"], m["suffix"]) for m in matches if m}
        if len(stems) == 1:
            stem, suffix = stems.pop()
            ranks = sorted(int(m["rank"]) for m in matches if m)
            if ranks == list(range(ranks[0], ranks[-1] + 1)):
                span = f"{ranks[0]}-{ranks[-1]}"
            else:
                span = ",".join(map(str, ranks))
            return parents.pop() / f"{stem}.dp[{span}]{suffix}"
    return Path("+".join(str(p) for p in paths))


__all__ = ["LogError", "MultiLog", "as_log", "expand", "merge_ranks", "open_logs", "open_one"]
