"""vLLM platforms that run vLLM's device groups on flagcx: vLLM's own CPU or CUDA platform with two changes.

``dist_backend = "flagcx"`` makes every GroupCoordinator's ``device_group`` a flagcx
process group, and ``get_device_communicator_cls`` names flagcx's communicators
(:mod:`.communicator`). On CUDA, ``check_and_update_config`` also turns vLLM's custom
all-reduce off, so that flagcx carries the traffic.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from vllm.platforms.cpu import CpuPlatform

import flagcx  # noqa: F401  (registers backend "flagcx" in every vLLM process that resolves the platform)


class FlagcxCpuPlatform(CpuPlatform):
    """vLLM's CPU platform with its device groups on flagcx."""

    dist_backend: str = "flagcx"

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        return "flagcx.integrations.vllm.communicator.FlagcxCpuCommunicator"


@cache
def _cuda_platform() -> type:
    from vllm.platforms.cuda import CudaPlatform

    class FlagcxCudaPlatform(CudaPlatform):
        """vLLM's CUDA platform with its device groups on flagcx and vLLM's custom all-reduce off."""

        dist_backend: str = "flagcx"

        @classmethod
        def get_device_communicator_cls(cls) -> str:
            return "flagcx.integrations.vllm.platform.FlagcxCudaCommunicator"

        @classmethod
        def check_and_update_config(cls, vllm_config: Any) -> None:
            super().check_and_update_config(vllm_config)
            vllm_config.parallel_config.disable_custom_all_reduce = True

    return FlagcxCudaPlatform


def __getattr__(name: str) -> Any:
    """``FlagcxCudaPlatform`` / ``FlagcxCudaCommunicator`` are built on first use: vLLM's CUDA modules import only where CUDA is."""
    if name == "FlagcxCudaPlatform":
        return _cuda_platform()
    if name == "FlagcxCudaCommunicator":
        from .communicator import cuda_communicator_class

        return cuda_communicator_class()
    raise AttributeError(name)
