"""What logging costs: baseline and logged generation side by side, in fresh engines, A B B A.

Each arm runs in its own engine process (the product's ``moeprof.engine_run``); every engine
does ``--warmup`` untimed passes, then ``--repeat`` timed ones; the ratio logged/baseline is
taken per pair and reported as median and range. ``--naive`` adds the common hand-written hook
(``.cpu().tolist()`` + ``json.dumps`` per token inside the router, eager mode) as a reference.

    python bench/overhead.py --prompts 25 --pairs 3 --json bench/results/overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from moeprof import generate
from moeprof.prompts import load_gsm8k

HERE = Path(__file__).resolve().parent
SHARED_GSM8K = HERE.parent.parent / "shared" / "data" / "gsm8k_test.jsonl"
console = Console()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny', a local folder or a hub id")
    p.add_argument("--load-format", default="auto", help="'dummy' for random weights")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompts", type=int, default=25, help="first N GSM8K test questions")
    p.add_argument("--gsm8k", type=Path, default=SHARED_GSM8K, help="local GSM8K JSONL")
    p.add_argument("--token-prompts", type=Path, help="JSON list of token-id lists (no tokenizer)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--pairs", type=int, default=3, help="A B pairs of fresh engines")
    p.add_argument("--repeat", type=int, default=3, help="timed passes per engine")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per engine")
    p.add_argument("--naive", action="store_true", help="also time the naive hook (eager)")
    p.add_argument("--enforce-eager", action="store_true", help="baseline and logged eager too")
    p.add_argument("--workdir", type=Path, help="keep logs and engine output here")
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> generate.Settings:
    model, label = generate.resolve_model(args.model)
    token_prompts = None
    prompts: list[str] = []
    if args.token_prompts:
        token_prompts = json.loads(args.token_prompts.read_text())[: args.prompts]
    else:
        prompts = load_gsm8k(args.prompts, args.gsm8k if args.gsm8k.is_file() else None)
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
    arm: str, index: int, settings: generate.Settings, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    name = f"{arm}-{index}"
    log = work / f"{name}.jsonl" if arm != "baseline" else None
    s = settings
    if arm == "naive":
        s = generate.Settings(
            **{
                **settings.__dict__,
                "enforce_eager": True,
                "extra_env": {
                    "PYTHONPATH": os.pathsep.join(
                        p for p in (str(HERE / "naive_hook"), os.environ.get("PYTHONPATH", "")) if p
                    ),
                    "NAIVE_MOE_LOG": str(work / f"{name}.jsonl"),
                    "NAIVE_MOE_LAYER": str(args.layer),
                },
            }
        )
        log = None
    console.print(f"[dim]{name}: starting engine[/]")
    result = generate.run_engine(
        name,
        s,
        log=log,
        layer=args.layer,
        vllm_log=work / f"{name}.vllm.txt",
        on_event=lambda *_: None,
    )
    summary = generate.summarise(result)
    console.print(
        f"{name}: {summary['wall_time_sec']:.3f} s median of {summary['passes']} passes, "
        f"{summary['tokens_per_sec']:,.0f} tok/s, engine start {summary['engine_start_sec']:.0f} s"
    )
    record: dict[str, Any] = {
        "arm": arm,
        "index": index,
        **summary,
        "tokens": generate.token_ids(result),
    }
    if arm == "logged":
        record["log_check"] = check_log(work / f"{name}.jsonl", result, work / f"{name}.out.jsonl")
    return record


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
            f"[red]log check failed for {log}[/]:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return {"valid": ok, "routes": generate.count_routes(log)}


def ratio_stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    tmp = None
    if args.workdir:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="moeprof-bench-")
        work = Path(tmp.name)
    records: list[dict[str, Any]] = []
    for i in range(args.pairs):
        # A B, then B A: a machine that speeds up or slows down over the run favours neither arm
        for arm in ("baseline", "logged") if i % 2 == 0 else ("logged", "baseline"):
            records.append(run_arm(arm, i, settings, args, work))
    if args.naive:
        records.append(run_arm("naive", 0, settings, args, work))
    results = summarise_records(records, settings, args)
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    if tmp:
        tmp.cleanup()
    ok = results["identical_tokens"] and results["logs_valid"]
    return 0 if ok else 1


def summarise_records(
    records: list[dict[str, Any]], settings: generate.Settings, args: argparse.Namespace
) -> dict[str, Any]:
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_arm.setdefault(r["arm"], []).append(r)
    base = by_arm["baseline"]
    pair_ratios = [
        lg["wall_time_sec"] / b["wall_time_sec"]
        for b, lg in zip(base, by_arm["logged"], strict=False)
    ]
    arms = {}
    for arm, runs in by_arm.items():
        walls = [w for r in runs for w in r["wall_time_sec_all"]]
        arms[arm] = {
            "engines": len(runs),
            "wall_time_sec_median": statistics.median(walls),
            "wall_time_sec_all": walls,
            "tokens_per_sec_median": statistics.median(r["tokens_per_sec"] for r in runs),
            "tokens_generated": runs[0]["tokens_generated"],
            "prompt_tokens": runs[0]["prompt_tokens"],
            "engine_start_sec": [r["engine_start_sec"] for r in runs],
        }
        if arm != "baseline":
            ratios = [
                r["wall_time_sec"] / base[min(r["index"], len(base) - 1)]["wall_time_sec"]
                for r in runs
            ]
            arms[arm]["ratio_vs_baseline"] = ratio_stats(pair_ratios if arm == "logged" else ratios)
    identical = all(
        b["tokens"] == lg["tokens"] for b, lg in zip(base, by_arm["logged"], strict=False)
    )
    baseline_repeatable = all(b["tokens"] == base[0]["tokens"] for b in base)
    logs_valid = all(r["log_check"]["valid"] for r in by_arm["logged"])
    return {
        "machine": machine_info(),
        "model": settings.model_label,
        "load_format": settings.load_format,
        "prompts": len(settings.prompt_token_ids or settings.prompts),
        "max_tokens": settings.max_tokens,
        "pairs": args.pairs,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "enforce_eager": settings.enforce_eager,
        "layer": args.layer,
        "arms": arms,
        "identical_tokens": identical,
        "baseline_runs_identical": baseline_repeatable,
        "logs_valid": logs_valid,
        "overhead_pct_median": (arms["logged"]["ratio_vs_baseline"]["median"] - 1) * 100,
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


def print_table(results: dict[str, Any]) -> None:
    t = Table(
        title=f"logging overhead: {results['model']} ({results['load_format']} weights), "
        f"{results['prompts']} prompts x {results['max_tokens']} tokens, "
        f"{results['pairs']} A/B pairs x {results['repeat']} passes"
    )
    for col in ("arm", "engines", "wall s (median)", "tok/s (median)", "ratio vs baseline"):
        t.add_column(col, justify="right" if col != "arm" else "left")
    for arm, a in results["arms"].items():
        r = a.get("ratio_vs_baseline")
        ratio = f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}]" if r else "1"
        t.add_row(
            arm,
            str(a["engines"]),
            f"{a['wall_time_sec_median']:.3f}",
            f"{a['tokens_per_sec_median']:,.0f}",
            ratio,
        )
    console.print(t)
    console.print(f"machine: {results['machine']}")
    console.print(
        f"identical tokens (baseline vs logged, per pair): {results['identical_tokens']}; "
        f"baseline runs identical to each other: {results['baseline_runs_identical']}; "
        f"logs valid: {results['logs_valid']}; "
        f"overhead (median of pair ratios): {results['overhead_pct_median']:+.2f}%"
    )


if __name__ == "__main__":
    sys.exit(main())
