"""The ``mpi`` backend: mpi4py on numpy views of the benchmark's CPU tensors.

Data-movement collectives move bytes (any dtype); reductions need a numpy dtype that
MPI can reduce (no bfloat16) and one of MPI's ops (no AVG). In-place modes use
``MPI.IN_PLACE``; in-place reducescatter leaves the result at the start of the buffer
(MPI's layout), which is what validation reads.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..errors import NotSupported
from ..tensors import as_bytes
from .colls import Buffers, Collective
from .interface import Backend, Prepared


def library_version() -> str:
    """MPI_Get_library_version's first line up to its first comma ('MPICH Version: 5.0.2', 'Open MPI v4.1.6')."""
    from mpi4py import MPI

    first = MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0]
    return " ".join(first.split(",")[0].split())


class MpiBackend(Backend):
    """MPI through mpi4py (the job runs under mpiexec)."""

    name = "mpi"

    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device, timeout: float) -> None:
        super().__init__(store, rank, size, device, timeout)
        from mpi4py import MPI

        self.MPI = MPI
        world = MPI.COMM_WORLD
        if world.Get_size() != size or world.Get_rank() != rank:
            raise NotSupported(
                f"MPI rank {world.Get_rank()}/{world.Get_size()} differs from the job's rank {rank}/{size}; start every rank under one mpiexec",
                op="init",
                rank=rank,
            )
        self.comm = world.Dup()
        self._ops = {"sum": MPI.SUM, "prod": MPI.PROD, "min": MPI.MIN, "max": MPI.MAX}

    def describe(self) -> str:
        import mpi4py

        return f"mpi ({library_version()}, mpi4py {mpi4py.__version__})"

    def _typed(self, t: torch.Tensor) -> np.ndarray:
        if t.dtype == torch.bfloat16:
            raise NotSupported("MPI has no bfloat16 reduction (numpy has no bfloat16)")
        return t.numpy()

    def prepare(self, coll: Collective, bufs: Buffers, op: str, root: int) -> Optional[Prepared]:
        MPI, comm, rank, name = self.MPI, self.comm, self.rank, coll.name
        if coll.reduces:
            if op not in self._ops:
                raise NotSupported(f"MPI has no {op} reduction")
            mop = self._ops[op]
            s, r = self._typed(bufs.send), self._typed(bufs.recv)
        else:
            s, r = as_bytes(bufs.send).numpy(), as_bytes(bufs.recv).numpy()
        ip, is_root = bufs.inplace, rank == root
        if name == "allreduce":
            return Prepared(lambda: comm.Allreduce(MPI.IN_PLACE if ip else s, r, mop), bufs.recv)
        if name == "allgather":
            return Prepared(lambda: comm.Allgather(MPI.IN_PLACE if ip else s, r), bufs.recv)
        if name == "reducescatter":
            if ip:
                head = bufs.send[: bufs.block]
                return Prepared(lambda: comm.Reduce_scatter_block(MPI.IN_PLACE, s, mop), head)
            return Prepared(lambda: comm.Reduce_scatter_block(s, r, mop), bufs.recv)
        if name == "broadcast":
            if ip:
                return Prepared(lambda: comm.Bcast(r, root), bufs.recv)

            def broadcast() -> None:
                if is_root:
                    r[:] = s
                comm.Bcast(r, root)

            return Prepared(broadcast, bufs.recv)
        if name == "reduce":
            if ip:
                src = MPI.IN_PLACE if is_root else r
                return Prepared(lambda: comm.Reduce(src, r if is_root else None, mop, root), bufs.recv)
            return Prepared(lambda: comm.Reduce(s, r if is_root else None, mop, root), bufs.recv)
        if name == "gather":
            src = MPI.IN_PLACE if ip and is_root else s
            return Prepared(lambda: comm.Gather(src, r if is_root else None, root), bufs.recv)
        if name == "scatter":
            dst = MPI.IN_PLACE if ip and is_root else r
            return Prepared(lambda: comm.Scatter(s if is_root else None, dst, root), bufs.recv)
        if name == "alltoall":
            return Prepared(lambda: comm.Alltoall(MPI.IN_PLACE if ip else s, r), bufs.recv)
        if name == "sendrecv":
            nxt, prv = (rank + 1) % self.size, (rank - 1) % self.size
            if ip:
                return Prepared(lambda: comm.Sendrecv_replace(r, nxt, source=prv), bufs.recv)
            return Prepared(lambda: comm.Sendrecv(s, nxt, recvbuf=r, source=prv), bufs.recv)
        raise ValueError(f"unknown collective {name}")

    def close(self) -> None:
        self.comm.Free()
