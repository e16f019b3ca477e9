"""Which request and position each captured row belongs to: pure numpy, no vLLM, no torch.

A step's rows are the scheduled tokens of its requests laid end to end in batch order;
``query_start_loc`` marks where each request's slice starts and ``num_computed`` is how many of
its tokens earlier steps already ran, so row ``r`` of request ``j`` is token
``num_computed[j] + r - query_start_loc[j]`` of that request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepBatch:
    """A real step's batch, copied off the model runner before it changes."""

    req_ids: list[str]
    query_start_loc: np.ndarray
    num_computed: np.ndarray
    num_tokens: int


@dataclass(frozen=True)
class StepRows:
    req_index: np.ndarray
    """Index into ``StepBatch.req_ids`` for each kept row."""
    token_idx: np.ndarray
    rows: np.ndarray
    """Which captured rows to keep, in order."""


def map_rows(batch: StepBatch, logged_upto: np.ndarray) -> StepRows:
    """Rows of a step with their request and token position, dropping recomputed tokens.

    ``logged_upto[j]`` is the first position of request ``j`` not yet logged: rows before it
    are tokens that a preempted request recomputes, already logged the first time round.
    """
    num_reqs = len(batch.req_ids)
    qsl = np.asarray(batch.query_start_loc[: num_reqs + 1], dtype=np.int64)
    counts = np.diff(qsl)
    if num_reqs and (qsl[0] != 0 or counts.min() < 0 or qsl[-1] != batch.num_tokens):
        raise ValueError(
            f"batch layout does not add up: query_start_loc={qsl.tolist()}, "
            f"num_tokens={batch.num_tokens}"
        )
    req_index = np.repeat(np.arange(num_reqs), counts)
    rows = np.arange(batch.num_tokens)
    token_idx = np.asarray(batch.num_computed[:num_reqs], dtype=np.int64)[req_index] + (
        rows - qsl[:-1][req_index]
    )
    keep = token_idx >= np.asarray(logged_upto, dtype=np.int64)[req_index]
    if keep.all():
        return StepRows(req_index, token_idx, rows)
    return StepRows(req_index[keep], token_idx[keep], rows[keep])
