"""The ``vllm`` backend: vLLM's own CPU communicator, as its tensor-parallel group runs it (where vLLM is installed).

The ranks build vLLM's distributed state the way its CPU workers do (a Gloo world,
``initialize_model_parallel`` with the whole job as one tensor-parallel group), so the
TP group's device communicator is vLLM's ``CpuCommunicator`` over its C++
shared-memory kernels. Timed: ``all_reduce`` (in place, as vLLM calls it) and
``all_gather`` (out of place: vLLM returns a new tensor, copied into the benchmark's
buffer). vLLM's kernels reduce float32, bfloat16 and float16 with SUM; the other
collectives, dtypes and ops are reported as not supported. Run it from the vLLM venv
(``bash .ci/vllm`` builds one), e.g. ``flagcx-bench allreduce -b 1K -e 8M -f 8
--nproc 2 --compare flagcx,vllm``; set ``VLLM_CPU_OMP_THREADS_BIND`` as vLLM's CPU
workers need it.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..errors import NotSupported
from .colls import Buffers, Collective
from .interface import Backend, Prepared

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class VllmBackend(Backend):
    """vLLM's tensor-parallel device communicator on CPU ranks."""

    name = "vllm"

    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device, timeout: float) -> None:
        super().__init__(store, rank, size, device, timeout)
        if device.type != "cpu":
            raise NotSupported("the vllm backend runs vLLM's CPU communicator; use --device cpu")
        try:
            import vllm._custom_ops  # noqa: F401  (vLLM's C++ ops, its shared-memory collectives among them)
            from vllm.config import VllmConfig, set_current_vllm_config
            from vllm.distributed import parallel_state
        except ImportError as exc:
            raise NotSupported(f"vLLM is not importable here ({exc}); run from the vLLM venv (bash .ci/vllm builds one)") from exc
        self._ps = parallel_state
        if rank == 0:  # vLLM names its shared-memory segments after this: one value for the job
            store.set("vllm/ident", f"flagcx-bench-{os.getpid()}-{os.urandom(4).hex()}")
        os.environ["VLLM_DIST_IDENT"] = store.get("vllm/ident").decode()
        if not dist.is_initialized():  # vLLM's CPU workers run a Gloo world; the bench's store carries it
            dist.init_process_group("gloo", store=dist.PrefixStore("vllm-world/", store), rank=rank, world_size=size)
        self._config = set_current_vllm_config(VllmConfig())
        self._config.__enter__()
        parallel_state.init_distributed_environment(world_size=size, rank=rank, distributed_init_method="env://", local_rank=rank, backend="gloo")
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=size)
        self.comm: Any = parallel_state.get_tp_group().device_communicator

    def describe(self) -> str:
        import vllm

        return f"vllm {vllm.__version__} ({type(self.comm).__name__}, {type(getattr(self.comm, 'dist_module', None)).__name__})"

    def prepare(self, coll: Collective, bufs: Buffers, op: str, root: int) -> Optional[Prepared]:
        comm, name = self.comm, coll.name
        if name not in ("allreduce", "allgather"):
            raise NotSupported(f"vLLM's CPU communicator has no {name} to time here (all_reduce and all_gather only)")
        if bufs.send.dtype not in _DTYPES:
            raise NotSupported(f"vLLM's CPU kernels take float32, bfloat16 and float16, not {bufs.send.dtype}")
        if name == "allreduce":
            if op != "sum":
                raise NotSupported(f"vLLM's all_reduce sums; no {op}")
            if not bufs.inplace:
                return None  # vLLM reduces in place
            t = bufs.recv
            return Prepared(lambda: comm.all_reduce(t), t)
        if bufs.inplace:
            return None  # vLLM's all_gather returns a new tensor
        send, recv = bufs.send, bufs.recv

        def all_gather() -> None:
            recv.copy_(comm.all_gather(send, 0))

        return Prepared(all_gather, recv)

    def close(self) -> None:
        self._ps.destroy_model_parallel()
        self._ps.destroy_distributed_environment()
        self._config.__exit__(None, None, None)
