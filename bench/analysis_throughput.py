"""Throughput and peak memory of ``moeprof validate`` / ``analyze`` on big synthetic logs.

Why subprocesses: peak RSS (``ru_maxrss``) is a high-water mark for the whole process, so each
(log size, command) pair runs in a fresh interpreter; the table then shows whether peak memory
grows with the log (it should not: the reader streams).

    .venv/bin/python bench/analysis_throughput.py --routes 1000000 --routes 10000000 --json out.json

Logs are cached under ``--dir`` by size, so a second run measures without regenerating. The
cached file's name says its layout version (``synthetic_v2_*``: route lines with ``step``, as the
hook writes them since issue #11; ``synthetic_*`` files are older logs without it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NUM_EXPERTS = 60
TOP_K = 4
LAYER = 12
BATCH = 25  # requests decoded together, like the reference workload
LOG_NAME = "synthetic_v2_{routes}.jsonl"
"""A cached log's name: bump the version when :func:`generate` writes other lines."""


def _rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux keeps ``ru_maxrss`` across fork+exec, so a worker started by a parent that just wrote
    a 10M-route log would inherit the parent's peak; ``VmHWM`` belongs to the new address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _meta_line() -> str:
    meta = {
        "type": "meta",
        "model_id": "synthetic/skewed-60x4",
        "vllm_version": "0.0.0",
        "torch_version": "0.0.0",
        "device": "cpu",
        "seed": 1234,
        "layers_logged": [LAYER],
        "top_k": TOP_K,
        "num_experts": NUM_EXPERTS,
        "schema_version": 1,
        "prefix_caching": False,
    }
    return json.dumps(meta, separators=(",", ":")) + "\n"


def _routes(rng: np.random.Generator, n: int, logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """n skewed top-k routes: Gumbel-top-k over fixed expert log-probabilities, weights from a
    softmax over 60 logits, the way a router without renormalization produces them."""
    scores = logp + rng.gumbel(size=(n, NUM_EXPERTS))
    ids = np.argsort(-scores, axis=1)[:, :TOP_K]
    logits = rng.normal(size=(n, NUM_EXPERTS)) * 0.5
    logits[np.arange(n)[:, None], ids] += 2.0
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    weights = np.take_along_axis(probs, ids, axis=1)
    order = np.argsort(-weights, axis=1)  # vLLM's top-k returns the largest weight first
    ids = np.take_along_axis(ids, order, axis=1)
    weights = np.take_along_axis(weights, order, axis=1).astype(np.float32)
    return ids, weights


def generate(path: Path, routes: int, seed: int = 1234) -> None:
    """Write a log of ``routes`` route records exactly as the hook formats them (its own
    template and formatter, :mod:`moeprof.layout`, the layer and engine step per row):
    requests in waves of BATCH, each wave's prompts prefilled one after another (a step each),
    then decode steps with one token per live request."""
    from moeprof.layout import format_routes, route_template

    template = route_template(None, TOP_K)
    rng = np.random.default_rng(seed)
    logp = np.log(rng.dirichlet(np.full(NUM_EXPERTS, 0.7)))
    tmp = path.with_suffix(".part")
    written = 0
    req = 0
    engine_step = 0
    with tmp.open("w") as f:
        f.write(_meta_line())
        while written < routes:
            wave: list[tuple[int, bool, int, int]] = []  # (request, prefill, token_idx, step)
            plens = rng.integers(60, 220, BATCH)
            glens = rng.integers(40, 129, BATCH)
            for r in range(BATCH):
                wave.extend((r, True, t, engine_step) for t in range(int(plens[r])))
                engine_step += 1
            for step in range(int(glens.max()) - 1):
                for r in range(BATCH):
                    if step < glens[r] - 1:
                        wave.append((r, False, int(plens[r]) + step, engine_step))
                engine_step += 1
            req_json = np.array([json.dumps(str(req + r)) for r in range(BATCH)], dtype=object)
            req += BATCH
            wave = wave[: routes - written]
            ids, weights = _routes(rng, len(wave), logp)
            request, prefill, token_idx, steps = (np.array(col) for col in zip(*wave, strict=True))
            layer = np.full(len(wave), LAYER)
            text = format_routes(
                template,
                req_json[request],
                token_idx,
                ids,
                weights,
                prefill,
                layer=layer,
                step=steps,
            )
            f.write(text)
            written += len(wave)
    tmp.replace(path)


def _worker(task: str, path: Path) -> None:
    """Run one command on one log and print its timing and peak memory as JSON."""
    from moeprof.analysis.analyze import analyze_logs
    from moeprof.analysis.validate import validate_log

    baseline = _rss_mib()
    t0 = time.perf_counter()
    if task == "validate":
        report = validate_log(path)
        records = report.routes
        if not report.valid:
            raise SystemExit(f"synthetic log unexpectedly invalid: {report.errors[:3]}")
    else:
        analysis = analyze_logs([path])
        records = analysis.logs[0].records
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "task": task,
                "records": records,
                "seconds": seconds,
                "records_per_s": records / seconds,
                "baseline_rss_mib": baseline,
                "peak_rss_mib": _rss_mib(),
                "bytes": path.stat().st_size,
            }
        )
    )


def _read_through(path: Path) -> None:
    """Read the log once so the timed run finds it in the page cache: the target is routes per
    second per core, and a 1.5 GB log read cold from this VM's disk measures the disk."""
    with path.open("rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, action="append", help="log size(s); repeatable")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moeprof-bench"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--tasks", default="validate,analyze")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="do not read each log once before timing it (then the disk is timed too)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker[0], Path(args.worker[1]))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    sizes = args.routes or [1_000_000, 10_000_000]
    args.dir.mkdir(parents=True, exist_ok=True)
    results = []
    for n in sizes:
        path = args.dir / LOG_NAME.format(routes=n)
        if not path.exists():
            t0 = time.perf_counter()
            console.print(f"generating {n:,} routes -> {path}")
            generate(path, n)
            console.print(f"  done in {time.perf_counter() - t0:.0f} s")
        for task in args.tasks.split(","):
            if not args.cold:
                _read_through(path)
            out = subprocess.run(
                [sys.executable, __file__, "--worker", task, str(path)],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["routes"] = n
            row["log_in_page_cache"] = not args.cold
            results.append(row)
            console.print(
                f"{task} {n:,}: {row['records_per_s'] / 1e6:.2f} M routes/s, "
                f"peak RSS {row['peak_rss_mib']:.0f} MiB"
            )

    cache = "log read cold" if args.cold else "log in page cache"
    table = Table(title=f"moeprof analysis throughput (1 process, 1 core, {cache})")
    for col in ("command", "routes", "log size", "seconds", "routes/s", "peak RSS", "after import"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in results:
        table.add_row(
            r["task"],
            f"{r['routes']:,}",
            f"{r['bytes'] / 2**20:,.0f} MiB",
            f"{r['seconds']:.2f}",
            f"{r['records_per_s'] / 1e6:.2f} M",
            f"{r['peak_rss_mib']:.0f} MiB",
            f"{r['baseline_rss_mib']:.0f} MiB",
        )
    Console(width=max(console.width, 110)).print(table)  # pipes default to 80 columns
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
