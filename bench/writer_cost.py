"""What the hook's writer thread costs per route, per sink (JSONL, Parquet), without vLLM.

Synthetic steps go through the real code path: the host ring (:class:`HostRing`), the step
queue, :class:`LogWriter`'s mapping of rows to requests (:class:`RowMapper`) and the sink
(:mod:`moeprof.hook.sinks`), into a real file in ``--dir`` (default: a temporary directory).
The workload is a continuous batch: ``--requests`` requests start together with a prefill of
``--prompt`` tokens each (one step), then decode ``--decode`` tokens each (one token per request
per step), again and again until ``--tokens`` tokens have been routed; ``top_k`` 4, random
expert ids and float32 weights. A route is one token at one logged layer.

Measured per configuration (sink x Parquet write options x number of logged layers), median of
``--repeat`` runs (the configurations interleaved, so that drift on a shared machine hits them
alike), CPU time of the writer thread only (``time.thread_time``; the feeding thread is not
counted):

- ``map``: mapping rows to requests and building the columns (shared by both sinks),
- ``sink``: the sink's work (JSONL: formatting and writing; Parquet: Arrow batches, encoding,
  parts), including closing the log,
- ``GIL``: the part of ``sink`` spent outside pyarrow's ``ParquetWriter.write_table`` and
  ``close``, which encode and write with the GIL released; the rest of the sink holds the GIL
  (Python and numpy), so this is what the sink takes from the model's thread (JSONL: the whole
  sink holds it, the column is left out),
- ``total``: everything the writer thread did, in microseconds per route, and the routes per
  second of writer CPU that gives; the log's size in bytes per route,
- ``read``: reading every column of the Parquet log back (``pq.read_table(path,
  use_threads=False)``), CPU time of the process per route, best of 3.

``--options`` chooses the Parquet write options: ``moeprof`` (the sink's own,
``moeprof.columns.WRITE_OPTIONS``), one of :data:`OPTION_SETS`, or ``all``.

``--gil`` measures instead what the writer costs the model's thread through the GIL: a
stand-in model loop's step time (median, p99) with no writer, then while the writer writes a
backlog: JSONL with each way of handing the GIL back (rows formatted per slice, ``sleep``
between slices; the hook uses ``sinks.FORMAT_CHUNK`` rows and ``sleep(1e-6)``), then Parquet as
the hook writes it.

Issue 14's target: the Parquet sink at most 0.1 us/route. This is a micro-benchmark: run it
on a quiet machine for figures to quote.

    python bench/writer_cost.py --json bench/results/writer_cost.json
    python bench/writer_cost.py --sink parquet --options all --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from moeprof import columns as log_columns
from moeprof.hook import compat
from moeprof.hook.ring import HostRing
from moeprof.hook.rows import StepBatch
from moeprof.hook.writer import LogWriter, StepItem

TOP_K = 4
NUM_EXPERTS = 60

_IDS = "topk_ids.list.element"
_WEIGHTS = "topk_weights.list.element"
_DICT = ["req_id", "phase"]
_STATS = ["token_idx", "layer", "step"]
_SCALARS = ["req_id", "token_idx", "layer", "phase", "step"]
_BATCH = 1 << 16
OPTION_SETS: dict[str, dict[str, Any]] = {
    "zstd": {"compression": "zstd", "use_dictionary": _DICT, "write_statistics": _STATS},
    "lz4-dict-ids": {
        "compression": "lz4",
        "use_dictionary": [*_DICT, _IDS],
        "write_statistics": _STATS,
    },
    "lz4-dict-ids-batch": {
        "compression": "lz4",
        "use_dictionary": [*_DICT, _IDS],
        "write_statistics": _STATS,
        "write_batch_size": _BATCH,
    },
    "plain": {"compression": "none", "use_dictionary": _DICT, "write_statistics": _STATS},
    "delta-ids-batch": {
        "compression": "lz4",
        "use_dictionary": _DICT,
        "column_encoding": {_IDS: "DELTA_BINARY_PACKED"},
        "write_statistics": _STATS,
        "write_batch_size": _BATCH,
    },
    "plain-ids-batch": {
        "compression": dict.fromkeys([*_SCALARS, _WEIGHTS], "lz4"),
        "use_dictionary": _DICT,
        "write_statistics": _STATS,
        "write_batch_size": _BATCH,
    },
    "plain-lists-batch": {
        "compression": dict.fromkeys(_SCALARS, "lz4"),
        "use_dictionary": _DICT,
        "write_statistics": _STATS,
        "write_batch_size": _BATCH,
    },
    "bss-ids-batch": {
        "compression": "lz4",
        "use_dictionary": _DICT,
        "use_byte_stream_split": [_IDS],
        "write_statistics": _STATS,
        "write_batch_size": _BATCH,
    },
}
"""Candidate ``WRITE_OPTIONS`` for ``--options`` (``moeprof``: the ones the sink uses now).
``zstd`` and ``lz4-dict-ids`` are the sink's earlier choices."""


Step = tuple[StepBatch, dict[str, int], list[str]]

MOEPROF_OPTIONS = log_columns.WRITE_OPTIONS


def steps(requests: int, prompt: int, decode: int, tokens: int) -> list[Step]:
    """The workload's steps: (batch, prompt lengths of the requests it starts, the requests
    that finished before it)."""
    out: list[Step] = []
    done = 0
    previous: list[str] = []
    wave = 0
    while done < tokens:
        reqs = [f"{wave}-{i}-1a2b3c4d" for i in range(requests)]
        qsl = list(range(0, requests * prompt + 1, prompt))
        prefill = StepBatch(reqs, qsl, [0] * requests, requests * prompt)
        out.append((prefill, dict.fromkeys(reqs, prompt), previous))
        done += requests * prompt
        for d in range(decode):
            if done >= tokens:
                break
            qsl = list(range(requests + 1))
            out.append((StepBatch(reqs, qsl, [prompt + d] * requests, requests), {}, []))
            done += requests
        previous = reqs
        wave += 1
    return out


def run_once(
    sink: str, layers: int, workload: list[Step], directory: Path, options: str = "moeprof"
) -> dict[str, float]:
    """One log written from ``workload`` (Parquet: with the write options ``options``); CPU
    seconds of the writer thread by part, and CPU seconds to read the log's columns back."""
    import pyarrow.parquet as pq

    max_step = max(b.num_tokens for b, _, _ in workload)
    ring = HostRing(max(4 * max_step, 1 << 14), layers, TOP_K, pin=False)
    rng = np.random.default_rng(0)
    ring.ids_np[:] = np.argsort(rng.random((ring.capacity, layers, NUM_EXPERTS)), axis=2)[
        :, :, :TOP_K
    ]
    ring.weights_np[:] = rng.random((ring.capacity, layers, TOP_K))
    path = directory / f"cost-{layers}.{sink}"
    meta = {"type": "meta", "model_id": "synthetic", "layers_logged": list(range(layers))}
    meta["top_k"] = TOP_K
    writer = LogWriter(
        path, meta, list(range(layers)), TOP_K, compat.external_request_id, True, ring
    )
    clock = {"map": 0.0, "sink": 0.0}
    columns, sink_write = writer._columns, writer._sink.write

    def timed_columns(items: Any) -> Any:
        t = time.thread_time()
        try:
            return columns(items)
        finally:
            clock["map"] += time.thread_time() - t

    def timed_write(cols: Any) -> None:
        t = time.thread_time()
        try:
            sink_write(cols)
        finally:
            clock["sink"] += time.thread_time() - t

    sink_close = writer._sink.close

    def timed_close(end: Any) -> Any:
        t = time.thread_time()
        try:
            return sink_close(end)
        finally:
            clock["sink"] += time.thread_time() - t

    writer._columns = timed_columns  # type: ignore[method-assign]
    writer._sink.write = timed_write  # type: ignore[method-assign]
    writer._sink.close = timed_close  # type: ignore[method-assign]
    clock["encode"] = 0.0
    real = pq.ParquetWriter.write_table, pq.ParquetWriter.close

    def encoding(method: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                clock["encode"] += time.thread_time() - t

        return timed

    pq.ParquetWriter.write_table = encoding(real[0])  # type: ignore[method-assign]
    pq.ParquetWriter.close = encoding(real[1])  # type: ignore[method-assign]
    if options != "moeprof":  # read by the sink each time it opens a part
        log_columns.WRITE_OPTIONS = OPTION_SETS[options]
    wall = time.perf_counter()
    try:
        for step, (batch, prompts, finished) in enumerate(workload):
            start = ring.reserve(batch.num_tokens, writer.wake, timeout=120)
            writer.submit(StepItem(batch, start, None, prompts, finished, step))
        writer.close()
    finally:
        pq.ParquetWriter.write_table, pq.ParquetWriter.close = real  # type: ignore[method-assign]
        log_columns.WRITE_OPTIONS = MOEPROF_OPTIONS
    wall = time.perf_counter() - wall
    if writer.failed:
        raise RuntimeError(f"the writer failed: {writer.stopped}")
    routes = writer.routes_written
    size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir()))
    read = 0.0
    if path.is_dir():  # every column, one thread; CPU of the whole process, best of 3
        reads = []
        for _ in range(3):
            t = time.process_time()
            table = pq.read_table(path, use_threads=False)
            reads.append(time.process_time() - t)
            assert table.num_rows == routes, (table.num_rows, routes)
            del table
        read = min(reads)
    result = {
        "routes": routes,
        "total_sec": writer.cpu_sec,
        "map_sec": clock["map"],
        "sink_sec": clock["sink"],
        "encode_sec": clock["encode"],
        "wall_sec": wall,
        "bytes": size,
        "read_sec": read,
    }
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    return result


def model_steps(n: int) -> list[float]:
    """Seconds each of ``n`` stand-in model steps takes: Python and small numpy work of about
    a millisecond, the kind of GIL-holding work vLLM's own thread does between kernels."""
    a = np.arange(64, dtype=np.float32)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        acc = 0
        for i in range(4000):
            acc += int(a[i % 64]) + i
            a = a + 1.0 if i % 50 == 0 else a
        out.append(time.perf_counter() - t)
    return out


def gil_interference(tokens: int, layers: int, directory: Path) -> list[dict[str, Any]]:
    """The stand-in model thread's step time while the writer writes a backlog: JSONL per way
    of handing the GIL back (rows per slice, sleep between slices), then Parquet as the hook
    writes it (Arrow batches of ``ARROW_CHUNK`` routes, encoded with the GIL released)."""
    from moeprof.hook import sinks

    workload = steps(64, 128, 128, tokens)
    rows = []
    baseline = model_steps(300)
    rows.append({"setting": "no writer", "step_ms": baseline})
    real_chunk, real_pause = sinks.FORMAT_CHUNK, sinks.pause
    settings = [("jsonl", sinks.FORMAT_CHUNK, 1e-6), ("jsonl", 512, 1e-6), ("jsonl", 8192, 1e-6)]
    settings.append(("parquet", sinks.ARROW_CHUNK, 1e-6))
    for sink, chunk, sleep in settings:
        if sink == "jsonl":
            sinks.FORMAT_CHUNK = chunk
        sinks.pause = lambda s=sleep: time.sleep(s)  # type: ignore[misc]
        try:
            max_step = max(b.num_tokens for b, _, _ in workload)
            ring = HostRing(
                max(sum(b.num_tokens for b, _, _ in workload), max_step), layers, 4, False
            )
            path = directory / f"gil-{chunk}-{sleep}.{sink}"
            meta = {"type": "meta", "layers_logged": list(range(layers)), "top_k": TOP_K}
            w = LogWriter(
                path, meta, list(range(layers)), TOP_K, compat.external_request_id, True, ring
            )
            for step, (batch, prompts, finished) in enumerate(workload):
                start = ring.reserve(batch.num_tokens, w.wake, timeout=120)
                w.submit(StepItem(batch, start, None, prompts, finished, step))
            w.wake()
            times = []
            t0 = time.perf_counter()
            while w.routes_written < w.captured or w.routes_written == 0:
                times += model_steps(5)
            elapsed = time.perf_counter() - t0
            w.close()
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        finally:
            sinks.FORMAT_CHUNK, sinks.pause = real_chunk, real_pause
        rows.append(
            {
                "setting": f"{sink} {chunk} rows, sleep({sleep:g})",
                "step_ms": times,
                "writer_sec": elapsed,
            }
        )
    base_mean = float(np.mean(rows[0]["step_ms"]))
    for r in rows:
        ms = np.array(r.pop("step_ms")) * 1e3
        r |= {
            "steps": int(ms.size),
            "median_ms": float(np.median(ms)),
            "p99_ms": float(np.percentile(ms, 99)),
            "slowdown": float(ms.mean() / 1e3 / base_mean),
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, action="append", help="logged layers (default 1, 4, 24)")
    p.add_argument("--sink", action="append", choices=("jsonl", "parquet"))
    p.add_argument("--tokens", type=int, default=40_000, help="tokens routed per run")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument(
        "--options",
        action="append",
        choices=("moeprof", "all", *OPTION_SETS),
        help="Parquet write options to time (repeatable; default: moeprof, the sink's own "
        "WRITE_OPTIONS; all: every set)",
    )
    p.add_argument("--dir", type=Path, help="where the logs are written (default: a temp dir)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument(
        "--gil",
        action="store_true",
        help="instead: a stand-in model thread's step time while the writer renders JSONL, "
        "per way of handing the GIL back",
    )
    args = p.parse_args(argv)
    if args.gil:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            gil = gil_interference(args.tokens, (args.layers or [4])[0], Path(tmp))
        print("stand-in model step while the writer writes a backlog (ms)")
        print(
            f"{'setting':32} {'steps':>6} {'median':>8} {'p99':>8} {'mean/base':>9} {'writer s':>8}"
        )
        for r in gil:
            print(
                f"{r['setting']:32} {r['steps']:6d} {r['median_ms']:8.3f} {r['p99_ms']:8.3f} "
                f"{r['slowdown']:9.3f} {r.get('writer_sec', 0):8.2f}"
            )
        if args.json:
            args.json.write_text(json.dumps({"gil": gil}, indent=2) + "\n")
        return 0
    layer_counts = args.layers or [1, 4, 24]
    sinks = args.sink or ["jsonl", "parquet"]
    names = args.options or ["moeprof"]
    if "all" in names:
        names = ["moeprof", *OPTION_SETS]
    arms = [(sink, "moeprof") for sink in sinks if sink == "jsonl"]
    arms += [("parquet", name) for name in names if "parquet" in sinks]
    workload = steps(args.requests, args.prompt, args.decode, args.tokens)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for layers in layer_counts:
            arm_runs: dict[tuple[str, str], list[dict[str, float]]] = {arm: [] for arm in arms}
            for _ in range(args.repeat):  # arms interleaved: drift on a shared machine hits all
                for sink, name in arms:
                    arm_runs[sink, name].append(run_once(sink, layers, workload, Path(tmp), name))
            for (sink, name), runs in arm_runs.items():
                routes = runs[0]["routes"]

                def us(key: str, runs: list = runs, routes: int = routes) -> float:
                    return statistics.median(r[key] for r in runs) / routes * 1e6

                rows.append(
                    {
                        "sink": sink,
                        "options": name if sink == "parquet" else None,
                        "write_options": (
                            MOEPROF_OPTIONS if name == "moeprof" else OPTION_SETS[name]
                        )
                        if sink == "parquet"
                        else None,
                        "layers": layers,
                        "routes": routes,
                        "map_us_per_route": us("map_sec"),
                        "sink_us_per_route": us("sink_sec"),
                        "sink_gil_us_per_route": None
                        if sink == "jsonl"
                        else statistics.median(r["sink_sec"] - r["encode_sec"] for r in runs)
                        / routes
                        * 1e6,
                        "total_us_per_route": us("total_sec"),
                        "wall_us_per_route": us("wall_sec"),
                        "bytes_per_route": statistics.median(r["bytes"] for r in runs) / routes,
                        "read_us_per_route": None if sink == "jsonl" else us("read_sec"),
                        "runs": runs,
                    }
                )
    header = (
        f"{'sink':28} {'layers':>6} {'routes':>9} {'map':>7} {'sink':>7} {'GIL':>7} "
        f"{'total':>7} {'Mroutes/s':>9} {'B/route':>8} {'read':>7}"
    )
    print(f"writer CPU per route (us), median of {args.repeat} runs; read: us/route, best of 3")
    print(header)
    for r in rows:
        label = r["sink"] if r["options"] in (None, "moeprof") else f"parquet:{r['options']}"
        read = r["read_us_per_route"]
        gil = f"{r['sink_gil_us_per_route']:7.3f}" if r["sink"] == "parquet" else ""
        print(
            f"{label:28} {r['layers']:6d} {r['routes']:9,d} {r['map_us_per_route']:7.3f} "
            f"{r['sink_us_per_route']:7.3f} {gil:>7} "
            f"{r['total_us_per_route']:7.3f} {1 / r['total_us_per_route']:9.2f} "
            f"{r['bytes_per_route']:8.1f} {'' if read is None else f'{read:7.3f}'}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": {
                        "python": sys.version.split()[0],
                        "platform": platform.platform(),
                        "cpus": os.cpu_count(),
                    },
                    "workload": {
                        "tokens": args.tokens,
                        "requests": args.requests,
                        "prompt": args.prompt,
                        "decode": args.decode,
                        "top_k": TOP_K,
                    },
                    "results": rows,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
