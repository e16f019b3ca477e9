"""Wiring the hook into vLLM's worker, only in processes that import the worker at all.

The front-end process of ``LLM(...)`` or ``vllm serve`` also loads the plugin but never imports
the worker module, so it gets no worker patch; workers get theirs the moment the module is
imported. Every process gets the stop grace of :mod:`moeprof.hook.shutdown` (it matters in the
one that stops EngineCore: the API server, or the ``LLM`` process).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from moeprof.hook import compat, shutdown
from moeprof.hook.config import HookConfig, load_config

COMPILE_CACHE_OFF = "VLLM_DISABLE_COMPILE_CACHE"
"""Set to 1 in every process of a logged run, before vLLM reads it.

vLLM saves a compiled model (``torch_compile_cache/torch_aot_compile/<key>``) keyed by its
config and its own ``VLLM_*`` variables, but not by ``VLLM_LOG_MOE``, and it picks the key
before Dynamo traces. A logged run and a plain one of the same model therefore share the key:
a logged run that loaded the plain run's graph would skip the routers' capture (a log of
stale rows), and a plain run that loaded the logged graph would run the capture. With the
variable set, a logged run neither loads nor saves a compiled model (it compiles afresh, as
its first start would anyway), and its key differs from a plain run's.
"""


def install() -> None:
    config = load_config()
    os.environ[COMPILE_CACHE_OFF] = "1"
    _when_imported(compat.WORKER_MODULE, lambda module: _patch_worker(module, config))
    _when_imported(shutdown.ENGINE_UTILS, shutdown.extend_abort_grace)


def _patch_worker(module: ModuleType, config: HookConfig) -> None:
    cls = compat.worker_class(module)
    if getattr(cls, "_moeprof_patched", False):
        return
    from moeprof.hook.collector import StepCollector

    load_model = getattr(cls, compat.LOAD_MODEL)
    execute_model = getattr(cls, compat.EXECUTE_MODEL)
    worker_shutdown = getattr(cls, compat.SHUTDOWN, None)

    @functools.wraps(load_model)
    def load_model_and_hook(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = load_model(self, *args, **kwargs)
        if getattr(self, "_moeprof", None) is None:
            self._moeprof = StepCollector.start(self, config)
            if self._moeprof is not None:
                self._moeprof_close = shutdown.close_on_stop(self._moeprof)
            _arm_after_warmup(type(self))
        return result

    @functools.wraps(execute_model)
    def execute_model_and_log(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        output = execute_model(self, scheduler_output, *args, **kwargs)
        collector = self.__dict__.get("_moeprof")
        if collector is not None:
            collector.after_step(scheduler_output)
        return output

    setattr(cls, compat.LOAD_MODEL, load_model_and_hook)
    setattr(cls, compat.EXECUTE_MODEL, execute_model_and_log)
    if worker_shutdown is not None:

        @functools.wraps(worker_shutdown)
        def shutdown_and_flush(self: Any, *args: Any, **kwargs: Any) -> Any:
            close = self.__dict__.get("_moeprof_close")
            if close is not None:
                close()  # bounded: see moeprof.hook.shutdown
            return worker_shutdown(self, *args, **kwargs)

        setattr(cls, compat.SHUTDOWN, shutdown_and_flush)
    cls._moeprof_patched = True  # type: ignore[attr-defined]


def _arm_after_warmup(cls: type) -> None:
    """Start logging once the engine's own warm-up is over.

    Warm-up steps can come through the worker's ``execute_model`` with made-up requests
    (Model Runner V2 runs ``_warmup_N_`` requests that way), so the collector only counts
    steps after ``compile_or_warm_up_model``, the last thing a worker does before serving.
    The method is patched on the worker's own class: the CPU worker overrides it.
    """
    warm_up = getattr(cls, compat.WARM_UP, None)
    if warm_up is None:
        raise compat.unsupported(f"{cls.__name__} has no {compat.WARM_UP}")
    if getattr(warm_up, "_moeprof_arms", False):
        return

    @functools.wraps(warm_up)
    def warm_up_then_arm(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = warm_up(self, *args, **kwargs)
        collector = self.__dict__.get("_moeprof")
        if collector is not None:
            collector.armed = True
        return result

    warm_up_then_arm._moeprof_arms = True  # type: ignore[attr-defined]
    setattr(cls, compat.WARM_UP, warm_up_then_arm)


def _when_imported(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Run ``patch(module)`` right after ``name`` is first imported (now, if it already is)."""
    if name in sys.modules:
        patch(sys.modules[name])
        return
    sys.meta_path.insert(0, _PatchOnImport(name, patch))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.patch = patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        patch = self.patch

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec
