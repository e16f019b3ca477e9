"""Which request and position each captured row belongs to: plain Python and numpy, no vLLM.

A step's rows are the scheduled tokens of its requests laid end to end in batch order;
``query_start_loc`` marks where each request's slice starts and ``num_computed`` is how many of
its tokens earlier steps already ran, so row ``r`` of request ``j`` is token
``num_computed[j] + r - query_start_loc[j]`` of that request.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import NamedTuple

import numpy as np


class StepBatch(NamedTuple):
    """A real step's batch, copied off the model runner before it changes (a tuple because
    the model's thread builds one every step)."""

    req_ids: list[str]
    query_start_loc: list[int]
    num_computed: list[int]
    num_tokens: int


class StepRows(NamedTuple):
    """The rows of several steps to log, in log order, laid out for one vectorised format."""

    rows: np.ndarray
    """Where each row sits in the host buffer the steps' ``base`` offsets point into."""
    token_idx: np.ndarray
    prefill: np.ndarray
    """True for prompt tokens, False for generated ones (and for unknown prompt lengths)."""
    step: np.ndarray
    """The number of the engine step each row was routed in."""
    seg_req: list[str]
    """Request id of each run of rows that belong to one request in one step ..."""
    seg_len: np.ndarray
    """... and how many rows that run has."""
    skipped: int
    """Rows dropped as tokens recomputed after preemption."""


class RowMapper:
    """Maps captured rows to (request, position) across steps, dropping recomputed tokens.

    The state it keeps per live request is how far the log has got (``logged_upto``: rows
    before it are tokens that a preempted request recomputes, logged the first time round) and
    the prompt length (to tell prefill from decode). Requests leave it when they finish.

    Steps are mapped in batches: the per-request bookkeeping is a short Python loop over
    (step, request) runs, and everything per row is one set of numpy calls for the whole
    batch, so the cost per step stays small on small batches.
    """

    def __init__(self) -> None:
        self.logged_upto: dict[str, int] = {}
        self.prompt_len: dict[str, int] = {}

    def map(self, steps: Iterable[StepInput]) -> StepRows:
        seg_row: list[int] = []
        seg_tok: list[int] = []
        seg_len: list[int] = []
        seg_plen: list[int] = []
        seg_req: list[str] = []
        seg_step: list[int] = []
        skipped = 0
        upto_of, prompt_len = self.logged_upto, self.prompt_len
        for batch, base, new_prompt_lens, finished, step in steps:
            for rid in finished:
                upto_of.pop(rid, None)
                prompt_len.pop(rid, None)
            prompt_len.update(new_prompt_lens)
            num_reqs = len(batch.req_ids)
            qsl = batch.query_start_loc
            computed = batch.num_computed
            if len(qsl) != num_reqs + 1 or len(computed) != num_reqs:
                raise _bad_layout(qsl, batch.num_tokens)
            if num_reqs and (qsl[0] != 0 or qsl[-1] != batch.num_tokens):
                raise _bad_layout(qsl, batch.num_tokens)
            for j, rid in enumerate(batch.req_ids):
                first, count = computed[j], qsl[j + 1] - qsl[j]
                if count <= 0:
                    if count < 0:
                        raise _bad_layout(qsl, batch.num_tokens)
                    continue
                skip = max(0, upto_of.get(rid, 0) - first)
                if skip >= count:
                    skipped += count
                    continue
                skipped += skip
                seg_row.append(base + qsl[j] + skip)
                seg_tok.append(first + skip)
                seg_len.append(count - skip)
                seg_plen.append(prompt_len.get(rid, -1))
                seg_req.append(rid)
                seg_step.append(step)
                upto_of[rid] = first + count
        lens = np.array(seg_len, dtype=np.int64)
        within = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(
            np.cumsum(lens) - lens, lens
        )
        token_idx = np.repeat(np.array(seg_tok, dtype=np.int64), lens) + within
        return StepRows(
            rows=np.repeat(np.array(seg_row, dtype=np.int64), lens) + within,
            token_idx=token_idx,
            prefill=token_idx < np.repeat(np.array(seg_plen, dtype=np.int64), lens),
            step=np.repeat(np.array(seg_step, dtype=np.int64), lens),
            seg_req=seg_req,
            seg_len=lens,
            skipped=skipped,
        )


def _bad_layout(qsl: list[int], num_tokens: int) -> ValueError:
    return ValueError(
        f"batch layout does not add up: query_start_loc={qsl}, num_tokens={num_tokens}"
    )


StepInput = tuple[StepBatch, int, Mapping[str, int], Collection[str], int]
"""One step for :meth:`RowMapper.map`: its batch, where its rows start in the host buffer,
the prompt lengths of the requests it starts, the requests that finished before it, and its
step number."""
