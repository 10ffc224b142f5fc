"""Gloo adapter: torch's ProcessGroupGloo (a C++ c10d Backend) built from the store.

Used for CPU tensors when ranks span hosts (TCP), and whenever forced with
FLAGCX_CPU_ADAPTER=gloo. Ops run on Gloo's own threads; the handle waits on the Gloo
Work and turns its errors into FlagcxError.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch._C._distributed_c10d as c10d
from torch._C._distributed_c10d import ProcessGroupGloo

from ..errors import FlagcxError, FlagcxTimeout
from ..tensors import overlaps
from ..types import FLOAT_DTYPES, INT_DTYPES, ReduceOp
from .base import Adapter, AdapterContext, Capabilities, Handle

_GLOO_OPS = {
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.PROD: dist.ReduceOp.PRODUCT,
    ReduceOp.MAX: dist.ReduceOp.MAX,
    ReduceOp.MIN: dist.ReduceOp.MIN,
}


def translate_error(exc: BaseException, what: str, timeout: float) -> FlagcxError:
    """Map a torch/Gloo error to the flagcx hierarchy (timeouts become FlagcxTimeout)."""
    text = str(exc)
    lowered = text.lower()
    if "timed out" in lowered or "timeout" in lowered:
        return FlagcxTimeout(f"{what}: a peer did not arrive within {timeout:g} s ({text.strip()})")
    if "connection" in lowered or "closed" in lowered or "reset by peer" in lowered:
        return FlagcxError(f"{what}: a peer disconnected ({text.strip()})")
    return FlagcxError(f"{what}: {text.strip()}")


class GlooHandle(Handle):
    """A Gloo Work plus what must happen after it (copy-out for out-of-place ops)."""

    __slots__ = ("_work", "_what", "_timeout", "_after", "_finished")

    def __init__(self, work: dist.Work, what: str, timeout: float, after=None) -> None:
        self._work = work
        self._what = what
        self._timeout = timeout
        self._after = after
        self._finished = False

    def wait(self, timeout: Optional[float] = None) -> None:
        if self._finished:
            return
        limit = self._timeout if timeout is None else timeout
        try:
            self._work.wait(timedelta(seconds=limit))
        except FlagcxError:
            raise
        except Exception as exc:  # Gloo raises RuntimeError / DistBackendError
            raise translate_error(exc, self._what, limit) from exc
        if self._after is not None:
            self._after()
        self._finished = True

    def done(self) -> bool:
        return self._finished or self._work.is_completed()

    def source(self) -> int:
        return int(self._work._source_rank())


class GlooAdapter(Adapter):
    """Collectives over TCP through ProcessGroupGloo."""

    name = "gloo"
    capabilities = Capabilities(
        devices=frozenset({"cpu"}),
        reduce_dtypes=FLOAT_DTYPES | INT_DTYPES,
        reduce_ops=frozenset(_GLOO_OPS),
        any_source=True,
    )

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        if not dist.is_gloo_available():
            raise FlagcxError("this torch build has no Gloo; use another CPU adapter (FLAGCX_CPU_ADAPTER=shm)")
        try:
            self._pg = ProcessGroupGloo(ctx.store, ctx.rank, ctx.size, timedelta(seconds=ctx.timeout))
        except Exception as exc:
            raise translate_error(exc, f"creating the Gloo transport of {ctx.label}", ctx.timeout) from exc

    def _handle(self, work: dist.Work, what: str, after=None) -> GlooHandle:
        return GlooHandle(work, f"{what} on {self.ctx.label}", self.ctx.timeout, after)

    def allreduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        if send.data_ptr() != recv.data_ptr():
            recv.copy_(send)
        opts = c10d.AllreduceOptions()
        opts.reduceOp = _GLOO_OPS[op]
        return self._handle(self._pg.allreduce([recv], opts), "allreduce")

    def allgather(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        if overlaps(send, recv):
            send = send.clone()
        return self._handle(self._pg._allgather_base(recv, send, c10d.AllgatherOptions()), "allgather")

    def reducescatter(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        if overlaps(send, recv):
            send = send.clone()
        opts = c10d.ReduceScatterOptions()
        opts.reduceOp = _GLOO_OPS[op]
        return self._handle(self._pg._reduce_scatter_base(recv, send, opts), "reducescatter")

    def broadcast(self, tensor: torch.Tensor, root: int) -> Handle:
        opts = c10d.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        return self._handle(self._pg.broadcast([tensor], opts), "broadcast")

    def reduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, root: int) -> Handle:
        # Gloo reduces in place and may scribble on non-root buffers: work on a copy there.
        work_buf = recv if self.rank == root else torch.empty_like(send)
        if work_buf.data_ptr() != send.data_ptr():
            work_buf.copy_(send)
        opts = c10d.ReduceOptions()
        opts.reduceOp = _GLOO_OPS[op]
        opts.rootRank = root
        opts.rootTensor = 0
        return self._handle(self._pg.reduce([work_buf], opts), "reduce")

    def gather(self, send: torch.Tensor, recv: Optional[torch.Tensor], root: int) -> Handle:
        opts = c10d.GatherOptions()
        opts.rootRank = root
        outputs = [list(recv.chunk(self.size))] if self.rank == root else []
        if self.rank == root and recv.numel() == 0:
            outputs = [[recv.new_empty(0) for _ in range(self.size)]]
        return self._handle(self._pg.gather(outputs, [send], opts), "gather")

    def scatter(self, send: Optional[torch.Tensor], recv: torch.Tensor, root: int) -> Handle:
        opts = c10d.ScatterOptions()
        opts.rootRank = root
        inputs = [list(send.view(self.size, -1).unbind(0))] if self.rank == root else []
        return self._handle(self._pg.scatter([recv], inputs, opts), "scatter")

    def alltoall(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        if overlaps(send, recv):
            send = send.clone()
        return self._handle(self._pg.alltoall_base(recv, send, [], [], c10d.AllToAllOptions()), "alltoall")

    def alltoallv(self, send: torch.Tensor, send_counts: list[int], recv: torch.Tensor, recv_counts: list[int]) -> Handle:
        if overlaps(send, recv):
            send = send.clone()
        work = self._pg.alltoall_base(recv, send, list(recv_counts), list(send_counts), c10d.AllToAllOptions())
        return self._handle(work, "alltoallv")

    def send(self, tensor: torch.Tensor, peer: int) -> Handle:
        return self._handle(self._pg.send([tensor], peer, 0), f"send to {self.ctx.peer_name(peer)}")

    def recv(self, tensor: torch.Tensor, peer: Optional[int]) -> Handle:
        if peer is None:
            return self._handle(self._pg.recv_anysource([tensor], 0), "recv from any source")
        return self._handle(self._pg.recv([tensor], peer, 0), f"recv from {self.ctx.peer_name(peer)}")

    def barrier(self) -> Handle:
        return self._handle(self._pg.barrier(c10d.BarrierOptions()), "barrier")

    def abort(self) -> None:
        try:
            self._pg.abort()
        except Exception:  # already broken: nothing more to release
            pass

    def close(self) -> None:
        try:
            self._pg.shutdown()
        except Exception:
            pass

