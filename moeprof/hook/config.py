"""What the hook was asked to do, read from the environment once per process.

Configuration errors (:class:`~moeprof.errors.HookRefusal`) are raised here, in the first vLLM
process that loads the plugin, so the engine refuses to start instead of failing in a worker
after the model has loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from moeprof.errors import HookRefusal
from moeprof.layers import LayerSelection, LayerSpecError, parse_layers

ENV_LOG = "VLLM_LOG_MOE"
ENV_LAYER = "VLLM_MOE_LAYER"
ENV_OVERWRITE = "VLLM_LOG_MOE_OVERWRITE"
_ENV_CHECKED = "_MOEPROF_CHECKED_PATH"


@dataclass(frozen=True)
class HookConfig:
    path: Path
    layers: LayerSelection
    """Resolved against the loaded model's MoE layers by the collector."""
    overwrite: bool

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
    config = HookConfig(
        path=Path(raw_path).expanduser().absolute(),
        layers=layers,
        overwrite=os.environ.get(ENV_OVERWRITE, "") not in ("", "0", "false"),
    )
    _check_path_once(config)
    return config


def _check_path_once(config: HookConfig) -> None:
    """Refuse an unwritable or existing log before vLLM starts.

    Only the first process of a launch checks (its children inherit the marker), because by the
    time a worker loads the plugin a sibling rank may already have created its file.
    """
    if os.environ.get(_ENV_CHECKED) == str(config.path):
        return
    parent = config.path.parent
    if config.path.is_dir():
        raise HookRefusal(f"{ENV_LOG}={config.path} is a directory, not a file")
    if not parent.is_dir():
        raise HookRefusal(f"cannot write {config.path}: {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HookRefusal(f"cannot write {config.path}: {parent} is not writable")
    if config.path.exists() and not config.overwrite:
        raise HookRefusal(f"{config.path} already exists; remove it or set {ENV_OVERWRITE}=1")
    os.environ[_ENV_CHECKED] = str(config.path)
