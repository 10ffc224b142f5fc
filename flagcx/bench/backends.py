"""The libraries under test, each behind one small interface for the shared timing loop.

``flagcx``: flagcx.Communicator (engine API). ``gloo``: a raw ProcessGroupGloo and
``nccl``: a raw ProcessGroupNCCL, both called directly (method + ``wait()``, no
torch.distributed wrapper). ``mpi`` lives in :mod:`flagcx.bench.mpi`, ``vllm`` (vLLM's
CPU communicator, where vLLM is installed) in :mod:`flagcx.bench.vllm`.

Each implements :class:`~.interface.Backend`; :func:`make_backend` builds one by name.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Optional

import torch
import torch._C._distributed_c10d as c10d
import torch.distributed as dist

from ..errors import NotSupported
from .colls import Buffers, Collective
from .interface import Backend, Prepared


class FlagcxBackend(Backend):
    """flagcx.Communicator through its engine API."""

    name = "flagcx"

    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device, timeout: float) -> None:
        super().__init__(store, rank, size, device, timeout)
        from ..core.communicator import Communicator

        self.comm = Communicator(dist.PrefixStore("flagcx/", store), rank, size, timeout=timeout, name="flagcx-bench")

    def describe(self) -> str:
        from .. import __version__

        return f"flagcx {__version__} (CPU adapter {self.comm.adapter_name('cpu')})"

    def prepare(self, coll: Collective, bufs: Buffers, op: str, root: int) -> Optional[Prepared]:
        comm, send, recv, rank = self.comm, bufs.send, bufs.recv, self.rank
        name = coll.name
        if name == "allreduce":
            if bufs.inplace:
                return Prepared(lambda: comm.all_reduce(recv, op), recv)
            return Prepared(lambda: comm.all_reduce(send, op, out=recv), recv)
        if name == "allgather":
            return Prepared(lambda: comm.all_gather(recv, send), recv)
        if name == "reducescatter":
            return Prepared(lambda: comm.reduce_scatter(recv, send, op), recv)
        if name == "broadcast":
            if bufs.inplace:
                return Prepared(lambda: comm.broadcast(recv, root), recv)

            def broadcast() -> None:
                if rank == root:
                    recv.copy_(send)
                comm.broadcast(recv, root)

            return Prepared(broadcast, recv)
        if name == "reduce":
            if bufs.inplace:
                return Prepared(lambda: comm.reduce(recv, root, op), recv)
            return Prepared(lambda: comm.reduce(send, root, op, out=recv), recv)
        if name == "gather":
            out = recv if rank == root else None
            return Prepared(lambda: comm.gather(send, out, root), recv)
        if name == "scatter":
            src = send if rank == root else None
            return Prepared(lambda: comm.scatter(recv, src, root), recv)
        if name == "alltoall":
            return Prepared(lambda: comm.all_to_all(recv, send), recv)
        if name == "sendrecv":
            if bufs.inplace:
                return None
            nxt, prv = self._peers()

            def sendrecv() -> None:
                comm.group_start()
                try:
                    comm.send(send, nxt)
                    comm.recv(recv, prv)
                finally:
                    work = comm.group_end()
                work.wait()

            return Prepared(sendrecv, recv)
        raise ValueError(f"unknown collective {name}")

    def close(self) -> None:
        self.comm.destroy()


def _blocks(t: torch.Tensor, block: int, n: int) -> list[torch.Tensor]:
    return [t[i * block : (i + 1) * block] for i in range(n)]


_C10D_OPS = {
    "sum": dist.ReduceOp.SUM,
    "prod": dist.ReduceOp.PRODUCT,
    "min": dist.ReduceOp.MIN,
    "max": dist.ReduceOp.MAX,
    "avg": dist.ReduceOp.AVG,
}


class _C10dBackend(Backend):
    """A raw c10d backend object (ProcessGroupGloo / ProcessGroupNCCL) called directly."""

    inplace: frozenset[str] = frozenset({"allreduce", "broadcast", "reduce"})
    """Collectives whose API has NCCL's in-place form on this backend."""

    pg: Any
    """The c10d backend under test (its ops are C++ bindings without type stubs)."""

    def _check(self, coll: Collective, dtype: torch.dtype, op: str) -> None:
        """Raise NotSupported for combinations known to fail (the warm-up call catches the rest)."""

    def _sendrecv(self, send: torch.Tensor, recv: torch.Tensor, nxt: int, prv: int) -> None:
        ws = self.pg.send([send], nxt, 0)
        wr = self.pg.recv([recv], prv, 0)
        ws.wait()
        wr.wait()

    def prepare(self, coll: Collective, bufs: Buffers, op: str, root: int) -> Optional[Prepared]:
        pg, send, recv, rank, n = self.pg, bufs.send, bufs.recv, self.rank, self.size
        name = coll.name
        self._check(coll, send.dtype, op)
        if bufs.inplace and name not in self.inplace:
            return None
        if name == "allreduce":
            ar = c10d.AllreduceOptions()
            ar.reduceOp = _C10D_OPS[op]
            if bufs.inplace:
                return Prepared(lambda: pg.allreduce([recv], ar).wait(), recv)

            def allreduce() -> None:
                recv.copy_(send)
                pg.allreduce([recv], ar).wait()

            return Prepared(allreduce, recv)
        if name == "allgather":
            ag = c10d.AllgatherOptions()
            return Prepared(lambda: pg._allgather_base(recv, send, ag).wait(), recv)
        if name == "reducescatter":
            rs = c10d.ReduceScatterOptions()
            rs.reduceOp = _C10D_OPS[op]
            return Prepared(lambda: pg._reduce_scatter_base(recv, send, rs).wait(), recv)
        if name == "broadcast":
            bc = c10d.BroadcastOptions()
            bc.rootRank = root
            bc.rootTensor = 0
            if bufs.inplace:
                return Prepared(lambda: pg.broadcast([recv], bc).wait(), recv)

            def broadcast() -> None:
                if rank == root:
                    recv.copy_(send)
                pg.broadcast([recv], bc).wait()

            return Prepared(broadcast, recv)
        if name == "reduce":
            rd = c10d.ReduceOptions()
            rd.reduceOp = _C10D_OPS[op]
            rd.rootRank = root
            rd.rootTensor = 0
            if bufs.inplace:
                return Prepared(lambda: pg.reduce([recv], rd).wait(), recv)

            def reduce() -> None:
                recv.copy_(send)
                pg.reduce([recv], rd).wait()

            return Prepared(reduce, recv)
        if name == "gather":
            ga = c10d.GatherOptions()
            ga.rootRank = root
            outs = [_blocks(recv, bufs.block, n)] if rank == root else []
            return Prepared(lambda: pg.gather(outs, [send], ga).wait(), recv)
        if name == "scatter":
            sc = c10d.ScatterOptions()
            sc.rootRank = root
            ins = [_blocks(send, bufs.block, n)] if rank == root else []
            return Prepared(lambda: pg.scatter([recv], ins, sc).wait(), recv)
        if name == "alltoall":
            aa = c10d.AllToAllOptions()
            return Prepared(lambda: pg.alltoall_base(recv, send, [], [], aa).wait(), recv)
        if name == "sendrecv":
            nxt, prv = self._peers()
            return Prepared(lambda: self._sendrecv(send, recv, nxt, prv), recv)
        raise ValueError(f"unknown collective {name}")

    def close(self) -> None:
        try:
            self.pg.shutdown()
        except Exception:  # torn down already
            pass


class GlooBackend(_C10dBackend):
    """torch's ProcessGroupGloo on CPU tensors."""

    name = "gloo"

    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device, timeout: float) -> None:
        super().__init__(store, rank, size, device, timeout)
        self.pg = c10d.ProcessGroupGloo(dist.PrefixStore("gloo/", store), rank, size, timedelta(seconds=timeout))

    def describe(self) -> str:
        return f"gloo (torch {torch.__version__} ProcessGroupGloo)"

    def _check(self, coll: Collective, dtype: torch.dtype, op: str) -> None:
        if dtype in (torch.uint32, torch.uint64):
            raise NotSupported(f"ProcessGroupGloo has no {dtype} tensors")
        if coll.reduces and op == "avg" and not dtype.is_floating_point:
            raise NotSupported(f"ProcessGroupGloo computes AVG on floating dtypes only, not {dtype}")


class NcclBackend(_C10dBackend):
    """torch's ProcessGroupNCCL on CUDA tensors (GPU local_rank)."""

    name = "nccl"
    inplace = frozenset({"allreduce", "broadcast", "reduce", "allgather", "reducescatter"})

    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device, timeout: float) -> None:
        super().__init__(store, rank, size, device, timeout)
        if not dist.is_nccl_available() or not torch.cuda.is_available():
            raise NotSupported("this torch build has no NCCL or no GPU; use --backend flagcx/gloo/mpi on CPU", op="init", rank=rank)
        self.pg = c10d.ProcessGroupNCCL(dist.PrefixStore("nccl/", store), rank, size, timedelta(seconds=timeout))

    def describe(self) -> str:
        version = ".".join(str(v) for v in torch.cuda.nccl.version())
        return f"nccl {version} (torch {torch.__version__} ProcessGroupNCCL)"

    def _check(self, coll: Collective, dtype: torch.dtype, op: str) -> None:
        # Rejected up front: seen with torch 2.11, after ProcessGroupNCCL raised for uint32
        # inside scatter, later NCCL results of the process (any library) came out wrong.
        if dtype in (torch.uint32, torch.uint64):
            raise NotSupported(f"ProcessGroupNCCL has no {dtype} tensors")

    def _sendrecv(self, send: torch.Tensor, recv: torch.Tensor, nxt: int, prv: int) -> None:
        # Launch both together, or two ranks that both send first wait on each other.
        self.pg._start_coalescing()
        try:
            self.pg.send([send], nxt, 0)
            self.pg.recv([recv], prv, 0)
        finally:
            work = self.pg._end_coalescing()
        work.wait()


def make_backend(name: str, store: dist.Store, rank: int, size: int, device: torch.device, timeout: float) -> Backend:
    """Build backend ``name`` on the job's store (every rank calls this in the same order)."""
    if name == "flagcx":
        return FlagcxBackend(store, rank, size, device, timeout)
    if name == "gloo":
        return GlooBackend(store, rank, size, device, timeout)
    if name == "nccl":
        return NcclBackend(store, rank, size, device, timeout)
    if name == "mpi":
        from .mpi import MpiBackend

        return MpiBackend(store, rank, size, device, timeout)
    if name == "vllm":
        from .vllm import VllmBackend

        return VllmBackend(store, rank, size, device, timeout)
    raise ValueError(f"unknown backend {name!r}")
