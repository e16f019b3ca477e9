"""What the hook was asked to do, read from the environment once per process.

Configuration errors (:class:`~moeprof.errors.HookRefusal`) are raised here, in the first vLLM
process that loads the plugin, so the engine refuses to start instead of failing in a worker
after the model has loaded.

- ``VLLM_LOG_MOE``: the log path. A path ending in ``.parquet`` is a Parquet log directory
  (:class:`~moeprof.hook.sinks.ParquetSink`), any other path a JSONL file.
- ``VLLM_MOE_LAYER``: the layers to log (``0`` by default; ``all``, ``1,3``, ``0-5``).
- ``VLLM_LOG_MOE_OVERWRITE=1``: replace an existing log (for Parquet: only moeprof's parts).
- ``VLLM_LOG_MOE_PART_SEC``: for Parquet, the longest a part stays open (seconds, default
  :data:`~moeprof.hook.sinks.PART_SEC`): what a killed engine can lose at most.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from moeprof.errors import HookRefusal
from moeprof.hook.sinks import PART_SEC, parquet_dir_problem
from moeprof.layers import LayerSelection, LayerSpecError, parse_layers

ENV_LOG = "VLLM_LOG_MOE"
ENV_LAYER = "VLLM_MOE_LAYER"
ENV_OVERWRITE = "VLLM_LOG_MOE_OVERWRITE"
ENV_PART_SEC = "VLLM_LOG_MOE_PART_SEC"
ENV_WRITER = "VLLM_LOG_MOE_WRITER"
WRITERS = ("thread", "process")
"""Where the writer runs: a thread of vLLM's worker (the default), or a process of its own
(:mod:`moeprof.hook.writer_process`: it never holds the worker's GIL, and a killed worker loses
nothing it handed over). Measured side by side on the 2-core CPU VM, all 4 layers, JSONL: about
the same cost (process over thread per round: medians 0.972-1.009 in five comparisons, below 1
in 28 of 52 rounds; bench/README.md), so the default stays the one without an extra process."""
_ENV_CHECKED = "_MOEPROF_CHECKED_PATH"


@dataclass(frozen=True)
class HookConfig:
    path: Path
    layers: LayerSelection
    """Resolved against the loaded model's MoE layers by the collector."""
    overwrite: bool
    part_sec: float = PART_SEC
    """Parquet only: a part is closed at the latest this many seconds after it was opened."""
    writer: str = WRITERS[0]
    """One of :data:`WRITERS`."""

    @property
    def sink(self) -> str:
        """``"parquet"`` for a path ending in ``.parquet``, else ``"jsonl"``."""
        return "parquet" if self.path.suffix == ".parquet" else "jsonl"

    def path_for_dp_rank(self, dp_rank: int, dp_size: int) -> Path:
        """One file per data-parallel rank: each rank serves its own requests."""
        if dp_size <= 1:
            return self.path
        return self.path.with_name(f"{self.path.stem}.dp{dp_rank}{self.path.suffix}")


def load_config() -> HookConfig:
    raw_path = os.environ.get(ENV_LOG, "")
    raw_layer = os.environ.get(ENV_LAYER, "0").strip() or "0"
    try:
        layers = parse_layers(raw_layer)
    except LayerSpecError as e:
        raise HookRefusal(f"{ENV_LAYER}: {e}") from None
    raw_sec = os.environ.get(ENV_PART_SEC, "").strip()
    try:
        part_sec = float(raw_sec) if raw_sec else PART_SEC
    except ValueError:
        part_sec = -1.0
    if not part_sec > 0:
        raise HookRefusal(f"{ENV_PART_SEC}={raw_sec}: expected a number of seconds above 0")
    writer = os.environ.get(ENV_WRITER, "").strip() or WRITERS[0]
    if writer not in WRITERS:
        raise HookRefusal(f"{ENV_WRITER}={writer}: expected one of {', '.join(WRITERS)}")
    config = HookConfig(
        path=Path(raw_path).expanduser().absolute(),
        layers=layers,
        overwrite=os.environ.get(ENV_OVERWRITE, "") not in ("", "0", "false"),
        part_sec=part_sec,
        writer=writer,
    )
    _check_path_once(config)
    return config


def _check_path_once(config: HookConfig) -> None:
    """Refuse a log path that cannot be written before vLLM starts.

    Only the first process of a launch checks (its children inherit the marker), because by the
    time a worker loads the plugin a sibling rank may already have created its file.
    """
    if os.environ.get(_ENV_CHECKED) == str(config.path):
        return
    problem = path_problem(config.path, config.overwrite)
    if problem is not None:
        raise HookRefusal(problem)
    os.environ[_ENV_CHECKED] = str(config.path)


def path_problem(path: Path, overwrite: bool) -> str | None:
    """Why the hook could not write a log at ``path`` (absolute), or None.

    JSONL: a dangling symbolic link, a directory, a missing or unwritable parent directory, or
    an existing file without overwrite. Parquet (a ``.parquet`` path): see
    :func:`moeprof.hook.sinks.parquet_dir_problem`, and the same parent checks.
    """
    parent = path.parent
    if not parent.is_dir():
        return f"cannot write {path}: {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK) and not path.exists():
        return f"cannot write {path}: {parent} is not writable"
    if path.suffix == ".parquet":
        return parquet_dir_problem(path, overwrite)
    if path.is_symlink() and not path.exists():
        return f"{ENV_LOG}={path} is a dangling symbolic link; remove it or choose another path"
    if path.is_dir():
        return f"{ENV_LOG}={path} is a directory, not a file"
    if path.exists():
        if not overwrite:
            return f"{path} already exists; remove it or set {ENV_OVERWRITE}=1"
        if not os.access(path, os.W_OK):
            return f"cannot write {path}: the file is not writable"
    return None
