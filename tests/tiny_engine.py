"""One ``generate`` engine run on the embedded tiny model, as the real-vLLM tests (``*_vllm.py``)
start it: float32, ``max_model_len`` 256, the same four prompts and 12 new tokens unless a test
says otherwise, vLLM's output kept in ``<tmp>/<name>.txt``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeprof import generate
from moeprof.tiny import tiny_model_path

PROMPTS = [
    "Janet's ducks lay 16 eggs per day. How many dollars does she make?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber.",
    "Hi",
    "Every morning Tom reads 20 pages of his 340 page book. How many days does he need?",
]
MAX_TOKENS = 12


def tiny_settings(
    prompts: list[str] = PROMPTS, max_tokens: int = MAX_TOKENS, **overrides: Any
) -> generate.Settings:
    """The run's :class:`moeprof.generate.Settings`; ``overrides`` replace any field."""
    base: dict[str, Any] = dict(
        model=str(tiny_model_path()),
        model_label="tiny",
        prompts=prompts,
        max_tokens=max_tokens,
        max_model_len=256,
        dtype="float32",
    )
    return generate.Settings(**(base | overrides))


def run_tiny(
    name: str, tmp: Path, log: Path | None, layer: int | str = "all", **settings: Any
) -> dict[str, Any]:
    """Run the engine (logging ``layer`` to ``log``; no hook when ``log`` is None) and return
    :func:`moeprof.generate.run_engine`'s result; ``settings``: :func:`tiny_settings`'
    arguments."""
    return generate.run_engine(
        name,
        tiny_settings(**settings),
        log=log,
        layer=layer,
        vllm_log=tmp / f"{name}.txt",
        on_event=lambda *_: None,
    )
