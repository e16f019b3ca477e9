"""What logging costs: a baseline and one logged arm per layer selection, in fresh engines.

Arms: ``baseline`` (no hook) and one ``logged[SPEC]`` per ``--layers SPEC`` (``logged[1]``,
``logged[all]``, ...; ``--layer N`` is an alias for one ``--layers N``; default: layer 0).
``--pairs N`` is the number of *rounds* (the name is kept from the two-arm A B / B A days): a
round runs every arm once, each in a fresh engine process (the product's
``moeprof.engine_run``), in an order rotated by one arm per round (a cyclic Latin square:
round i starts with arm i mod n), so a machine that drifts faster or slower over the run
favours no arm. With N a multiple of the number of arms, every arm runs in every position
equally often. Every engine does ``--warmup`` untimed passes, then ``--repeat`` timed passes of
the whole workload; its wall time is the median of its timed passes (generation only, engine
start excluded).

Per logged arm and round: ratio = the arm's wall time / the same round's baseline wall time.
Reported per logged arm: the median of the round ratios, its 95% bootstrap confidence interval
(rounds resampled with replacement, 10,000 resamples, percentile interval, seed 0), the range,
and whether the ``--target`` (default 1.03, i.e. at most +3%) is met: only when the interval's
upper end is <= the target. Checked: every logged engine's tokens equal the same round's
baseline tokens, and every log passes ``moeprof validate --outputs`` (warm-up passes included).
From inside the engine, the hook's ``moeprof: stats {...}`` line in the engine's output: the
writer thread's CPU time per route (a route: one token at one layer; includes the writer's
fixed costs, so it is only meaningful on long passes) and the host ring and device buffer sizes
("n/a" when the hook prints none). ``--naive`` adds one engine after the rounds with the
common hand-written hook (``.cpu().tolist()`` + ``json.dumps`` per token inside the router,
eager mode, on the first single-index ``--layers``); its ratio is against the median baseline
wall time.

Recommended: make each pass long against the per-engine noise, i.e. the whole GSM8K test split
(1319 questions x 128 new tokens, ~169K generated tokens a pass on the tiny model), one timed
pass after one warm-up pass, and several rounds (a multiple of the number of arms):

    python bench/overhead.py --prompts 1319 --max-tokens 128 --repeat 1 --warmup 1 \\
        --layers 1 --layers all --pairs 6 --json bench/results/overhead_cpu_gsm8k_layers.json

Quick look (25 questions; short passes, so per-step noise shows more):

    python bench/overhead.py --prompts 25 --pairs 3 --json bench/results/overhead_cpu.json

``--only NAME`` (repeatable) keeps only the named logged arms of that cross product.
``--writer thread --writer process`` does the same for where the hook's writer runs (a thread
of vLLM's worker, the default; or a process of its own, ``VLLM_LOG_MOE_WRITER=process``).
``--sink jsonl --sink parquet`` gives each layer selection one arm per log format (a JSONL
file, a Parquet directory), run side by side in the same rounds.

Exit code: 0 when tokens are identical and every log is valid, 1 when a check failed, 2 when
an engine failed (the rounds completed before it are still reported and written).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moeprof import generate
from moeprof.errors import UserError
from moeprof.layers import LayerSpecError, parse_layers
from moeprof.prompts import load_gsm8k

HERE = Path(__file__).resolve().parent
SHARED_GSM8K = HERE.parent.parent / "shared" / "data" / "gsm8k_test.jsonl"
STATS_MARKER = "moeprof: stats "
"""What the hook's shutdown line starts with; JSON follows on the same line."""
CI_LEVEL = 0.95
RESAMPLES = 10_000
FEW_ROUNDS = 5
"""Below this many rounds the bootstrap interval is printed with a caution."""
MIB = 1 << 20
console = Console() if sys.stdout.isatty() else Console(width=120)
"""Piped into a file, the tables keep their columns whole."""


# --- pure functions (tests/test_bench_stats.py) -------------------------------------------


def round_order(arms: Sequence[str], round_index: int) -> list[str]:
    """Round i of a cyclic Latin square: the arms rotated to start at arm i mod n."""
    k = round_index % len(arms)
    return [*arms[k:], *arms[:k]]


def bootstrap_median_ci(
    ratios: Sequence[float], level: float = CI_LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median: resample the values with replacement
    ``resamples`` times, take each resample's median, return the ``(1-level)/2`` and
    ``(1+level)/2`` quantiles of those medians. Deterministic for a given ``seed``."""
    values = np.asarray(ratios, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("bootstrap_median_ci needs a non-empty list of values")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, not {level}")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, values.size, size=(resamples, values.size))
    medians = np.median(values[picks], axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(medians, [tail, 1 - tail])
    return float(lo), float(hi)


def ratio_stats(ratios: Sequence[float], target: float, level: float = CI_LEVEL) -> dict[str, Any]:
    """Median, bootstrap interval, range of the round ratios, and the verdict on ``target``:
    met only when the interval's upper end is <= ``target`` over at least ``FEW_ROUNDS`` rounds
    (fewer give an interval that says little, however narrow it looks)."""
    lo, hi = bootstrap_median_ci(ratios, level=level)
    return {
        "median": statistics.median(ratios),
        "ci_low": lo,
        "ci_high": hi,
        "ci_level": level,
        "ci_method": f"percentile bootstrap of the median, {RESAMPLES} resamples of the rounds",
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
        "per_round": list(ratios),
        "target": target,
        "target_met": hi <= target and len(ratios) >= FEW_ROUNDS,
    }


def parse_hook_stats(text: str) -> list[dict[str, Any]]:
    """Every ``moeprof: stats {...}`` object in an engine's output, in order (one per logging
    worker); whatever precedes the marker on its line (vLLM's log prefix) is ignored, and a
    line whose JSON does not parse is skipped."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    for line in text.splitlines():
        at = line.find(STATS_MARKER)
        if at < 0:
            continue
        try:
            obj, _ = decoder.raw_decode(line[at + len(STATS_MARKER) :].lstrip())
        except ValueError:
            continue
        if isinstance(obj, dict):
            found.append(obj)
    return found


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def engine_stats(stats: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """One engine's hook figures from its stats lines: routes, writer CPU seconds and buffer
    bytes summed over its logging workers (layers and steps: the largest); writer CPU us per
    route and MiB derived. None when the engine printed no stats line; a field a line lacks
    gives None."""
    if not stats:
        return None

    def total(key: str) -> float | None:
        values = [_number(s.get(key)) for s in stats]
        return None if any(v is None for v in values) else sum(v for v in values if v is not None)

    def largest(key: str) -> float | None:
        values = [_number(s.get(key)) for s in stats]
        return None if any(v is None for v in values) else max(v for v in values if v is not None)

    routes, cpu = total("routes"), total("writer_cpu_sec")
    ring, device = total("ring_bytes"), total("device_bytes")
    return {
        "workers": len(stats),
        "routes": routes,
        "layers": largest("layers"),
        "steps": largest("steps"),
        "writer_cpu_sec": cpu,
        "writer_us_per_route": cpu / routes * 1e6 if cpu is not None and routes else None,
        "ring_mib": ring / MIB if ring is not None else None,
        "device_mib": device / MIB if device is not None else None,
    }


def arm_hook_stats(per_engine: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """An arm's hook figures over its engines: medians of those that reported (None: n/a)."""

    def median(key: str) -> float | None:
        values = [e[key] for e in per_engine if e is not None and e.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "engines_with_stats": sum(e is not None for e in per_engine),
        "engines": len(per_engine),
        "writer_us_per_route": median("writer_us_per_route"),
        "writer_cpu_sec": median("writer_cpu_sec"),
        "routes": median("routes"),
        "ring_mib": median("ring_mib"),
        "device_mib": median("device_mib"),
    }


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


# --- the arms --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    name: str
    """``baseline``, ``logged[SPEC]`` (``logged[SPEC]/parquet`` for a Parquet sink) or
    ``naive``."""
    kind: str
    layers: str | None = None
    """The layer selection, canonical (``parse_layers``'s spelling)."""
    sink: str = "jsonl"
    """The logged arm's log format: ``jsonl`` or ``parquet``."""
    writer: str = "thread"
    """Where the logged arm's writer runs (``VLLM_LOG_MOE_WRITER``): ``thread`` or ``process``."""
    hook_from: Path | None = None
    """A moeprof source tree whose package the arm's engine imports instead of this one (put
    first on its ``PYTHONPATH``): the hook of another version, side by side (``--hook-from``)."""

    @property
    def slug(self) -> str:
        if self.layers is None:
            return self.kind
        slug = f"{self.kind}-{re.sub(r'[^0-9a-z]+', '_', self.layers)}-{self.sink}-{self.writer}"
        if self.hook_from is not None:
            slug += "-at-" + re.sub(r"[^0-9A-Za-z]+", "_", self.hook_from.name)
        return slug

    def env(self) -> dict[str, str]:
        """What a logged arm's engine gets in its environment besides the log path."""
        env = {"VLLM_LOG_MOE_WRITER": self.writer}
        if self.hook_from is not None:
            env["PYTHONPATH"] = first_on_pythonpath(self.hook_from)
            # ``python -m moeprof.engine_run`` would put the working directory (often another
            # moeprof checkout) before PYTHONPATH; vLLM's processes inherit the engine's path
            env["PYTHONSAFEPATH"] = "1"
        return env

    def describe(self) -> dict[str, Any]:
        """What a logged arm ran, for the results file."""
        return {
            "layers": self.layers,
            "sink": self.sink,
            "writer": self.writer,
            "hook_from": None if self.hook_from is None else str(self.hook_from),
        }


def first_on_pythonpath(folder: Path) -> str:
    """This process's ``PYTHONPATH`` with ``folder`` first."""
    return os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)


def logged_arms(
    specs: Sequence[str],
    sinks: Sequence[str] = ("jsonl",),
    writers: Sequence[str] = ("thread",),
    hooks_from: Sequence[Path] = (),
) -> list[Arm]:
    """One arm per layer selection, sink and writer, in the order given (selections outer),
    and for each a twin per tree of ``hooks_from`` (named ``...@TREE``, the tree's folder
    name); a bad or repeated selection is an error."""
    arms: list[Arm] = []
    canonicals: list[str] = []
    for spec in specs:
        canonical = str(parse_layers(spec))
        if canonical in canonicals:
            raise LayerSpecError(f"--layers {spec!r} names the same layers as an earlier one")
        canonicals.append(canonical)
        for sink in dict.fromkeys(sinks):
            for writer in dict.fromkeys(writers):
                suffix = ("" if sink == "jsonl" else f"/{sink}") + (
                    "" if writer == "thread" else f"/{writer}"
                )
                name = f"logged[{canonical}]{suffix}"
                arms.append(Arm(name, "logged", canonical, sink, writer))
                for tree in hooks_from:
                    arms.append(Arm(f"{name}@{tree.name}", "logged", canonical, sink, writer, tree))
    return arms


def naive_layer(arms: Sequence[Arm]) -> int | None:
    """The naive hook logs one layer: the first single-index selection's."""
    for a in arms:
        if a.layers is not None and a.layers.isdigit():
            return int(a.layers)
    return None


def add_workload_options(p: argparse.ArgumentParser) -> None:
    """The model and prompts every engine of a run gets (shared with overhead_interleaved.py)."""
    p.add_argument("--model", default="tiny", help="'tiny', a local folder or a hub id")
    p.add_argument("--load-format", default="auto", help="'dummy' for random weights")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompts", type=int, default=25, help="first N GSM8K test questions")
    p.add_argument(
        "--gsm8k",
        type=Path,
        help="local GSM8K JSONL (default: ../shared/data/gsm8k_test.jsonl beside the project "
        "when it is there, else the Hugging Face hub)",
    )
    p.add_argument("--token-prompts", type=Path, help="JSON list of token-id lists (no tokenizer)")
    p.add_argument("--max-tokens", type=int, default=128)


def add_arm_options(p: argparse.ArgumentParser) -> None:
    """Which logged arms run (shared with overhead_interleaved.py); :func:`arms_from` reads
    them."""
    p.add_argument(
        "--layers",
        dest="layers",
        action="append",
        metavar="SPEC",
        help="one logged arm per selection: 12, 0,2, 0-3 or all (repeatable; default: 0)",
    )
    p.add_argument(
        "--layer", dest="layers", action="append", metavar="SPEC", help="alias of --layers"
    )
    p.add_argument(
        "--sink",
        dest="sinks",
        action="append",
        choices=("jsonl", "parquet"),
        help="log format of the logged arms: a JSONL file or a Parquet directory (repeatable: "
        "one arm per selection and sink, side by side in the same rounds; default jsonl)",
    )
    p.add_argument(
        "--writer",
        dest="writers",
        action="append",
        choices=("thread", "process"),
        help="where the logged arms' writer runs (VLLM_LOG_MOE_WRITER; repeatable like --sink; "
        "default thread)",
    )
    p.add_argument(
        "--hook-from",
        dest="hooks_from",
        action="append",
        type=_moeprof_tree,
        metavar="DIR",
        help="also run every logged arm with the hook of the moeprof source tree DIR (e.g. a "
        "'git worktree' of an earlier commit), as arms named ARM@DIRNAME (repeatable)",
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="ARM",
        help="keep only these logged arms of the cross product above, by name (repeatable; "
        "e.g. --only 'logged[all]/process')",
    )


def _moeprof_tree(text: str) -> Path:
    """``--hook-from``'s folder: one that holds a moeprof package."""
    tree = Path(text).expanduser().absolute()
    if not (tree / "moeprof" / "hook" / "plugin.py").is_file():
        raise argparse.ArgumentTypeError(f"{text}: no moeprof/hook/plugin.py in it")
    return tree


def arms_from(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[Arm]:
    """The logged arms :func:`add_arm_options`' options name; a bad option is ``p.error``."""
    try:
        arms = logged_arms(
            args.layers or ["0"],
            args.sinks or ["jsonl"],
            args.writers or ["thread"],
            args.hooks_from or [],
        )
    except LayerSpecError as e:
        p.error(str(e))
    if args.only:
        names = [a.name for a in arms]
        unknown = [n for n in args.only if n not in names]
        if unknown:
            p.error(f"--only {unknown[0]!r}: not an arm of these options ({', '.join(names)})")
        arms = [a for a in arms if a.name in args.only]
    return arms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_workload_options(p)
    add_arm_options(p)
    p.add_argument(
        "--pairs",
        type=int,
        default=3,
        metavar="ROUNDS",
        help="rounds: each runs every arm once in a fresh engine, order rotated per round",
    )
    p.add_argument("--repeat", type=int, default=3, help="timed passes per engine")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per engine")
    p.add_argument(
        "--target",
        type=float,
        default=1.03,
        help="met when the upper end of the 95%% interval of the median ratio is <= this",
    )
    p.add_argument("--naive", action="store_true", help="also time the naive hook (eager)")
    p.add_argument("--enforce-eager", action="store_true", help="baseline and logged eager too")
    p.add_argument("--workdir", type=Path, help="keep logs and engine output here")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error("--pairs must be >= 1")
    args.arms = arms_from(p, args)
    args.naive_layer = naive_layer(args.arms)
    if args.naive and args.naive_layer is None:
        p.error("--naive logs one layer: give at least one single-index --layers (e.g. 1)")
    return args


def gsm8k_source(given: Path | None) -> Path | None:
    """The local GSM8K file to read: the one given (which must exist), else the shared copy
    beside the project when it is there; None means the Hugging Face hub."""
    if given is None:
        return SHARED_GSM8K if SHARED_GSM8K.is_file() else None
    if not given.is_file():
        raise UserError(f"--gsm8k {given}: no such file")
    return given


def settings_or_say_why(args: argparse.Namespace) -> generate.Settings | None:
    """:func:`settings_from`, or None after printing in one line why not (both scripts)."""
    try:
        return settings_from(args)
    except UserError as e:
        console.print(f"[red]error: {escape(str(e))}[/]")
        return None


def settings_from(args: argparse.Namespace) -> generate.Settings:
    """The run's settings; :class:`UserError` when the prompts cannot be read."""
    model, label = generate.resolve_model(args.model)
    token_prompts = None
    prompts: list[str] = []
    if args.token_prompts:
        try:
            token_prompts = json.loads(args.token_prompts.read_text())[: args.prompts]
        except (OSError, ValueError) as e:
            raise UserError(f"--token-prompts {args.token_prompts}: {e}") from None
    else:
        prompts = load_gsm8k(args.prompts, gsm8k_source(args.gsm8k))
    return generate.Settings(
        model=model,
        model_label=label,
        prompts=prompts,
        prompt_token_ids=token_prompts,
        skip_tokenizer_init=token_prompts is not None,
        max_tokens=args.max_tokens,
        ignore_eos=True,
        enforce_eager=args.enforce_eager,
        load_format=args.load_format,
        dtype=args.dtype,
        repeat=args.repeat,
        warmup=args.warmup,
        chat=False,
    )


def run_arm(
    arm: Arm, index: int, settings: generate.Settings, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """One engine of ``arm`` in round ``index``: its timing, tokens, and for a logged arm the
    log check and the hook's stats."""
    stem = f"r{index}-{arm.slug}"
    log = work / f"{stem}.{arm.sink}" if arm.kind == "logged" else None
    s = settings
    if arm.kind == "naive":
        s = generate.Settings(
            **{
                **settings.__dict__,
                "enforce_eager": True,
                "extra_env": {
                    "PYTHONPATH": first_on_pythonpath(HERE / "naive_hook"),
                    "NAIVE_MOE_LOG": str(work / f"{stem}.jsonl"),
                    "NAIVE_MOE_LAYER": str(args.naive_layer),
                },
            }
        )
    if arm.kind == "logged":
        s = generate.Settings(**{**settings.__dict__, "extra_env": arm.env()})
    vllm_log = work / f"{stem}.vllm.txt"
    console.print(f"[dim]round {index}, {escape(arm.name)}: starting engine[/]")
    result = generate.run_engine(
        f"{arm.name} (round {index})",
        s,
        log=log,
        layer=arm.layers or "0",
        vllm_log=vllm_log,
        on_event=lambda *_: None,
        overwrite_log=True,
    )
    summary = generate.summarise(result)
    record: dict[str, Any] = {
        "arm": arm.name,
        "round": index,
        **summary,
        "tokens": generate.token_ids(result),
    }
    line = (
        f"round {index}, {escape(arm.name)}: {summary['wall_time_sec']:.3f} s median of "
        f"{summary['passes']} passes, {summary['tokens_per_sec']:,.0f} tok/s, "
        f"engine start {summary['engine_start_sec']:.0f} s"
    )
    if log is not None:
        record["log_check"] = check_log(log, result, work / f"{stem}.out.jsonl")
        record["hook_stats"] = engine_stats(parse_hook_stats(read_text(vllm_log)))
        hs = record["hook_stats"] or {}
        line += (
            f", {record['log_check']['routes']:,} routes, writer "
            f"{fmt(hs.get('writer_us_per_route'), '.2f')} us/route"
        )
    console.print(line)
    return record


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def check_log(log: Path, result: dict[str, Any], outputs: Path) -> dict[str, Any]:
    """Exact token accounting of the logged engine (warm-up passes included) via validate."""
    all_outputs = dict(result, outputs=result["warmup_outputs"] + result["outputs"])
    generate.write_outputs(outputs, all_outputs)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeprof",
            "validate",
            str(log),
            "--outputs",
            str(outputs),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    ok = proc.returncode == 0
    if not ok:
        console.print(
            f"[red]log check failed for {log}[/]:\n"
            + escape(proc.stdout[-2000:] + proc.stderr[-2000:])
        )
    return {"valid": ok, "routes": generate.count_routes(log)}


def run_round(
    index: int,
    arms: Sequence[Arm],
    settings: generate.Settings,
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:
    """Every arm once, in this round's rotated order; ratios and token checks against this
    round's baseline. Tokens are dropped once compared (a full GSM8K pass is ~169K ids)."""
    by_name = {a.name: a for a in arms}
    order = round_order([a.name for a in arms], index)
    records = {name: run_arm(by_name[name], index, settings, args, work) for name in order}
    base = records["baseline"]
    rnd: dict[str, Any] = {
        "round": index,
        "order": order,
        "wall_time_sec": {name: r["wall_time_sec"] for name, r in records.items()},
        "ratio": {},
        "identical_tokens": {},
        "log_valid": {},
        "hook_stats": {},
        "records": records,
    }
    for name, r in records.items():
        if name == "baseline":
            continue
        rnd["ratio"][name] = r["wall_time_sec"] / base["wall_time_sec"]
        rnd["identical_tokens"][name] = r["tokens"] == base["tokens"]
        rnd["log_valid"][name] = r["log_check"]["valid"]
        rnd["hook_stats"][name] = r["hook_stats"]
        if not rnd["identical_tokens"][name]:
            console.print(
                f"[red]round {index}: {escape(name)} generated other tokens than baseline[/]"
            )
    for name, r in records.items():
        if name != "baseline":
            r.pop("tokens")
    return rnd


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_or_say_why(args)
    if settings is None:
        return 2
    work, tmp = open_workdir(args.workdir)
    arms = [Arm("baseline", "baseline"), *args.arms]
    rounds: list[dict[str, Any]] = []
    naive: dict[str, Any] | None = None
    error = None
    try:
        for i in range(args.pairs):
            rounds.append(run_round(i, arms, settings, args, work))
        if args.naive:
            naive = run_arm(Arm("naive", "naive"), 0, settings, args, work)
    except UserError as e:
        error = str(e)
        console.print(f"[red]stopped: {escape(error)}[/]")
    if not rounds:
        if tmp:
            console.print(f"[dim]engine output kept in {work}[/]")
        return 2
    results = summarise(rounds, naive, settings, args, error)
    print_tables(results)
    return finish(results, args.json, work, tmp)


def open_workdir(workdir: Path | None) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """Where engines write their logs and output: ``workdir`` (kept), or a temporary folder
    (returned too, removed by :func:`finish` when the run ends without an error)."""
    if workdir:
        workdir.mkdir(parents=True, exist_ok=True)
        return workdir, None
    tmp = tempfile.TemporaryDirectory(prefix="moeprof-bench-")
    return Path(tmp.name), tmp


def finish(
    results: dict[str, Any],
    json_path: Path | None,
    work: Path,
    tmp: tempfile.TemporaryDirectory[str] | None,
) -> int:
    """Write ``results`` to ``json_path``, remove the temporary work folder unless the run
    stopped on an error, and return the exit code: 2 on an error, 1 when tokens differ or a
    log is not valid, else 0."""
    error = results["error"]
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {json_path}")
    if tmp and error is None:
        tmp.cleanup()
    elif tmp:
        console.print(f"[dim]engine output kept in {work}[/]")
    if error is not None:
        return 2
    return 0 if results["identical_tokens"] and results["logs_valid"] else 1


def summarise(
    rounds: list[dict[str, Any]],
    naive: dict[str, Any] | None,
    settings: generate.Settings,
    args: argparse.Namespace,
    error: str | None,
) -> dict[str, Any]:
    of = {a.name: a for a in args.arms}
    names = ["baseline", *of]
    base_walls = [r["wall_time_sec"]["baseline"] for r in rounds]
    arms: dict[str, dict[str, Any]] = {}
    for name in names:
        runs = [r["records"][name] for r in rounds]
        arms[name] = timing_summary(runs)
        if name == "baseline":
            continue
        ratios = [r["ratio"][name] for r in rounds]
        stats = ratio_stats(ratios, args.target)
        arms[name] |= {
            **of[name].describe(),
            "ratio_vs_baseline": stats,
            "overhead_pct_median": (stats["median"] - 1) * 100,
            "target_met": stats["target_met"],
            "identical_tokens": all(r["identical_tokens"][name] for r in rounds),
            "logs_valid": all(r["log_valid"][name] for r in rounds),
            "routes": [run["log_check"]["routes"] for run in runs],
            "hook_stats": arm_hook_stats([r["hook_stats"][name] for r in rounds])
            | {"per_engine": [r["hook_stats"][name] for r in rounds]},
        }
    if naive is not None:
        ratio = naive["wall_time_sec"] / statistics.median(base_walls)
        arms["naive"] = timing_summary([naive]) | {
            "layer": args.naive_layer,
            "ratio_vs_median_baseline": ratio,
        }
    first_base = rounds[0]["records"]["baseline"]["tokens"]
    baseline_repeatable = all(r["records"]["baseline"]["tokens"] == first_base for r in rounds)
    logged = [n for n in names if n != "baseline"]
    return {
        "machine": machine_info(),
        "model": settings.model_label,
        "load_format": settings.load_format,
        "prompts": len(settings.prompt_token_ids or settings.prompts),
        "max_tokens": settings.max_tokens,
        "pairs": args.pairs,
        "rounds_completed": len(rounds),
        "repeat": args.repeat,
        "warmup": args.warmup,
        "enforce_eager": settings.enforce_eager,
        "layers": [a.layers for a in args.arms],
        "sinks": sorted({a.sink for a in args.arms}),
        "writers": sorted({a.writer for a in args.arms}),
        "target": args.target,
        "arms": arms,
        "rounds": [
            {k: v for k, v in r.items() if k != "records"}
            | {"engine_start_sec": {n: rec["engine_start_sec"] for n, rec in r["records"].items()}}
            for r in rounds
        ],
        "identical_tokens": all(arms[n]["identical_tokens"] for n in logged),
        "baseline_runs_identical": baseline_repeatable,
        "logs_valid": all(arms[n]["logs_valid"] for n in logged),
        "target_met": all(arms[n]["target_met"] for n in logged),
        "error": error,
    }


def timing_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    walls = [w for r in runs for w in r["wall_time_sec_all"]]
    return {
        "engines": len(runs),
        "wall_time_sec_median": statistics.median(walls),
        "wall_time_sec_all": walls,
        "tokens_per_sec_median": statistics.median(r["tokens_per_sec"] for r in runs),
        "tokens_generated": runs[0]["tokens_generated"],
        "prompt_tokens": runs[0]["prompt_tokens"],
        "engine_start_sec": [r["engine_start_sec"] for r in runs],
    }


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        info["cpu"] = f"{names[0]} x{len(names)}" if names else platform.processor()
    except OSError:
        pass
    gpu = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        if generate.has_nvidia_gpu()
        else None
    )
    if gpu is not None and gpu.returncode == 0:
        info["gpu"] = gpu.stdout.strip()
    return info


def print_tables(results: dict[str, Any]) -> None:
    n = results["rounds_completed"]
    target = results["target"]
    t = Table(
        title=f"logging overhead: {results['model']} ({results['load_format']} weights), "
        f"{results['prompts']} prompts x {results['max_tokens']} tokens, "
        f"{n} rounds x {results['repeat']} passes"
    )
    for col in ("arm", "engines", "wall s", "tok/s", "ratio", "95% CI", "range", "target"):
        t.add_column(col, justify="left" if col == "arm" else "right", no_wrap=True)
    for arm, a in results["arms"].items():
        r = a.get("ratio_vs_baseline")
        if r:
            cells = (
                f"{r['median']:.3f}",
                f"{r['ci_low']:.3f}-{r['ci_high']:.3f}",
                f"{r['min']:.3f}-{r['max']:.3f}",
                "[green]met[/]" if r["target_met"] else "[red]not met[/]",
            )
        elif "ratio_vs_median_baseline" in a:
            cells = (f"{a['ratio_vs_median_baseline']:.3f}", "-", "-", "-")
        else:
            cells = ("1", "-", "-", "-")
        t.add_row(
            escape(arm),
            str(a["engines"]),
            f"{a['wall_time_sec_median']:.3f}",
            f"{a['tokens_per_sec_median']:,.0f}",
            *cells,
        )
    console.print(t)
    console.print(
        f"wall s, tok/s: medians over all timed passes; ratio: median over rounds of arm / "
        f"same round's baseline; target: 95% CI upper end <= {target}"
        + ("; naive: vs the median baseline" if "naive" in results["arms"] else "")
    )
    if n < FEW_ROUNDS:
        console.print(
            f"[yellow]only {n} round(s): the bootstrap interval over so few rounds says "
            "little; use several rounds for a verdict[/]"
        )
    h = Table(title="inside the logged engines (median over engines)")
    for col in ("arm", "tokens = baseline", "logs valid", "routes", "writer us/route"):
        h.add_column(col, justify="left" if col == "arm" else "right", no_wrap=True)
    h.add_column("ring MiB", justify="right")
    h.add_column("device MiB", justify="right")
    for arm, a in results["arms"].items():
        if "hook_stats" not in a:
            continue
        hs = a["hook_stats"]
        h.add_row(
            escape(arm),
            str(a["identical_tokens"]),
            str(a["logs_valid"]),
            f"{statistics.median(a['routes']):,.0f}",
            fmt(hs["writer_us_per_route"], ".2f"),
            fmt(hs["ring_mib"], ".1f"),
            fmt(hs["device_mib"], ".2f"),
        )
    console.print(h)
    console.print(f"machine: {escape(str(results['machine']))}")
    console.print(
        f"identical tokens (every logged engine vs its round's baseline): "
        f"{results['identical_tokens']}; baseline runs identical to each other: "
        f"{results['baseline_runs_identical']}; logs valid: {results['logs_valid']}; "
        f"target met by every logged arm: {results['target_met']}"
    )
    if results["error"]:
        console.print(f"[red]incomplete: {escape(results['error'])}[/]")


if __name__ == "__main__":
    sys.exit(main())
