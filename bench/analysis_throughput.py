"""Throughput and peak memory of ``moeprof validate`` / ``analyze`` on big synthetic logs.

Why subprocesses: peak RSS (``ru_maxrss``) is a high-water mark for the whole process, so each
(log size, command) pair runs in a fresh interpreter; the table then shows whether peak memory
grows with the log (it should not: the reader streams).

    .venv/bin/python bench/analysis_throughput.py --routes 1000000 --routes 10000000 --json out.json

Logs are cached under ``--dir`` by size, so a second run measures without regenerating. The
cached file's name says its layout version (``synthetic_v2_*``: route lines with ``step``, as the
hook writes them since issue #11; ``synthetic_*`` files are older logs without it).

``--format parquet`` times the same routes as a Parquet log (``synthetic_*.parquet/``, a
directory of parts converted from the cached JSONL log with the hook's Parquet sink settings:
``columns.WRITE_OPTIONS``, row groups of 2**17 routes, parts of 2**20). ``--tasks`` also
takes, from the narrowest to the widest:

- ``read``: the reader alone, every column of every chunk (``LogBase.chunks``), nothing done.
- ``read-load``: only the columns load statistics need (``LogBase.load_chunks(weights=False)``:
  layer, phase, expert ids; a Parquet log reads only those columns, JSON Lines reads all).
- ``load-stats``: analyze's *load statistics*, the issue #14 target: the per-layer, per-phase
  expert activation counts that analyze's load-balance output is computed from (counts ->
  CV, max/mean, entropy, Gini, never-used, top experts), by
  ``moeprof.analysis.accumulate.load_statistics`` (``read-load`` plus one ``np.bincount``
  per chunk). Checks only the columns it reads (layer in ``layers_logged``, ids distinct and in
  range, known phase, no nulls); the rules on ``req_id``, ``token_idx``, ``step`` are
  ``validate``'s and ``analyze``'s.
- ``load``: the full per-(layer, phase) sums analyze keeps (``LayerPhaseAccumulators``: counts,
  weight sums, co-selection pairs, rank weight sums) from every column, with every check, but
  without the contamination check.
- ``analyze``: everything ``moeprof analyze`` computes by default (the above, the contamination
  check, the report), as the command runs it.

The machine these run on may be shared: ``--repeat 3`` runs each task three times and keeps
the run with the most routes per CPU second of the worker (``records_per_cpu_s``, the number
to compare there).

    .venv/bin/python bench/analysis_throughput.py --format parquet --routes 10000000 \
        --tasks read,read-load,load-stats,load,validate,analyze --repeat 3

``--layers N`` (N > 1) writes a log of N layers instead (``synthetic_{N}layers_v1_*``, with an
outputs file beside it, ``*.outputs.jsonl``): each token's N routes on consecutive lines as the
hook writes them, ``--routes`` counting route lines (N per token). It is what the full analysis
needs (``--tasks ...,analyze-full``: ``analyze --full --outputs F``); ``--layers 1`` (the
default) is the one-layer log of the earlier tables, byte for byte.
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
LAYERS_LOG_NAME = "synthetic_{layers}layers_v1_{routes}.jsonl"
"""A cached log of several layers (:func:`generate_layers`); its outputs file has the same name
with ``.outputs.jsonl``. Bump the version when either file changes."""
VOCAB = 32_000
ZIPF_S = 1.1
"""Token ids are drawn with P(rank r) proportional to 1 / (r + 2.7) ** ZIPF_S over VOCAB ids."""
TOKEN_BONUS = 3.0
"""Score added to each token id's favoured expert (one per id and layer): token dependence."""
REQUEST_BONUS = 2.5
"""Score added to each request's favoured expert (one per request and layer): consecutive tokens
of a request share experts beyond the load skew (reuse)."""
CROSS_BONUS = 3.0
"""Score added at layer l + 1 to the expert a fixed permutation maps the token's top-1 expert at
layer l to: cross-layer dependence."""
TASKS = ("read", "read-load", "load-stats", "load", "validate", "analyze", "analyze-full")
FORMATS = ("jsonl", "parquet")
PARQUET_ROW_GROUP = 1 << 17
PARQUET_PART = 1 << 20
"""The hook's Parquet sink settings (moeprof.hook.sinks: ROW_GROUP_ROUTES, PART_ROUTES)."""
FULL_ANALYSES = ("tokens", "cross_layer", "reuse", "ep")
"""What ``analyze --full`` runs (moeprof.cli._chosen_analyses with full=True)."""


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


def _meta_line(layers: list[int] | None = None) -> str:
    meta = {
        "type": "meta",
        "model_id": "synthetic/skewed-60x4",
        "vllm_version": "0.0.0",
        "torch_version": "0.0.0",
        "device": "cpu",
        "seed": 1234,
        "layers_logged": [LAYER] if layers is None else layers,
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


def _top_k(scores: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The k largest scores' experts, weights from a softmax over E logits (as :func:`_routes`),
    largest weight first."""
    n = scores.shape[0]
    ids = np.argpartition(-scores, TOP_K, axis=1)[:, :TOP_K]
    logits = rng.normal(size=(n, NUM_EXPERTS)) * 0.5
    logits[np.arange(n)[:, None], ids] += 2.0
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    weights = np.take_along_axis(probs, ids, axis=1)
    order = np.argsort(-weights, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    weights = np.take_along_axis(weights, order, axis=1).astype(np.float32)
    return ids, weights


def _outputs_line(req_id: str, prompt: np.ndarray, output: np.ndarray) -> str:
    record = {
        "req_id": req_id,
        "prompt_tokens": len(prompt),
        "generated_tokens": len(output),
        "num_cached_tokens": 0,
        "prompt_token_ids": prompt.tolist(),
        "output_token_ids": output.tolist(),
    }
    return json.dumps(record, separators=(",", ":")) + "\n"


def outputs_path(log: Path) -> Path:
    return log.with_name(log.name.removesuffix(".jsonl") + ".outputs.jsonl")


def generate_layers(path: Path, routes: int, layers: int, seed: int = 1234) -> None:
    """Write a log of ``routes`` route lines over ``layers`` layers (0..layers-1) as the hook
    writes them (:mod:`moeprof.layout`'s template with the layer per row; each token's layers
    on consecutive lines), and beside it (:func:`outputs_path`) the outputs file of the run:
    one record per request whose token ids and counts match the log exactly (prompt +
    generated - 1 routes per request and layer, no prefix caching).

    The schedule is :func:`generate`'s: requests in waves of BATCH, each prompt prefilled in
    a step of its own, then one decode step per round with one token per live request. The
    last wave is cut at ``routes / layers`` tokens; a request cut there is recorded with what
    it ran (cut in decode: fewer generated tokens; cut in its prefill: a shorter prompt and one
    generated token).

    Routes: per layer a different skew (Dirichlet loads with the concentration rising with the
    layer), plus a favoured expert per token id and layer (:data:`TOKEN_BONUS`), per request and
    layer (:data:`REQUEST_BONUS`), and one following the token's top-1 expert at the previous
    layer (:data:`CROSS_BONUS`), so token, reuse and cross-layer analyses find something.
    Token ids: Zipf-like over VOCAB ids (:data:`ZIPF_S`)."""
    from moeprof.layout import format_routes, route_template

    if routes % layers:
        raise ValueError(f"--routes {routes} is not a multiple of --layers {layers}")
    template = route_template(None, TOP_K)
    rng = np.random.default_rng(seed)
    alphas = np.geomspace(0.5, 2.0, layers)
    logp = np.log(np.stack([rng.dirichlet(np.full(NUM_EXPERTS, a)) for a in alphas]))
    follow = np.stack([rng.permutation(NUM_EXPERTS) for _ in range(layers)])
    token_pref = rng.integers(0, NUM_EXPERTS, size=(layers, VOCAB))
    rank_p = 1.0 / (np.arange(VOCAB) + 2.7) ** ZIPF_S
    cdf = np.cumsum(rank_p / rank_p.sum())
    cdf[-1] = 1.0
    id_of_rank = rng.permutation(VOCAB)
    layer_col = np.arange(layers)
    outputs = outputs_path(path)
    tmp, tmp_out = path.with_suffix(".part"), outputs.with_suffix(".part")
    tokens_left = routes // layers
    req = 0
    engine_step = 0
    with tmp.open("w") as f, tmp_out.open("w") as fo:
        f.write(_meta_line(list(range(layers))))
        while tokens_left > 0:
            plens = rng.integers(60, 220, BATCH)
            glens = rng.integers(40, 129, BATCH)
            # (request, position, step) of every routed token, in the order the engine runs them
            r_pre = np.repeat(np.arange(BATCH), plens)
            t_pre = np.arange(len(r_pre)) - np.repeat(np.cumsum(plens) - plens, plens)
            s_pre = engine_step + r_pre
            engine_step += BATCH
            rounds = int(glens.max()) - 1
            live = np.arange(rounds)[:, None] < (glens - 1)[None, :]  # (round, request)
            d_round, r_dec = np.nonzero(live)
            t_dec = plens[r_dec] + d_round
            s_dec = engine_step + d_round
            engine_step += rounds
            request = np.concatenate([r_pre, r_dec])[:tokens_left]
            token_idx = np.concatenate([t_pre, t_dec])[:tokens_left]
            steps = np.concatenate([s_pre, s_dec])[:tokens_left]
            n = len(request)
            prefill = np.arange(n) < len(r_pre)
            tokens_left -= n
            # what each request ran (the whole wave unless this is the cut one)
            ran = np.bincount(request, minlength=BATCH)
            prompt = np.minimum(plens, ran)
            generated = np.where(ran > 0, ran - prompt + 1, 0)
            seqs = np.searchsorted(cdf, rng.random(int((plens + glens).sum())))
            seqs = id_of_rank[np.minimum(seqs, VOCAB - 1)]
            starts = np.cumsum(plens + glens) - (plens + glens)
            token = seqs[starts[request] + token_idx]
            req_pref = rng.integers(0, NUM_EXPERTS, size=(BATCH, layers))
            ids = np.empty((n, layers, TOP_K), np.int64)
            weights = np.empty((n, layers, TOP_K), np.float32)
            rows = np.arange(n)
            for layer in range(layers):
                scores = logp[layer] + rng.gumbel(size=(n, NUM_EXPERTS))
                scores[rows, token_pref[layer, token]] += TOKEN_BONUS
                scores[rows, req_pref[request, layer]] += REQUEST_BONUS
                if layer:
                    scores[rows, follow[layer - 1, ids[:, layer - 1, 0]]] += CROSS_BONUS
                ids[:, layer], weights[:, layer] = _top_k(scores, rng)
            req_json = np.array([json.dumps(str(req + r)) for r in range(BATCH)], dtype=object)
            f.write(
                format_routes(
                    template,
                    np.repeat(req_json[request], layers),
                    np.repeat(token_idx, layers),
                    ids.reshape(n * layers, TOP_K),
                    weights.reshape(n * layers, TOP_K),
                    np.repeat(prefill, layers),
                    layer=np.tile(layer_col, n),
                    step=np.repeat(steps, layers),
                )
            )
            for r in np.nonzero(ran)[0]:
                seq = seqs[starts[r] : starts[r] + prompt[r] + generated[r]]
                fo.write(_outputs_line(str(req + r), seq[: prompt[r]], seq[prompt[r] :]))
            req += BATCH
    tmp_out.replace(outputs)
    tmp.replace(path)


def to_parquet(jsonl: Path, out: Path) -> None:
    """Write the routes of ``jsonl`` as a Parquet log directory ``out`` the way the hook's
    sink does (:data:`PARQUET_ROW_GROUP`, :data:`PARQUET_PART`, ``columns.WRITE_OPTIONS``),
    read with moeprof's own reader."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moeprof import columns
    from moeprof.analysis.reader import RouteChunk, open_log

    log = open_log(jsonl)
    assert log.meta is not None
    meta = {columns.META_KEY: log.meta.model_dump_json().encode()}
    schema = columns.route_schema(log.meta.top_k).with_metadata(meta)
    tmp = out.with_name(out.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {"part": 0, "rows": 0, "writer": None}

    def write(chunk: RouteChunk) -> None:
        codes, local = np.unique(chunk.req, return_inverse=True)
        batch = columns.routes_batch(
            local,
            [log.req_ids[c] for c in codes.tolist()],
            chunk.token_idx,
            chunk.layer,
            chunk.ids,
            chunk.weights,
            chunk.phase,
            chunk.step,
        )
        if state["writer"] is None:
            state["writer"] = pq.ParquetWriter(
                str(tmp / columns.part_name(state["part"])),
                schema,
                **columns.WRITE_OPTIONS,
            )
        state["writer"].write_table(pa.Table.from_batches([batch]).cast(schema))
        state["rows"] += len(chunk)
        if state["rows"] >= PARQUET_PART:
            state["writer"].close()
            state.update(writer=None, rows=0, part=state["part"] + 1)

    pending: list[RouteChunk] = []
    rows = 0
    for chunk in log.chunks():
        pending.append(chunk)
        rows += len(chunk)
        while rows >= PARQUET_ROW_GROUP:
            merged = _concat(pending)
            take = min(PARQUET_ROW_GROUP, PARQUET_PART - state["rows"])
            write(merged.take(np.arange(take)))
            rest = merged.take(np.arange(take, len(merged)))
            pending, rows = [rest], len(rest)
    if rows:
        write(_concat(pending))
    if state["writer"] is not None:
        state["writer"].close()
    tmp.replace(out)


def _concat(chunks: list) -> object:
    from moeprof.analysis.reader import RouteChunk

    if len(chunks) == 1:
        return chunks[0]
    fields = RouteChunk.__dataclass_fields__
    return RouteChunk(*(np.concatenate([getattr(c, f) for c in chunks]) for f in fields))


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir())
    return path.stat().st_size


def _worker(task: str, path: Path, outputs: Path | None = None) -> None:
    """Run one command on one log and print its timing and peak memory as JSON."""
    from moeprof.analysis.analyze import analyze_logs
    from moeprof.analysis.passes import PassOptions, Skipped
    from moeprof.analysis.validate import validate_log

    if path.is_dir() or path.suffix == ".parquet":  # pyarrow's import is not the reading
        import moeprof.analysis.parquet_log  # noqa: F401

    baseline = _rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    skipped: dict[str, str] = {}
    if task in ("read", "load"):
        records = _read_task(path, load=task == "load")
    elif task in ("read-load", "load-stats"):
        records = _load_stats_task(path, count=task == "load-stats")
    elif task == "validate":
        report = validate_log(path)
        records = report.routes
        if not report.valid:
            raise SystemExit(f"synthetic log unexpectedly invalid: {report.errors[:3]}")
    else:
        # analyze-full: the four extra analyses of `analyze --full --outputs F`;
        # analyze:NAME: the default analysis plus that one pass (to see what each costs)
        names = FULL_ANALYSES if task == "analyze-full" else tuple(task.split(":")[1:])
        analysis = analyze_logs([path], analyses=names, options=PassOptions(outputs=outputs))
        records = analysis.logs[0].records
        skipped = {
            name: r.reason for name, r in analysis.logs[0].extras.items() if isinstance(r, Skipped)
        }
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    print(
        json.dumps(
            {
                "task": task,
                "records": records,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "records_per_s": records / seconds,
                "records_per_cpu_s": records / cpu_seconds,
                "skipped": skipped,
                "baseline_rss_mib": baseline,
                "peak_rss_mib": _rss_mib(),
                "bytes": _size(path),
            }
        )
    )


def _read_task(path: Path, *, load: bool) -> int:
    """``read``: every chunk of the log, nothing done with it; ``load``: each chunk folded into
    analyze's load statistics (per layer and phase accumulators) too. Returns the routes."""
    from moeprof.analysis.accumulate import LayerPhaseAccumulators
    from moeprof.analysis.reader import open_log

    log = open_log(path)
    assert log.meta is not None
    sums = LayerPhaseAccumulators(log.meta.num_experts) if load else None
    records = 0
    for chunk in log.chunks():
        records += len(chunk)
        if sums is not None:
            sums.add(log.layer_slot(chunk.layer), chunk.phase, chunk.ids, chunk.weights)
    return records


def _load_stats_task(path: Path, *, count: bool) -> int:
    """``read-load``: the columns load statistics need, nothing done with them; ``load-stats``:
    the load statistics themselves. Returns the routes."""
    from moeprof.analysis.accumulate import load_statistics
    from moeprof.analysis.reader import open_log

    log = open_log(path)
    if count:
        return int(load_statistics(log).tokens.sum())
    return sum(len(chunk) for chunk in log.load_chunks(weights=False))


def _read_through(path: Path) -> None:
    """Read the log once so the timed run finds it in the page cache: the target is routes per
    second per core, and a 1.5 GB log read cold from this VM's disk measures the disk."""
    for file in sorted(path.iterdir()) if path.is_dir() else [path]:
        with file.open("rb", buffering=0) as f:
            buf = bytearray(16 << 20)
            while f.readinto(buf):
                pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, action="append", help="log size(s); repeatable")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moeprof-bench"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--layers",
        type=int,
        default=1,
        help="layers in the synthetic log (1: the one-layer log of the earlier tables; more: "
        "each token's layers on consecutive lines, with an outputs file for analyze-full)",
    )
    parser.add_argument(
        "--tasks",
        default="validate,analyze",
        help=f"comma-separated, of {', '.join(TASKS)}, or analyze:NAME (the default analysis "
        f"plus one extra pass, NAME of {', '.join(FULL_ANALYSES)})",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="jsonl",
        help="read the log as JSONL (the hook's text form) or as Parquet (converted from it)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each task; the fastest is kept (for machines shared with other work)",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="do not read each log once before timing it (then the disk is timed too)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "LOG"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-outputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker[0], Path(args.worker[1]), args.worker_outputs)
        return
    tasks = args.tasks.split(",")
    for task in tasks:
        name, *passes = task.split(":")
        if task not in TASKS and not (name == "analyze" and set(passes) <= set(FULL_ANALYSES)):
            parser.error(f"unknown task {task!r}")
        if args.layers == 1 and (task == "analyze-full" or "tokens" in passes):
            parser.error(f"{task} needs an outputs file: give --layers 2 or more")
    if args.layers < 1:
        parser.error("--layers must be at least 1")

    from rich.console import Console
    from rich.table import Table

    console = Console()
    sizes = args.routes or [1_000_000, 10_000_000]
    args.dir.mkdir(parents=True, exist_ok=True)
    results = []
    if args.layers > 1:
        for n in sizes:
            if n % args.layers:
                parser.error(f"--routes {n} is not a multiple of --layers {args.layers}")
    for n in sizes:
        if args.layers == 1:
            path = args.dir / LOG_NAME.format(routes=n)
            outputs = None
        else:
            path = args.dir / LAYERS_LOG_NAME.format(layers=args.layers, routes=n)
            outputs = outputs_path(path)
        if not path.exists() or (outputs is not None and not outputs.exists()):
            t0 = time.perf_counter()
            console.print(f"generating {n:,} routes of {args.layers} layer(s) -> {path}")
            if outputs is None:
                generate(path, n)
            else:
                generate_layers(path, n, args.layers)
            console.print(f"  done in {time.perf_counter() - t0:.0f} s")
        if args.format == "parquet":
            parquet = path.with_suffix(".parquet")
            if not parquet.exists():
                t0 = time.perf_counter()
                console.print(f"converting to Parquet -> {parquet}")
                to_parquet(path, parquet)
                console.print(f"  done in {time.perf_counter() - t0:.0f} s")
            path = parquet
        for task in tasks:
            runs = []
            for _ in range(max(args.repeat, 1)):
                if not args.cold:
                    _read_through(path)
                    if outputs is not None:
                        _read_through(outputs)
                extra = [] if outputs is None else ["--worker-outputs", str(outputs)]
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", task, str(path), *extra],
                    check=True,
                    capture_output=True,
                    text=True,
                    env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                )
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            row = max(runs, key=lambda r: r["records_per_cpu_s"])  # the least disturbed run
            row["runs"] = len(runs)
            row["routes"] = n
            row["layers"] = args.layers
            row["format"] = args.format
            row["log_in_page_cache"] = not args.cold
            results.append(row)
            console.print(
                f"{task} {n:,}: {row['records_per_s'] / 1e6:.2f} M routes/s wall, "
                f"{row['records_per_cpu_s'] / 1e6:.2f} M per CPU second, "
                f"peak RSS {row['peak_rss_mib']:.0f} MiB"
            )
            for name, reason in row["skipped"].items():
                console.print(f"  {name} skipped: {reason}")

    cache = "log read cold" if args.cold else "log in page cache"
    best = f", best of {args.repeat}" if args.repeat > 1 else ""
    table = Table(
        title=f"moeprof analysis throughput ({args.format}, {args.layers} layer(s), 1 process, "
        f"{cache}{best})"
    )
    columns = ("command", "routes", "log size", "seconds", "routes/s", "routes/CPU s")
    for col in (*columns, "peak RSS", "after import"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in results:
        table.add_row(
            r["task"],
            f"{r['routes']:,}",
            f"{r['bytes'] / 2**20:,.0f} MiB",
            f"{r['seconds']:.2f}",
            f"{r['records_per_s'] / 1e6:.2f} M",
            f"{r['records_per_cpu_s'] / 1e6:.2f} M",
            f"{r['peak_rss_mib']:.0f} MiB",
            f"{r['baseline_rss_mib']:.0f} MiB",
        )
    Console(width=max(console.width, 110)).print(table)  # pipes default to 80 columns
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
