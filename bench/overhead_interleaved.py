"""What logging costs, with every arm's engine alive at once and their passes taken in turn.

``overhead.py`` starts a fresh engine for every arm in every round, so the passes it compares
lie a minute or more apart (an engine start sits between them), and each round pays every
engine's start. On a shared VM whose speed drifts by several percent within a minute, that
spread is most of the noise. Here each *block* starts one engine per arm (baseline and each
logged arm; the product's ``moeprof.engine_run``, as there) side by side; after every engine's
``--warmup`` untimed passes, the engines run their timed passes one at a time
(``MOEPROF_PASS_GATE``): a *round* is one timed pass of every arm, in an order rotated by one
arm per round (a cyclic Latin square, as in ``overhead.py``), with ``--gap`` idle seconds
before each pass so that the engine that just finished has gone quiet (a vLLM CPU worker spins
for about a second after its last step). Only one engine runs at a time; the others sleep.

Per logged arm and round: ratio = the arm's pass time / the same round's baseline pass time.
Reported per logged arm: the median of the round ratios over all blocks, its 95% bootstrap
interval and whether ``--target`` is met (the interval's upper end <= target), as in
``overhead.py``. With several blocks the interval resamples blocks, then rounds within each
(an engine's own speed is shared by its rounds; a fresh block draws it again); with one block,
the rounds. Per-block medians are printed too. Checked as in ``overhead.py``: every logged
engine's tokens equal its block's baseline tokens, pass for pass, and every log passes
``moeprof validate --outputs`` (warm-up passes included); the hook's stats line gives the
writer's CPU per route.

The same workload as ``overhead.py``'s recommended run, 3 arms, 3 blocks of 12 rounds:

    python bench/overhead_interleaved.py --prompts 1319 --max-tokens 128 --warmup 1 \\
        --layers 1 --layers all --blocks 3 --rounds 12 \\
        --json bench/results/overhead_cpu_gsm8k_interleaved.json

Exit code: 0 when tokens are identical and every log is valid, 1 when a check failed, 2 when
an engine failed (the blocks completed before it are still reported and written).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import overhead
from rich.markup import escape
from rich.table import Table

from moeprof import generate
from moeprof.engine_run import PASS_GATE
from moeprof.errors import UserError

console = overhead.console


# --- pure functions (tests/test_bench_stats.py) -------------------------------------------


def block_bootstrap_median_ci(
    blocks: Sequence[Sequence[float]],
    level: float = overhead.CI_LEVEL,
    resamples: int = overhead.RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of values that come in blocks: each
    resample draws as many blocks as there are, with replacement, then within each drawn block
    as many of its values as it holds, with replacement, and takes the median of all drawn
    values. With one block this is the plain bootstrap of its values. Deterministic for a
    given ``seed``."""
    groups = [np.asarray(b, dtype=float) for b in blocks]
    if not groups or any(g.ndim != 1 or g.size == 0 for g in groups):
        raise ValueError("block_bootstrap_median_ci needs non-empty blocks of values")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, not {level}")
    rng = np.random.default_rng(seed)
    medians = np.empty(resamples)
    for i in range(resamples):
        drawn = rng.integers(0, len(groups), size=len(groups))
        medians[i] = np.median(
            np.concatenate(
                [g[rng.integers(0, g.size, size=g.size)] for g in (groups[j] for j in drawn)]
            )
        )
    tail = (1 - level) / 2
    lo, hi = np.quantile(medians, [tail, 1 - tail])
    return float(lo), float(hi)


def blocked_ratio_stats(
    blocks: Sequence[Sequence[float]], target: float, level: float = overhead.CI_LEVEL
) -> dict[str, Any]:
    """Median of all round ratios, its block bootstrap interval, each block's median, and the
    verdict on ``target`` (met when the interval's upper end is <= ``target`` over at least
    ``overhead.FEW_ROUNDS`` rounds)."""
    ratios = [r for b in blocks for r in b]
    lo, hi = block_bootstrap_median_ci(blocks, level=level)
    return {
        "median": statistics.median(ratios),
        "ci_low": lo,
        "ci_high": hi,
        "ci_level": level,
        "ci_method": (
            f"percentile bootstrap of the median, {overhead.RESAMPLES} resamples of the blocks, "
            "then of the rounds within each"
        ),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
        "blocks": len(blocks),
        "block_medians": [statistics.median(b) for b in blocks],
        "per_round": [list(b) for b in blocks],
        "target": target,
        "target_met": hi <= target and len(ratios) >= overhead.FEW_ROUNDS,
    }


# --- one block: live engines, passes in turn ---------------------------------------------


def refuse_at_gate(gate: Path) -> bool:
    """Close a pass gate without a go, so that the engine waiting there exits; False when no
    engine waits there now."""
    try:
        fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: nobody has the FIFO open to read
        return False
    os.close(fd)
    return True


class LiveEngine:
    """One arm's engine in its own process (``generate.run_engine`` on a thread), held at a
    FIFO before each timed pass and before its shutdown."""

    def __init__(
        self,
        arm: overhead.Arm,
        block: int,
        settings: generate.Settings,
        work: Path,
    ) -> None:
        self.arm = arm
        stem = f"b{block}-{arm.slug}"
        self.gate = work / f"{stem}.gate"
        os.mkfifo(self.gate)
        self.log = work / f"{stem}.{arm.sink}" if arm.kind == "logged" else None
        self.vllm_log = work / f"{stem}.vllm.txt"
        self.outputs_path = work / f"{stem}.out.jsonl"
        env = {PASS_GATE: str(self.gate)}
        if arm.kind == "logged":
            env |= arm.env()
        self.settings = generate.Settings(**{**settings.__dict__, "extra_env": env})
        self._cv = threading.Condition()
        self._waiting: int | None = None
        self._done: dict[int, float] = {}
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=stem, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _on_event(self, _name: str, event: dict[str, Any]) -> None:
        with self._cv:
            if event.get("event") == "pass_waiting":
                self._waiting = int(event["index"])
            elif event.get("event") == "pass_done":
                self._done[int(event["index"])] = float(event["seconds"])
            self._cv.notify_all()

    def _run(self) -> None:
        try:
            self.result = generate.run_engine(
                f"{self.arm.name} ({self.gate.stem})",
                self.settings,
                log=self.log,
                layer=self.arm.layers or "0",
                vllm_log=self.vllm_log,
                on_event=self._on_event,
                overwrite_log=True,
            )
        except BaseException as e:  # reported by wait_until; the engine is gone
            self.error = e
        with self._cv:
            self._cv.notify_all()

    def wait_until_waiting(self, index: int) -> None:
        """Block until the engine waits at the gate before pass ``index``."""
        with self._cv:
            while self._waiting != index:
                if self.error is not None or not self._thread.is_alive():
                    raise UserError(f"{self.arm.name}: the engine stopped ({self.error})")
                self._cv.wait(1.0)

    def run_pass(self, index: int) -> float:
        """Let pass ``index`` run and return its wall time (the engine's own clock)."""
        self.wait_until_waiting(index)
        with open(self.gate, "wb") as fh:
            fh.write(b"g")
        with self._cv:
            while index not in self._done:
                if self.error is not None or not self._thread.is_alive():
                    raise UserError(f"{self.arm.name}: the engine stopped ({self.error})")
                self._cv.wait(1.0)
            return self._done[index]

    def abandon(self, timeout: float = 300.0) -> None:
        """Have the engine exit without its remaining passes (another engine of the block
        failed): each time it waits at its gate, the gate closes without a go, and
        ``moeprof.engine_run`` exits. Gives up after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            if not refuse_at_gate(self.gate):
                self._thread.join(0.5)  # not at the gate yet (starting, or in a pass)
                continue
            self._thread.join(5)

    def finish(self, passes: int) -> dict[str, Any]:
        """Let the engine shut down (after its ``passes`` timed passes); its result."""
        self.wait_until_waiting(passes)
        with open(self.gate, "wb") as fh:
            fh.write(b"g")
        self._thread.join()
        if self.error is not None or self.result is None:
            raise UserError(f"{self.arm.name}: the engine failed ({self.error})")
        return self.result


def run_block(
    block: int,
    arms: Sequence[overhead.Arm],
    settings: generate.Settings,
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:
    """Start every arm's engine, run ``args.rounds`` rounds of passes in turn, stop them, and
    check tokens and logs."""
    engines = {a.name: LiveEngine(a, block, settings, work) for a in arms}
    console.print(f"[dim]block {block}: starting {len(engines)} engines side by side[/]")
    for e in engines.values():
        e.start()
    try:
        return _run_rounds(block, arms, engines, args)
    except BaseException:  # one engine failed (or Ctrl-C): the others must not wait forever
        for e in engines.values():
            e.abandon()
        raise


def _run_rounds(
    block: int,
    arms: Sequence[overhead.Arm],
    engines: dict[str, LiveEngine],
    args: argparse.Namespace,
) -> dict[str, Any]:
    for e in engines.values():
        e.wait_until_waiting(0)
    names = [a.name for a in arms]
    rounds: list[dict[str, Any]] = []
    for i in range(args.rounds):
        order = overhead.round_order(names, block * args.rounds + i)
        walls: dict[str, float] = {}
        for name in order:
            time.sleep(args.gap)
            walls[name] = engines[name].run_pass(i)
        ratios = {n: walls[n] / walls["baseline"] for n in names if n != "baseline"}
        rounds.append({"round": i, "order": order, "wall_time_sec": walls, "ratio": ratios})
        console.print(
            f"block {block}, round {i}: "
            + ", ".join(f"{escape(n)} {walls[n]:.3f} s" for n in order)
            + " | "
            + ", ".join(f"{escape(n)} {r:.3f}" for n, r in ratios.items())
        )
    results = {n: e.finish(args.rounds) for n, e in engines.items()}
    base_tokens = generate.token_ids(results["baseline"])
    checks: dict[str, Any] = {}
    for name, e in engines.items():
        if e.log is None:
            continue
        check = overhead.check_log(e.log, results[name], e.outputs_path)
        stats = overhead.engine_stats(overhead.parse_hook_stats(overhead.read_text(e.vllm_log)))
        checks[name] = {
            "identical_tokens": generate.token_ids(results[name]) == base_tokens,
            "log_valid": check["valid"],
            "routes": check["routes"],
            "hook_stats": stats,
        }
        console.print(
            f"block {block}, {escape(name)}: tokens = baseline "
            f"{checks[name]['identical_tokens']}, log valid {check['valid']}, "
            f"{check['routes']:,} routes, writer "
            f"{overhead.fmt((stats or {}).get('writer_us_per_route'), '.2f')} us/route"
        )
        if e.log.is_dir():
            for part in e.log.iterdir():
                part.unlink()
            e.log.rmdir()
        else:
            e.log.unlink()
    return {
        "block": block,
        "rounds": rounds,
        "checks": checks,
        "engine_start_sec": {n: r["engine_start_sec"] for n, r in results.items()},
        "tokens_generated_per_pass": results["baseline"]["passes"][0]["tokens_generated"],
    }


# --- the run ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    overhead.add_workload_options(p)
    overhead.add_arm_options(p)
    p.add_argument("--blocks", type=int, default=1, help="fresh sets of engines, one after another")
    p.add_argument("--rounds", type=int, default=6, help="rounds (one pass of every arm) a block")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per engine")
    p.add_argument("--gap", type=float, default=3.0, help="idle seconds before each timed pass")
    p.add_argument("--target", type=float, default=1.03)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--workdir", type=Path, help="keep engine output here")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.blocks < 1 or args.rounds < 1:
        p.error("--blocks and --rounds must be >= 1")
    if args.gap < 0:
        p.error("--gap must be >= 0")
    args.arms = overhead.arms_from(p, args)
    args.repeat = args.rounds
    return args


def summarise(
    blocks: list[dict[str, Any]],
    settings: generate.Settings,
    args: argparse.Namespace,
    error: str | None,
) -> dict[str, Any]:
    logged = [a.name for a in args.arms]
    of = {a.name: a for a in args.arms}
    arms: dict[str, Any] = {}
    for name in ["baseline", *logged]:
        walls = [r["wall_time_sec"][name] for b in blocks for r in b["rounds"]]
        arm: dict[str, Any] = {
            "wall_time_sec_median": statistics.median(walls),
            "wall_time_sec_all": walls,
            "engine_start_sec": [b["engine_start_sec"][name] for b in blocks],
        }
        if name != "baseline":
            per_block = [[r["ratio"][name] for r in b["rounds"]] for b in blocks]
            stats = blocked_ratio_stats(per_block, args.target)
            checks = [b["checks"][name] for b in blocks]
            arm |= {
                **of[name].describe(),
                "ratio_vs_baseline": stats,
                "overhead_pct_median": (stats["median"] - 1) * 100,
                "target_met": stats["target_met"],
                "identical_tokens": all(c["identical_tokens"] for c in checks),
                "logs_valid": all(c["log_valid"] for c in checks),
                "routes": [c["routes"] for c in checks],
                "hook_stats": overhead.arm_hook_stats([c["hook_stats"] for c in checks]),
            }
        arms[name] = arm
    return {
        "design": "interleaved: one live engine per arm per block, timed passes in turn",
        "machine": overhead.machine_info(),
        "model": settings.model_label,
        "prompts": len(settings.prompts),
        "max_tokens": settings.max_tokens,
        "blocks": args.blocks,
        "blocks_completed": len(blocks),
        "rounds_per_block": args.rounds,
        "warmup": args.warmup,
        "gap_sec": args.gap,
        "tokens_generated_per_pass": blocks[0]["tokens_generated_per_pass"],
        "target": args.target,
        "arms": arms,
        "blocks_detail": blocks,
        "identical_tokens": all(arms[n]["identical_tokens"] for n in logged),
        "logs_valid": all(arms[n]["logs_valid"] for n in logged),
        "target_met": all(arms[n]["target_met"] for n in logged),
        "error": error,
    }


def print_table(results: dict[str, Any]) -> None:
    n = sum(len(b["rounds"]) for b in results["blocks_detail"])
    t = Table(
        title=f"logging overhead, interleaved: {results['model']}, {results['prompts']} prompts "
        f"x {results['max_tokens']} tokens, {results['blocks_completed']} blocks, {n} rounds"
    )
    for col in ("arm", "pass s", "ratio", "95% CI", "range", "block medians", "target"):
        t.add_column(col, justify="left" if col == "arm" else "right", no_wrap=True)
    t.add_column("tokens = baseline", justify="right")
    t.add_column("logs valid", justify="right")
    t.add_column("writer us/route", justify="right")
    for name, a in results["arms"].items():
        r = a.get("ratio_vs_baseline")
        if r is None:
            t.add_row(escape(name), f"{a['wall_time_sec_median']:.3f}", "1", *["-"] * 7)
            continue
        t.add_row(
            escape(name),
            f"{a['wall_time_sec_median']:.3f}",
            f"{r['median']:.3f}",
            f"{r['ci_low']:.3f}-{r['ci_high']:.3f}",
            f"{r['min']:.3f}-{r['max']:.3f}",
            " ".join(f"{m:.3f}" for m in r["block_medians"]),
            "[green]met[/]" if r["target_met"] else "[red]not met[/]",
            str(a["identical_tokens"]),
            str(a["logs_valid"]),
            overhead.fmt(a["hook_stats"]["writer_us_per_route"], ".2f"),
        )
    console.print(t)
    console.print(
        f"pass s: median timed pass; ratio: median over rounds of arm / same round's baseline; "
        f"target: 95% CI upper end <= {results['target']}"
    )
    console.print(f"machine: {escape(str(results['machine']))}")
    if results["error"]:
        console.print(f"[red]incomplete: {escape(results['error'])}[/]")


def stop_on_sigterm() -> None:
    """Make SIGTERM (``kill``, ``pkill``) unwind like Ctrl-C, so that :func:`run_block` lets
    the engines go; by default Python dies on it at once and leaves them waiting at their
    gates (seen: three engines, 1.8 GiB each, left behind by a ``pkill``)."""

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    settings = overhead.settings_or_say_why(args)
    if settings is None:
        return 2
    work, tmp = overhead.open_workdir(args.workdir)
    arms = [overhead.Arm("baseline", "baseline"), *args.arms]
    blocks: list[dict[str, Any]] = []
    error = None
    try:
        for b in range(args.blocks):
            blocks.append(run_block(b, arms, settings, args, work))
    except UserError as e:
        error = str(e)
        console.print(f"[red]stopped: {escape(error)}[/]")
    if not blocks:
        console.print(f"[dim]engine output kept in {work}[/]")
        return 2
    results = summarise(blocks, settings, args, error)
    print_table(results)
    return overhead.finish(results, args.json, work, tmp)


if __name__ == "__main__":
    sys.exit(main())
