"""moeprof: per-token MoE routing logs from vLLM, and the tools to check and read them.

The Python API (:mod:`moeprof.api`)::

    import moeprof

    routes = moeprof.load("routes.jsonl")    # a pyarrow Table (as_="pandas": a DataFrame)
    moeprof.meta(routes)                      # the meta record; moeprof.end(routes): closing one
    report = moeprof.analyze("routes.jsonl") # the dataclasses `moeprof analyze` prints
    counts = moeprof.expert_counts("routes.parquet")  # per-layer expert counts, the fast path
    moeprof.validate("routes.jsonl").valid

Export (``moeprof export``) is :func:`moeprof.export.export` and
:func:`moeprof.export.export_csv` (the module's name, so not re-exported here).

Importing ``moeprof`` is cheap: these names load :mod:`moeprof.api` (and pyarrow, numpy) on
first use only. vLLM's plugin entry point imports ``moeprof.hook.plugin`` in every vLLM process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from moeprof.api import (
        analyze,
        end,
        expert_counts,
        load,
        meta,
        open_source,
        sources,
        validate,
    )

_API = {
    "load": "moeprof.api",
    "meta": "moeprof.api",
    "end": "moeprof.api",
    "sources": "moeprof.api",
    "analyze": "moeprof.api",
    "expert_counts": "moeprof.api",
    "validate": "moeprof.api",
    "open_source": "moeprof.api",
}

__all__ = [  # noqa: RUF022 - the API's order, not alphabetical
    "__version__",
    "load",
    "meta",
    "end",
    "sources",
    "analyze",
    "expert_counts",
    "validate",
    "open_source",
]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'moeprof' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
