"""The log as columns: how a Parquet log is laid out, for the hook's sink, the reader and export.

A Parquet log is a directory, by convention named like a file (``routes.parquet/``), of parts
``part-00000.parquet``, ``part-00001.parquet``, ... in log order:

- Each part is a complete Parquet file: it is written under a hidden temporary name
  (:func:`temp_part_name`) and renamed when its footer is on disk, so a killed engine leaves
  every part it closed readable and no half-written one under a part's name.
- Every part carries the meta record (:class:`moeprof.schema.MetaRecord`) as JSON in its
  key-value metadata under :data:`META_KEY`, so any one part says what it holds.
- The part written when logging ends cleanly also carries the closing record
  (:class:`moeprof.schema.EndRecord`) under :data:`END_KEY` (it may have no rows), added to the
  footer's key-value metadata when the part is closed (``ParquetWriter.add_key_value_metadata``:
  read it with ``pq.read_metadata(part).metadata``, not from the Arrow schema, which was stored
  when the part was opened). A log whose
  last part lacks it was cut short, exactly as a JSONL log without its ``end`` line.
- Rows are routes, in the order the JSONL log would hold them; the columns are
  :func:`route_schema`: the JSONL route fields, typed (``type`` is implied).

DuckDB, Polars and pyarrow read the directory as one table
(``read_parquet('routes.parquet/*.parquet')``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from moeprof.schema import NO_PHASE, NO_STEP, PHASES

META_KEY = b"moeprof.meta"
"""Key-value metadata key of every part: the meta record as JSON."""
END_KEY = b"moeprof.end"
"""Key-value metadata key of the last part of a cleanly closed log: the closing record."""
PART_GLOB = "part-*.parquet"
PART_RE = re.compile(r"part-(\d{5,})\.parquet")

WRITE_OPTIONS: dict[str, object] = {
    "compression": "lz4",
    "use_dictionary": ["req_id", "phase", "topk_ids.list.element"],
    "write_statistics": ["token_idx", "layer", "step"],
}
"""How moeprof encodes parts (``pq.ParquetWriter(..., **WRITE_OPTIONS)``): the hook's sink,
``export`` and the benchmarks alike. Measured on 1M routes, top-4 of 60 experts, per route
(encode / decode every column / size): zstd with dictionaries on req_id and phase only
181 / 72 ns / 19.6 B; lz4 with a dictionary on the expert ids too 118 / 43 ns / 19.4 B (ids
take few distinct values: bit-packed dictionary indices beat compressing them; weights are
near-random floats, a dictionary on them only costs). Statistics only where readers prune.
Two thirds of the encoding time is the two list columns' repetition levels (flat columns
would cost about half), the price of ``topk_ids``/``topk_weights`` reading as lists.

Other options, timed through the hook's sink (``bench/writer_cost.py --options all``, 983k
routes at 24 layers, sink us / bytes per route): these 0.145 / 19.2; the ids plain and
uncompressed 0.122 / 32.7 (logs 70% larger for 16% less CPU, all of it spent with the GIL
released); ``BYTE_STREAM_SPLIT`` on the ids 0.126 / 20.3, but DuckDB before 2.0 cannot read
``BYTE_STREAM_SPLIT`` integers; ``DELTA_BINARY_PACKED`` ids 0.138 / 19.9; zstd 0.206; a larger
``write_batch_size``, data page version 2 or larger row groups: within noise. None reaches 0.1:
the list columns' levels alone take about 45 ns a route."""

COLUMNS: tuple[str, ...] = (
    "req_id",
    "token_idx",
    "layer",
    "topk_ids",
    "topk_weights",
    "phase",
    "step",
)
"""The route columns, in the JSONL route fields' order (``type`` left out)."""

REQ_ID_TYPE = pa.dictionary(pa.int32(), pa.string())
PHASE_TYPE = pa.dictionary(pa.int8(), pa.string())
PHASE_NAMES = pa.array(list(PHASES), pa.string())
"""The phase dictionary: a phase's code is its index in :data:`moeprof.schema.PHASES`."""


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def temp_part_name(index: int) -> str:
    """Where a part is written before it is complete (hidden: readers and globs skip it)."""
    return f".{part_name(index)}.tmp"


def route_schema(top_k: int) -> pa.Schema:
    """The Arrow schema of a log's routes with ``top_k`` experts per route.

    ``req_id`` and ``phase`` are dictionary-encoded strings (``phase`` null where unknown);
    ``topk_ids`` are int32 and ``topk_weights`` float32, fixed-size lists of ``top_k``, the
    weights bit for bit what the router produced; ``step`` is null where unknown.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}")
    return pa.schema(
        [
            pa.field("req_id", REQ_ID_TYPE, nullable=False),
            pa.field("token_idx", pa.int32(), nullable=False),
            pa.field("layer", pa.int16(), nullable=False),
            pa.field("topk_ids", pa.list_(pa.int32(), top_k), nullable=False),
            pa.field("topk_weights", pa.list_(pa.float32(), top_k), nullable=False),
            pa.field("phase", PHASE_TYPE),
            pa.field("step", pa.int64()),
        ]
    )


def routes_batch(
    req_code: np.ndarray,
    req_names: Sequence[str],
    token_idx: np.ndarray,
    layer: np.ndarray,
    ids: np.ndarray,
    weights: np.ndarray,
    phase: np.ndarray,
    step: np.ndarray | None,
) -> pa.RecordBatch:
    """Routes as one record batch of :func:`route_schema`, without a Python object per row.

    ``req_code`` (n,) indexes ``req_names``; ``ids``/``weights`` are (n, k); ``phase`` (n,)
    holds phase codes (``NO_PHASE`` for none); ``step`` (n,) holds step numbers (``NO_STEP``
    for none), or is None when no route has one.
    """
    n, k = ids.shape
    if weights.shape != (n, k):
        raise ValueError(f"weights has shape {weights.shape}, expected {(n, k)}")
    req = pa.DictionaryArray.from_arrays(
        pa.array(np.asarray(req_code, np.int32)), pa.array(list(req_names), pa.string())
    )
    phase = np.asarray(phase, np.int8)
    phase_mask = phase == NO_PHASE
    phases = pa.DictionaryArray.from_arrays(
        pa.array(phase, mask=phase_mask if phase_mask.any() else None), PHASE_NAMES
    )
    if step is None:
        steps = pa.nulls(n, pa.int64())
    else:
        step = np.asarray(step, np.int64)
        step_mask = step == NO_STEP
        steps = pa.array(step, mask=step_mask if step_mask.any() else None)
    columns = [
        req,
        pa.array(np.asarray(token_idx, np.int32)),
        pa.array(np.asarray(layer, np.int16)),
        pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(ids, np.int32).reshape(-1)), k
        ),
        pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(weights, np.float32).reshape(-1)), k
        ),
        phases,
        steps,
    ]
    return pa.RecordBatch.from_arrays(columns, schema=route_schema(k))
