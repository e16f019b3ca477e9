"""Baseline and logged generation runs, each in a fresh engine process, and what they produced.

The parent never imports vLLM: it writes a spec, starts ``moeprof.engine_run`` with the hook's
environment set (or unset), relays its progress events, and turns the results into
``timing.json`` and ``outputs.jsonl``. Nothing here prints: progress goes to the ``on_event``
handler the caller passes in.

``moeprof generate`` is :func:`prepare` (every check that can run before an engine starts) and
then :func:`run_job`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moeprof.errors import REFUSAL_PREFIX, HookRefusal, UserError
from moeprof.layers import LayerSelection, LayerSpecError, parse_layers
from moeprof.outfiles import refuse_existing, replacing, write_new
from moeprof.prompts import read_prompts

REFERENCE_MODEL = "Qwen/Qwen1.5-MoE-A2.7B-Chat"
CPU_PARAM_LIMIT = 3e9
"""Above this many parameters a model is too big to be worth running on these CPU machines."""

EventHandler = Callable[[str, dict[str, Any]], None]
EXIT_LOG_STOPPED = 3
"""``moeprof generate``'s exit code when the run finished but logging stopped during it (disk
full, log removed): timing.json and outputs.jsonl are written, the log holds what fit."""


@dataclass
class Settings:
    """The reference settings of a run; every one can be overridden from the CLI."""

    model: str
    model_label: str
    prompts: list[str]
    max_tokens: int = 128
    temperature: float = 0.0
    seed: int = 1234
    max_model_len: int = 512
    enforce_eager: bool = False
    load_format: str = "auto"
    dtype: str = "auto"
    gpu_memory_utilization: float | None = None
    repeat: int = 1
    warmup: int = 0
    """Untimed passes before the timed ones (benchmarks); a logged engine logs them too."""
    ignore_eos: bool = False
    prefix_caching: bool = False
    """vLLM's ``enable_prefix_caching``: cached prompt tokens skip the router, so a request's
    routes start at its ``num_cached_tokens`` (recorded in the outputs)."""
    chat: bool | None = None
    prompt_token_ids: list[list[int]] | None = None
    skip_tokenizer_init: bool = False
    engine_args: dict[str, Any] = field(default_factory=dict)
    """More keyword arguments for ``vllm.LLM`` (tests, experiments)."""
    extra_env: dict[str, str] = field(default_factory=dict)


def has_nvidia_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def resolve_model(model: str | None) -> tuple[str, str]:
    """(what vLLM loads, what to call it): the reference model on a GPU, the tiny one otherwise."""
    if model is None:
        model = REFERENCE_MODEL if has_nvidia_gpu() else "tiny"
    if model == "tiny":
        from moeprof.tiny import tiny_model_path

        return str(tiny_model_path()), "tiny (moeprof's embedded Qwen2MoE)"
    local = Path(model).expanduser()
    if local.is_dir():
        _refuse_big_model_on_cpu(local / "config.json", model)
        return str(local.absolute()), model
    return _fetch_hub_config(model), model


def _fetch_hub_config(model: str) -> str:
    try:
        from huggingface_hub import hf_hub_download

        config = hf_hub_download(model, "config.json")
    except Exception as e:
        raise UserError(
            f"cannot fetch {model} from the Hugging Face hub ({type(e).__name__}); "
            "offline? pass a local model folder, or --model tiny for the embedded model"
        ) from None
    _refuse_big_model_on_cpu(Path(config), model)
    return model


def estimate_params(config: dict[str, Any]) -> float:
    c = config.get("text_config", config)
    h, layers = c.get("hidden_size", 0), c.get("num_hidden_layers", 0)
    experts = c.get("num_experts") or c.get("n_routed_experts") or 0
    moe_i = c.get("moe_intermediate_size") or 0
    dense_i = c.get("shared_expert_intermediate_size") or c.get("intermediate_size") or 0
    per_layer = 4 * h * h + 3 * h * (experts * moe_i + dense_i)
    return layers * per_layer + 2 * c.get("vocab_size", 0) * h


def _refuse_big_model_on_cpu(config_path: Path, model: str) -> None:
    if has_nvidia_gpu() or not config_path.is_file():
        return
    params = estimate_params(json.loads(config_path.read_text()))
    if params > CPU_PARAM_LIMIT:
        raise UserError(
            f"{model} has about {params / 1e9:.1f}B parameters and this machine has no NVIDIA "
            "GPU; run it on a GPU machine, or use --model tiny"
        )


def output_paths(out_dir: Path, log: Path | None) -> dict[str, Path]:
    return {
        "log": log if log is not None else out_dir / "moe_routes.jsonl",
        "timing": out_dir / "timing.json",
        "outputs": out_dir / "outputs.jsonl",
    }


LayerArg = int | str | LayerSelection
"""A layer selection as callers hold it: an index, the text of ``--log-layer`` /
``VLLM_MOE_LAYER`` (``12``, ``0,12,23``, ``0-11,23``, ``all``), or a parsed selection."""


def layer_selection(layer: LayerArg) -> LayerSelection:
    """Any :data:`LayerArg` as a :class:`~moeprof.layers.LayerSelection`; a selection that does
    not parse is a :class:`UserError` (one line, before any engine starts)."""
    if isinstance(layer, LayerSelection):
        return layer
    if isinstance(layer, bool) or not isinstance(layer, int | str):
        raise UserError(f"--log-layer: {layer!r} is not a layer selection")
    try:
        return parse_layers(str(layer))
    except LayerSpecError as e:
        raise UserError(f"--log-layer: {e}") from None


def refuse_overwrite(paths: dict[str, Path], force: bool) -> None:
    """Refuse before any engine starts if a file of a previous run is in the way."""
    for path in paths.values():
        refuse_existing(path, force)


def check_log_path(log: Path, force: bool) -> None:
    """Refuse, before any engine starts, a log path the hook would refuse after loading the
    model: an existing log without ``force``, a dangling symbolic link, a directory where a
    JSONL file goes, a missing or unwritable folder (the hook's own checks, one line)."""
    refuse_existing(log, force)
    from moeprof.hook.config import path_problem

    problem = path_problem(log.absolute(), force)
    if problem is not None:
        raise UserError(problem)


class EngineRefused(UserError):
    """The engine did not start because the hook refused (a :class:`HookRefusal` in its
    output): the message is the hook's one ``moeprof: ...`` line. ``moeprof generate`` and
    ``moeprof serve`` print it alone and exit 1."""


Arm = tuple[str, Path | None]
"""One engine run: its name (``baseline``/``logged``) and the log it writes (None: no hook)."""


def arms(log: Path, *, baseline: bool = True, baseline_only: bool = False) -> tuple[Arm, ...]:
    """The runs to make, in order: without the hook first, to compare against."""
    runs: list[Arm] = []
    if baseline or baseline_only:
        runs.append(("baseline", None))
    if not baseline_only:
        runs.append(("logged", log))
    return tuple(runs)


@dataclass(frozen=True)
class Job:
    """One ``moeprof generate``: the settings, the runs, and where their files go."""

    settings: Settings
    layers: LayerSelection
    """The layers the logged run logs (``str()`` gives the text passed as VLLM_MOE_LAYER)."""
    out_dir: Path
    paths: dict[str, Path]
    """``log``, ``timing`` and ``outputs``."""
    arms: tuple[Arm, ...]
    force: bool

    @property
    def total_prompts(self) -> int:
        """Prompts each run generates for, over all its passes."""
        return len(self.settings.prompts) * self.settings.repeat


def prepare(
    prompts_file: Path,
    *,
    out_dir: Path,
    log: Path | None,
    layer: LayerArg = 0,
    model: str | None,
    num_prompts: int | None = None,
    baseline: bool = True,
    baseline_only: bool = False,
    force: bool = False,
    **settings: Any,
) -> Job:
    """Everything that can fail before an engine starts, in the order a user fixes it: the
    layer selection, the prompts, files of a previous run, the model. Creates ``out_dir``.

    ``layer`` is a :data:`LayerArg` (``2``, ``"0-11,23"``, ``"all"``); ``settings`` are
    :class:`Settings` fields other than the model and the prompts.
    """
    layers = layer_selection(layer)
    prompts = read_prompts(prompts_file)[:num_prompts]
    paths = output_paths(out_dir, log)
    refuse_overwrite(paths, force)
    model_path, label = resolve_model(model)
    job = Job(
        settings=Settings(model=model_path, model_label=label, prompts=prompts, **settings),
        layers=layers,
        out_dir=out_dir,
        paths=paths,
        arms=arms(paths["log"], baseline=baseline, baseline_only=baseline_only),
        force=force,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    if not baseline_only:
        check_log_path(paths["log"], force)
    return job


def run_job(job: Job, on_event: EventHandler) -> dict[str, Any]:
    """Run the job's engines one after the other, then write ``timing.json`` and
    ``outputs.jsonl``; returns the timing report."""
    runs: dict[str, dict[str, Any]] = {}
    for name, log in job.arms:
        runs[name] = run_engine(
            name,
            job.settings,
            log=log,
            layer=job.layers,
            vllm_log=job.out_dir / f"vllm-{name}.log",
            on_event=on_event,
            overwrite_log=job.force,
        )
    logged = runs.get("logged")
    routes = count_routes(job.paths["log"]) if logged else None
    report = timing_report(job.settings, runs.get("baseline"), logged, job.paths["log"], routes)
    if logged:
        report["log"]["layers"] = str(job.layers)
        stopped = logging_stopped(job.paths["log"], job.out_dir / "vllm-logged.log")
        report["log"]["complete"] = closing_record(job.paths["log"]) is not None
        if stopped is not None:
            report["log"]["stopped"] = stopped
    write_new(job.paths["timing"], json.dumps(report, indent=2) + "\n", force=job.force)
    write_outputs(job.paths["outputs"], logged or runs["baseline"], force=job.force)
    return report


def run_engine(
    name: str,
    settings: Settings,
    *,
    log: Path | None,
    layer: LayerArg = 0,
    vllm_log: Path,
    on_event: EventHandler,
    overwrite_log: bool = False,
) -> dict[str, Any]:
    """One engine in a fresh process; with ``log`` set, the hook logs the layers ``layer``
    selects there (an index, a selection's text such as ``"0-11,23"`` or ``"all"``, or a
    parsed :class:`~moeprof.layers.LayerSelection`; a bad one raises :class:`UserError`)."""
    env = _engine_env(settings, log, layer_selection(layer), overwrite_log)
    spec = asdict(settings)
    spec.pop("extra_env")
    with tempfile.TemporaryDirectory(prefix="moeprof-run-") as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(spec))
        read_fd, write_fd = os.pipe()
        vllm_log.parent.mkdir(parents=True, exist_ok=True)
        with open(vllm_log, "w") as log_fh:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "moeprof.engine_run",
                    str(spec_path),
                    str(result_path),
                    str(write_fd),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(write_fd,),
            )
            os.close(write_fd)
            reader = threading.Thread(target=_relay, args=(read_fd, name, on_event), daemon=True)
            reader.start()
            code = proc.wait()
            reader.join(5)
        if code != 0 or not result_path.is_file():
            refusal = hook_refusal(_read_lines(vllm_log))
            if refusal is not None:
                raise EngineRefused(refusal)
            raise UserError(f"the {name} run failed: {failure_reason(vllm_log)} (log: {vllm_log})")
        return json.loads(result_path.read_text())


def _engine_env(
    settings: Settings, log: Path | None, layers: LayerSelection, overwrite_log: bool
) -> dict[str, str]:
    """This process's environment without any hook settings it has, then the run's own."""
    env = hook_env(log, layers, overwrite_log, extra=settings.extra_env)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def hook_env(
    log: Path | None,
    layers: LayerSelection,
    overwrite: bool,
    *,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """This process's environment without any hook settings it has, then ``extra``, then the
    hook's: ``VLLM_LOG_MOE`` (absolute), ``VLLM_MOE_LAYER``, ``VLLM_LOG_MOE_OVERWRITE``
    (``log`` None: the hook stays off)."""
    env = {k: v for k, v in os.environ.items() if not _hook_variable(k)}
    env.update(extra or {})
    if log is not None:
        env["VLLM_LOG_MOE"] = str(log.absolute())
        env["VLLM_MOE_LAYER"] = str(layers)
        if overwrite:
            env["VLLM_LOG_MOE_OVERWRITE"] = "1"
    return env


def _hook_variable(name: str) -> bool:
    """The hook's own settings (``VLLM_LOG_MOE*``, ``VLLM_MOE_LAYER``, its marker), not vLLM's
    ``VLLM_MOE_*`` variables (``VLLM_MOE_USE_DEEP_GEMM`` ...), which pass through."""
    return name.startswith("VLLM_LOG_MOE") or name in ("VLLM_MOE_LAYER", "_MOEPROF_CHECKED_PATH")


def _relay(fd: int, name: str, on_event: EventHandler) -> None:
    with os.fdopen(fd) as fh:
        for line in fh:
            try:
                on_event(name, json.loads(line))
            except ValueError:
                continue


_REASON = re.compile(r"(\w+(?:Error|Exception|Refusal): .*)$")
"""An exception's last traceback line; the hook's own log lines (``moeprof: logging ...``,
``moeprof: stats ...``) are not reasons, only a raised refusal is."""


_STOPPED = re.compile(r"(moeprof: (?!stats ).*\bstopped\b.*)$")
"""The hook's error line when logging stops while the engine goes on (disk full, log removed):
``moeprof: logging to PATH stopped after N routes ...``."""


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def hook_refusal(lines: list[str]) -> str | None:
    """The hook's refusal in an engine's output: its ``moeprof: ...`` line (the last one), or
    None when the hook did not refuse."""
    marker = f"{HookRefusal.__name__}: {REFUSAL_PREFIX}"
    found = [line.split(marker, 1)[1] for line in lines if marker in line]
    return REFUSAL_PREFIX + found[-1].strip() if found else None


def stopped_line(lines: list[str]) -> str | None:
    """The hook's ``moeprof: ... stopped ...`` error line in an engine's output, or None."""
    found = [m.group(1) for line in lines if (m := _STOPPED.search(line))]
    return found[0] if found else None


def logging_stopped(log: Path, vllm_log: Path) -> str | None:
    """Why logging stopped before the engine did, or None when it did not: the hook's error
    line from the engine's output, else the closing record's ``stopped``."""
    line = stopped_line(_read_lines(vllm_log))
    if line is not None:
        return line
    end = closing_record(log)
    if end is not None and end.get("stopped"):
        return (
            f"moeprof: logging to {log} stopped after {end.get('routes')} routes: {end['stopped']}"
        )
    return None


def closing_record(log: Path) -> dict[str, Any] | None:
    """The log's closing record (JSONL: its last line; Parquet: the last part's metadata; the
    first rank's for logs of several data-parallel ranks), or None when it has none."""
    from moeprof.api import closing_record as read

    return read(log)


def failure_reason(vllm_log: Path) -> str:
    """The most telling line of a failed engine's output: ours first (the hook's refusals carry
    :data:`~moeprof.errors.REFUSAL_PREFIX`), else the last exception."""
    if not vllm_log.is_file():
        return "the engine process died"
    return failure_reason_of(_read_lines(vllm_log))


def failure_reason_of(lines: list[str]) -> str:
    """:func:`failure_reason` of output lines."""
    found = [m.group(1) for line in lines if (m := _REASON.search(line))]
    ours = [f for f in found if f"{HookRefusal.__name__}: {REFUSAL_PREFIX}" in f]
    if ours:
        return ours[-1].split(REFUSAL_PREFIX, 1)[-1]
    generic = [f for f in found if not f.startswith("RuntimeError: Engine core initialization")]
    if generic:
        return generic[-1]
    return found[-1] if found else "the engine process exited with an error"


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Median and spread over the passes; generation time only, engine start apart."""
    walls = [p["wall_time_sec"] for p in result["passes"]]
    wall = statistics.median(walls)
    gen = result["passes"][0]["tokens_generated"]
    return {
        "wall_time_sec": wall,
        "wall_time_sec_all": walls,
        "spread_sec": max(walls) - min(walls),
        "engine_start_sec": result["engine_start_sec"],
        "tokens_generated": gen,
        "prompt_tokens": result["passes"][0]["prompt_tokens"],
        "cached_prompt_tokens": [p.get("cached_prompt_tokens", 0) for p in result["passes"]],
        "tokens_per_sec": gen / wall if wall > 0 else None,
        "passes": len(walls),
    }


def token_ids(result: dict[str, Any]) -> list[list[int]]:
    return [o["output_token_ids"] for o in result["outputs"]]


_NOT_SETTINGS = ("prompts", "prompt_token_ids", "extra_env", "model_label", "warmup", "engine_args")


def timing_report(
    settings: Settings,
    baseline: dict[str, Any] | None,
    logged: dict[str, Any] | None,
    log_path: Path | None,
    routes: int | None,
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "model": settings.model_label,
        "settings": {k: v for k, v in asdict(settings).items() if k not in _NOT_SETTINGS}
        | {"num_prompts": len(settings.prompt_token_ids or settings.prompts)},
        "prefix_caching": settings.prefix_caching,
    }
    any_run = logged or baseline
    assert any_run is not None
    report["vllm_version"] = any_run["vllm_version"]
    report["torch_version"] = any_run["torch_version"]
    if baseline:
        report["no_log"] = summarise(baseline)
    if logged:
        report["log"] = summarise(logged) | {"log_path": str(log_path), "routes": routes}
    if baseline and logged:
        base, with_log = report["no_log"]["wall_time_sec"], report["log"]["wall_time_sec"]
        report["overhead_pct"] = (with_log / base - 1.0) * 100.0 if base > 0 else None
        report["identical_tokens"] = token_ids(baseline) == token_ids(logged)
    return report


def write_outputs(path: Path, result: dict[str, Any], *, force: bool = True) -> None:
    """One :class:`~moeprof.schema.OutputRecord` line per request; replaces ``path`` unless
    ``force`` is False."""
    from moeprof.schema import OutputRecord

    with replacing(path, force=force) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for out in result["outputs"]:
            record = OutputRecord(**out)
            fh.write(record.model_dump_json(exclude_none=True) + "\n")


def count_routes(log: Path) -> int:
    """Routes in a log: the closing record's count where the log has one, else its lines after
    the meta (JSONL) or rows (Parquet)."""
    end = closing_record(log)
    if end is not None and isinstance(end.get("routes"), int):
        return int(end["routes"])
    if log.is_dir() or log.suffix == ".parquet":
        from moeprof.api import open_source

        total = open_source(log).total
        return int(total or 0)
    with open(log, "rb") as fh:
        return max(sum(1 for _ in fh) - 1, 0)
