"""``generate``'s outputs.jsonl: the one reader of the file and the rules it must meet.

:func:`iter_outputs` reads and checks the file one record at a time: each line an
:class:`~moeprof.schema.OutputRecord`, each req_id once, every token id within int64, at least
one record; anything else is a :class:`LogError` naming the file and line. Reading a file of
25,000 requests costs a record's worth of Python objects at a time.

:func:`load_outputs` keeps every record by req_id (what ``validate --outputs`` accounts a log
against). :func:`read_token_ids` keeps only what the token analysis joins routes with
(:class:`TokenIds`): each request's input token ids (``prompt_token_ids + output_token_ids``)
as their rank among the file's distinct ids, one int32 array for the whole file, with an
offset and a length per request. Memory: 4 bytes per token id, 16 bytes and a dict entry per
request, and the distinct ids (8 bytes each); while reading, 8 bytes per token id more.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from moeprof import schema
from moeprof.analysis.reader import LogError

LUT_MAX_ID = 1 << 24
"""Token ids below this are ranked through a lookup table (5 bytes per possible id); larger or
negative ones through a sort."""


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def iter_outputs(path: str | Path) -> Iterator[tuple[int, schema.OutputRecord]]:
    """(line number, record) of each record of an outputs file, in file order. Raises
    :class:`LogError` for a missing or unreadable file (``file: reason``), a record that does
    not validate, a req_id seen twice or a token id beyond int64 (``file:line: reason``), and a
    file without records. A bad outputs file is a usage error, not a verdict on a log."""
    path = Path(path)
    seen: set[str] = set()
    number = 0
    try:
        f = path.open("rb")
    except FileNotFoundError as e:
        raise LogError(f"{path}: no such file") from e
    except OSError as e:
        raise LogError(f"{path}: cannot read: {e.strerror or e}") from e
    with f:
        try:
            for block in f:
                # bytes.splitlines: "\r" ends a line too, as in the whole file's splitlines()
                for raw in block.splitlines():
                    number += 1
                    if not raw.strip():
                        continue
                    try:
                        rec = schema.OutputRecord.model_validate_json(raw)
                    except ValidationError as e:
                        raise LogError(f"{path}:{number}: {schema.explain(e)}") from e
                    if rec.req_id in seen:
                        raise LogError(f"{path}:{number}: req_id {rec.req_id!r} appears twice")
                    if _beyond_int64(rec.prompt_token_ids) or _beyond_int64(rec.output_token_ids):
                        # no tokenizer has such an id, and the token analysis keeps ids as int64
                        raise LogError(
                            f"{path}:{number}: req_id {rec.req_id!r} has a token id beyond int64"
                        )
                    seen.add(rec.req_id)
                    yield number, rec
        except OSError as e:
            raise LogError(f"{path}: cannot read: {e.strerror or e}") from e
    if not seen:
        raise LogError(f"{path}: no output records")


def _beyond_int64(ids: list[int] | None) -> bool:
    if not ids:
        return False
    return min(ids) < INT64_MIN or max(ids) > INT64_MAX


def load_outputs(path: str | Path) -> dict[str, schema.OutputRecord]:
    """Every record of an outputs file by req_id, in file order (:func:`iter_outputs`; its
    errors)."""
    return {rec.req_id: rec for _, rec in iter_outputs(path)}


@dataclass
class TokenIds:
    """The input token ids of every request of an outputs file, as ranks among its distinct
    ids: request ``r``'s token at position p is ``vocab[ranks[offset[r] + p]]`` for p below
    ``length[r]``."""

    rows: dict[str, int]
    """req_id -> its row in ``offset`` and ``length``; every record of the file has one."""
    offset: np.ndarray
    """(requests,) int64: where the request's ids start in ``ranks``; -1 for a record without
    ``prompt_token_ids``."""
    length: np.ndarray
    """(requests,) int64: ``len(prompt_token_ids) + len(output_token_ids)`` (0 without ids)."""
    ranks: np.ndarray
    """(tokens,) int32: each token id's index in ``vocab``."""
    vocab: np.ndarray
    """(distinct ids,) int64, sorted."""

    @property
    def usable(self) -> bool:
        """Some record has token ids."""
        return bool((self.offset >= 0).any())


def read_token_ids(path: str | Path) -> TokenIds:
    """The token ids of an outputs file (:class:`TokenIds`), read one record at a time
    (:func:`iter_outputs`; its errors)."""
    rows: dict[str, int] = {}
    offset = array("q")
    length = array("q")
    ids = array("q")
    for _, rec in iter_outputs(path):
        rows[rec.req_id] = len(offset)
        if rec.prompt_token_ids is None:
            offset.append(-1)
            length.append(0)
            continue
        offset.append(len(ids))
        ids.extend(rec.prompt_token_ids)  # within int64: iter_outputs refuses any other
        ids.extend(rec.output_token_ids or [])
        length.append(len(ids) - offset[-1])
    flat = np.frombuffer(ids, np.int64) if len(ids) else np.zeros(0, np.int64)
    vocab, ranks = rank_ids(flat)
    del flat, ids
    return TokenIds(
        rows,
        np.frombuffer(offset, np.int64).copy(),
        np.frombuffer(length, np.int64).copy(),
        ranks,
        vocab,
    )


def rank_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct ids sorted, each id's index among them as int32): ``np.unique(ids,
    return_inverse=True)``, through a lookup table when the ids are in ``[0, LUT_MAX_ID)``
    (memory follows the largest id, not the number of ids)."""
    if ids.size and ids.min() >= 0 and ids.max() < LUT_MAX_ID:
        present = np.zeros(int(ids.max()) + 1, bool)
        present[ids] = True
        vocab = np.flatnonzero(present).astype(np.int64)
        lut = np.cumsum(present, dtype=np.int32) - 1
        return vocab, lut[ids]
    vocab, inverse = np.unique(ids, return_inverse=True)
    return vocab.astype(np.int64), inverse.astype(np.int32)
