"""What the hook's writer thread costs per route, per sink (JSONL, Parquet), without vLLM.

Synthetic steps go through the real code path: the host ring (:class:`HostRing`), the step
queue, :class:`LogWriter`'s mapping of rows to requests (:class:`RowMapper`) and the sink
(:mod:`moeprof.hook.sinks`), into a real file in ``--dir`` (default: a temporary directory).
The workload is a continuous batch: ``--requests`` requests start together with a prefill of
``--prompt`` tokens each (one step), then decode ``--decode`` tokens each (one token per request
per step), again and again until ``--tokens`` tokens have been routed; ``top_k`` 4, random
expert ids and float32 weights. A route is one token at one logged layer.

Measured per configuration (sink x number of logged layers), median of ``--repeat`` runs, CPU
time of the writer thread only (``time.thread_time``; the feeding thread is not counted):

- ``map``: mapping rows to requests and building the columns (shared by both sinks),
- ``sink``: the sink's work (JSONL: formatting and writing; Parquet: Arrow batches, lz4
  encoding, parts), including closing the log,
- ``total``: everything the writer thread did, in microseconds per route, and the routes per
  second of writer CPU that gives; the log's size in bytes per route.

``--gil`` measures instead what the writer costs the model's thread through the GIL: a
stand-in model loop's step time (median, p99) with no writer, then while the writer renders a
JSONL backlog with each way of handing the GIL back (rows formatted per slice, ``sleep``
between slices; the hook uses 64 rows and ``sleep(1e-6)``).

Issue 14's target: the Parquet sink at most 0.1 us/route. This is a micro-benchmark: run it
on a quiet machine for figures to quote.

    python bench/writer_cost.py --json bench/results/writer_cost.json
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

from moeprof.hook import compat
from moeprof.hook.ring import HostRing
from moeprof.hook.rows import StepBatch
from moeprof.hook.writer import LogWriter, StepItem

TOP_K = 4
NUM_EXPERTS = 60


Step = tuple[StepBatch, dict[str, int], list[str]]


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


def run_once(sink: str, layers: int, workload: list[Step], directory: Path) -> dict[str, float]:
    """One log written from ``workload``; CPU seconds of the writer thread by part."""
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
    wall = time.perf_counter()
    for step, (batch, prompts, finished) in enumerate(workload):
        start = ring.reserve(batch.num_tokens, writer.wake, timeout=120)
        writer.submit(StepItem(batch, start, None, prompts, finished, step))
    writer.close()
    wall = time.perf_counter() - wall
    if writer.failed:
        raise RuntimeError(f"the writer failed: {writer.stopped}")
    routes = writer.routes_written
    size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir()))
    result = {
        "routes": routes,
        "total_sec": writer.cpu_sec,
        "map_sec": clock["map"],
        "sink_sec": clock["sink"],
        "wall_sec": wall,
        "bytes": size,
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
    """The stand-in model thread's step time while the writer renders a JSONL backlog, per
    way of handing the GIL back (rows per slice, sleep between slices)."""
    from moeprof.hook import sinks

    workload = steps(64, 128, 128, tokens)
    rows = []
    baseline = model_steps(300)
    rows.append({"setting": "no writer", "step_ms": baseline})
    real_chunk, real_pause = sinks.FORMAT_CHUNK, sinks.pause
    for chunk, sleep in ((64, 1e-6), (64, 0.0), (256, 0.0), (256, 1e-6)):
        sinks.FORMAT_CHUNK = chunk
        sinks.pause = lambda s=sleep: time.sleep(s)  # type: ignore[misc]
        try:
            max_step = max(b.num_tokens for b, _, _ in workload)
            ring = HostRing(
                max(sum(b.num_tokens for b, _, _ in workload), max_step), layers, 4, False
            )
            path = directory / f"gil-{chunk}-{sleep}.jsonl"
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
            path.unlink()
        finally:
            sinks.FORMAT_CHUNK, sinks.pause = real_chunk, real_pause
        rows.append(
            {"setting": f"{chunk} rows, sleep({sleep:g})", "step_ms": times, "writer_sec": elapsed}
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
        print("stand-in model step while the writer renders JSONL (ms)")
        print(
            f"{'setting':24} {'steps':>6} {'median':>8} {'p99':>8} {'mean/base':>9} {'writer s':>8}"
        )
        for r in gil:
            print(
                f"{r['setting']:24} {r['steps']:6d} {r['median_ms']:8.3f} {r['p99_ms']:8.3f} "
                f"{r['slowdown']:9.3f} {r.get('writer_sec', 0):8.2f}"
            )
        if args.json:
            args.json.write_text(json.dumps({"gil": gil}, indent=2) + "\n")
        return 0
    layer_counts = args.layers or [1, 4, 24]
    sinks = args.sink or ["jsonl", "parquet"]
    workload = steps(args.requests, args.prompt, args.decode, args.tokens)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for layers in layer_counts:
            for sink in sinks:
                runs = [run_once(sink, layers, workload, Path(tmp)) for _ in range(args.repeat)]
                routes = runs[0]["routes"]

                def us(key: str, runs: list = runs, routes: int = routes) -> float:
                    return statistics.median(r[key] for r in runs) / routes * 1e6

                rows.append(
                    {
                        "sink": sink,
                        "layers": layers,
                        "routes": routes,
                        "map_us_per_route": us("map_sec"),
                        "sink_us_per_route": us("sink_sec"),
                        "total_us_per_route": us("total_sec"),
                        "wall_us_per_route": us("wall_sec"),
                        "bytes_per_route": statistics.median(r["bytes"] for r in runs) / routes,
                        "runs": runs,
                    }
                )
    header = (
        f"{'sink':8} {'layers':>6} {'routes':>9} {'map':>7} {'sink':>7} {'total':>7} "
        f"{'Mroutes/s':>9} {'B/route':>8}"
    )
    print("writer CPU per route (us), median of", args.repeat, "runs")
    print(header)
    for r in rows:
        print(
            f"{r['sink']:8} {r['layers']:6d} {r['routes']:9,d} {r['map_us_per_route']:7.3f} "
            f"{r['sink_us_per_route']:7.3f} {r['total_us_per_route']:7.3f} "
            f"{1 / r['total_us_per_route']:9.2f} {r['bytes_per_route']:8.1f}"
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
