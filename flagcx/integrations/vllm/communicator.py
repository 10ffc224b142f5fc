"""vLLM device communicators over flagcx: the hot collectives of a GroupCoordinator go to the group's Communicator.

``all_reduce``, ``all_gather``, ``reduce_scatter`` and the uneven ``all_gatherv`` /
``reduce_scatterv`` that vLLM's data- and expert-parallel paths call are one
:class:`flagcx.Communicator` call each (no c10d dispatch in between); gather, broadcast,
send and recv stay on the process group (also flagcx). :class:`FlagcxCpuCommunicator` is
vLLM's CPU communicator without its shared-memory kernel (its all-to-all manager for
expert parallelism stays). :class:`FlagcxCudaCommunicator` is vLLM's CUDA communicator
(CUDA graph capture checks for that class) routing the same collectives to flagcx on the
current stream; vLLM's custom all-reduce engines are switched off by the platform.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Optional, Union

import torch
from vllm.distributed.device_communicators.base_device_communicator import DeviceCommunicatorBase
from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

from ...core.communicator import Communicator
from ...errors import invalid
from ...frontends.process_group import communicator_of


class FlagcxCollectives:
    """The collectives vLLM's GroupCoordinator calls most, as Communicator calls (mixed into the device communicators)."""

    comm: Communicator
    world_size: int
    rank_in_group: int

    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        self.comm.all_reduce(input_)
        return input_

    def all_gather(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if dim < 0:
            dim += input_.dim()
        size = input_.size()
        out = torch.empty((size[0] * self.world_size,) + size[1:], dtype=input_.dtype, device=input_.device)
        self.comm.all_gather(out, input_.contiguous())
        out = out.reshape((self.world_size,) + size).movedim(0, dim)
        return out.reshape(size[:dim] + (self.world_size * size[dim],) + size[dim + 1 :])

    def reduce_scatter(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return input_
        if dim < 0:
            dim += input_.dim()
        rows = input_.movedim(0, dim).contiguous()
        if rows.shape[0] % self.world_size:
            raise invalid(
                "reduce_scatter",
                self.rank_in_group,
                "input_",
                f"dim {dim} of {tuple(input_.shape)} is not divisible by {self.world_size}",
                "use reduce_scatterv with sizes",
            )
        out = torch.empty((rows.shape[0] // self.world_size,) + rows.shape[1:], dtype=rows.dtype, device=rows.device)
        self.comm.reduce_scatter(out, rows)
        return out.movedim(0, dim).contiguous()

    def all_gatherv(
        self, input_: Union[torch.Tensor, list[torch.Tensor]], dim: int = 0, sizes: Optional[list[int]] = None
    ) -> Union[torch.Tensor, list[torch.Tensor]]:
        if dim != 0:
            raise invalid("all_gatherv", self.rank_in_group, "dim", f"is {dim}", "gather along dim 0 (as vLLM's CUDA communicator requires)")
        if isinstance(input_, torch.Tensor):
            return self._gatherv_one(input_, sizes)
        return [self._gatherv_one(t, sizes) for t in input_]

    def _gatherv_one(self, input_: torch.Tensor, sizes: Optional[list[int]]) -> torch.Tensor:
        if sizes is None or all(s == sizes[0] for s in sizes):
            return self.all_gather(input_, 0)
        self._check_sizes("all_gatherv", input_, sizes)
        out = torch.empty((sum(sizes),) + input_.shape[1:], dtype=input_.dtype, device=input_.device)
        self.comm.all_gather(list(out.split(sizes)), input_.contiguous())
        return out

    def reduce_scatterv(self, input_: torch.Tensor, dim: int = -1, sizes: Optional[list[int]] = None) -> torch.Tensor:
        if sizes is None or all(s == sizes[0] for s in sizes):
            return self.reduce_scatter(input_, dim)
        if dim < 0:
            dim += input_.dim()
        rows = input_.movedim(0, dim).contiguous()
        if len(sizes) != self.world_size or rows.shape[0] != sum(sizes):
            raise invalid(
                "reduce_scatterv",
                self.rank_in_group,
                "sizes",
                f"{sizes} do not split dim {dim} of {tuple(input_.shape)} over {self.world_size} ranks",
                "pass one size per rank summing to that dim",
            )
        # uneven blocks: reduce everything, keep this rank's rows (the same sums every rank computes); on a copy,
        # since movedim(0, 0).contiguous() is the caller's own tensor and reduce_scatterv leaves its input alone
        rows = rows.clone() if rows.data_ptr() == input_.data_ptr() else rows
        self.comm.all_reduce(rows)
        start = sum(sizes[: self.rank_in_group])
        return rows[start : start + sizes[self.rank_in_group]].movedim(0, dim).contiguous()

    def _check_sizes(self, op: str, input_: torch.Tensor, sizes: list[int]) -> None:
        if len(sizes) != self.world_size or input_.shape[0] != sizes[self.rank_in_group]:
            raise invalid(
                op,
                self.rank_in_group,
                "sizes",
                f"{sizes} do not match this rank's {input_.shape[0]} rows over {self.world_size} ranks",
                "pass every rank's row count, in rank order",
            )


class FlagcxCpuCommunicator(FlagcxCollectives, CpuCommunicator):
    """vLLM's CPU communicator on flagcx: the collectives above, vLLM's all-to-all manager, the rest through the group."""

    def __init__(
        self,
        cpu_group: Any,
        device: Optional[torch.device] = None,
        device_group: Any = None,
        unique_name: str = "",
        use_all2all: bool = False,
    ) -> None:
        DeviceCommunicatorBase.__init__(self, cpu_group, device, device_group, unique_name, use_all2all=use_all2all)
        self.comm = communicator_of(device_group)
        self.dist_module = torch.distributed
        self.supports_tensor_dict = False
        if self.use_all2all:
            from vllm.distributed.device_communicators.all2all import AgRsAll2AllManager

            self.all2all_manager = AgRsAll2AllManager(self.cpu_group)


@cache
def cuda_communicator_class() -> type:
    """FlagcxCudaCommunicator, built on first use (vLLM's CUDA communicator imports CUDA-only modules)."""
    from vllm.distributed.device_communicators.cuda_communicator import CudaCommunicator

    class FlagcxCudaCommunicator(FlagcxCollectives, CudaCommunicator):
        """vLLM's CUDA communicator (graph capture checks for it) with the collectives above on flagcx, on the current stream."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            CudaCommunicator.__init__(self, *args, **kwargs)
            self.comm = communicator_of(self.device_group)

    return FlagcxCudaCommunicator


__all__ = ["FlagcxCollectives", "FlagcxCpuCommunicator", "cuda_communicator_class"]
