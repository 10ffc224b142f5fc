"""Gloo adapter: torch's ProcessGroupGloo (a C++ c10d Backend) built from the store.

Used for CPU tensors when ranks span hosts (TCP), and whenever forced with
FLAGCX_CPU_ADAPTER=gloo. Ops run on Gloo's own threads; the handle waits on the Gloo
Work and turns its errors into FlagcxError. After any failed op the adapter refuses
further calls (Gloo's pairs may be out of step: a later op could match the wrong
peer's data), and a failed collective names its missing peers through a roll call in
the store (:class:`flagcx.bootstrap.PeerReport`); only a caller's wait shorter than the
timeout that expires on a collective still running is not a failure (wait again).
``close`` and ``abort`` drop the ProcessGroupGloo, whose destructor joins Gloo's
threads and closes its sockets.

Interface: FLAGCX_SOCKET_IFNAME picks the one Gloo binds to; else GLOO_SOCKET_IFNAME
(torch's own variable) or the address the hostname resolves to; when that is loopback
or nothing (Debian's ``127.0.1.1 host`` line, a container without DNS), the address of
the route to the store's host, so that ranks on other hosts can connect.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Optional

import torch
import torch._C._distributed_c10d as c10d
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroupGloo

from ..bootstrap import PeerReport, hostname_address, route_address, select_interface
from ..config import get as get_config
from ..errors import Cause, CommAborted, FlagcxError, FlagcxTimeout, InvalidArgument, RemoteError
from ..tensors import overlaps
from ..types import FLOAT_DTYPES, INT_DTYPES, ReduceOp
from .base import Adapter, AdapterContext, Capabilities, Handle

log = logging.getLogger("flagcx.gloo")

_GLOO_OPS = {
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.PROD: dist.ReduceOp.PRODUCT,
    ReduceOp.MAX: dist.ReduceOp.MAX,
    ReduceOp.MIN: dist.ReduceOp.MIN,
}


def _gloo_cause(exc: BaseException) -> Optional[Cause]:
    """What a torch/Gloo error means (its text is all Gloo gives)."""
    lowered = str(exc).lower()
    if "timed out" in lowered or "timeout" in lowered:
        return Cause.TIMEOUT
    if "connection" in lowered or "closed" in lowered or "reset by peer" in lowered:
        return Cause.DISCONNECTED
    return None


def translate_error(
    exc: BaseException, what: str, timeout: float, rank: Optional[int] = None, peers: str = "", blamed: tuple[int, ...] = (), comm: Optional[str] = None
) -> FlagcxError:
    """Map a torch/Gloo error to the flagcx hierarchy (FlagcxTimeout, RemoteError for a lost peer); ``peers`` names the missing ones, ``blamed`` lists them."""
    text = str(exc).strip()
    note = f"; {peers}" if peers else ""
    cause = _gloo_cause(exc)
    if cause is Cause.TIMEOUT:
        return FlagcxTimeout(f"{what}: a peer did not arrive within {timeout:g} s ({text}){note}", rank=rank, peers=blamed, cause=cause, comm=comm)
    if cause is Cause.DISCONNECTED:
        return RemoteError(f"{what}: a peer disconnected ({text}){note}", rank=rank, peers=blamed, cause=cause, comm=comm)
    return FlagcxError(f"{what}: {text}{note}", rank=rank, peers=blamed, comm=comm)


def _store_host(store) -> Optional[str]:
    """Host of the TCPStore under ``store``'s prefixes (None for other stores)."""
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store.host if isinstance(store, dist.TCPStore) else None


def gloo_device(ctx: AdapterContext) -> Optional[ProcessGroupGloo.Device]:
    """The Gloo device (interface) to bind, or None for torch's default (see the module docstring)."""
    spec = get_config().socket_ifname
    if spec:
        name, addr = select_interface(spec, op=f"creating the Gloo transport of {ctx.label}", rank=ctx.rank)
        log.info("%s: rank %d binds Gloo to %s (%s) from FLAGCX_SOCKET_IFNAME", ctx.label, ctx.rank, name, addr)
        return ProcessGroupGloo.create_device(interface=name)
    if os.environ.get("GLOO_SOCKET_IFNAME") or hostname_address() is not None:
        return None
    host = _store_host(ctx.store)
    addr = route_address(host) if host else None
    if addr is None or addr.startswith("127."):
        return None
    log.info("%s: rank %d binds Gloo to %s, its route to the store at %s (the hostname gives no routable address)", ctx.label, ctx.rank, addr, host)
    return ProcessGroupGloo.create_device(hostname=addr)


class GlooHandle(Handle):
    """A Gloo Work; a failed wait is its adapter's failure (see GlooAdapter._failure)."""

    __slots__ = ("_work", "_what", "_timeout", "_finished", "_adapter", "_collective", "_error")

    def __init__(self, work: dist.Work, what: str, adapter: GlooAdapter, collective: bool) -> None:
        self._work = work
        self._what = what
        self._timeout = adapter.ctx.timeout
        self._finished = False
        self._adapter = adapter
        self._collective = collective
        self._error: Optional[FlagcxError] = None

    def wait(self, timeout: Optional[float] = None) -> None:
        if self._finished:
            return
        if self._error is not None:
            raise self._error
        limit = self._timeout if timeout is None else timeout
        try:
            self._work.wait(timedelta(seconds=limit))
        except Exception as exc:  # Gloo raises RuntimeError / DistBackendError
            if timeout is not None and timeout < self._timeout and not self._work.is_completed():
                # only the caller's shorter wait expired: the op goes on and may be waited for again
                raise translate_error(exc, self._what, limit, self._adapter.rank) from exc
            self._work = None  # the Work holds Gloo's connections open: release them before the roll call
            self._error = self._adapter._failure(exc, self._what, limit, self._collective)
            raise self._error from exc
        self._finished = True

    def done(self) -> bool:
        return self._finished or self._work is None or self._work.is_completed()

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
        timeout = timedelta(seconds=ctx.timeout)
        self._backend: Optional[ProcessGroupGloo] = None
        self._broken: Optional[str] = None
        self._peers = PeerReport(ctx.store, ctx.rank, ctx.size, ctx.timeout, ctx.peer_name)
        try:
            device = gloo_device(ctx)
            if device is None:
                self._backend = ProcessGroupGloo(ctx.store, ctx.rank, ctx.size, timeout)
            else:
                opts = ProcessGroupGloo._Options()
                opts._devices = [device]
                opts._timeout = timeout
                opts._threads = 2
                self._backend = ProcessGroupGloo(ctx.store, ctx.rank, ctx.size, opts)
        except InvalidArgument:
            raise
        except Exception as exc:
            report = self._peers.explain()
            raise translate_error(exc, f"creating the Gloo transport of {ctx.label}", ctx.timeout, ctx.rank, report, self._peers.blamed, ctx.label) from exc

    @property
    def _pg(self) -> Any:
        """The Gloo backend; CommAborted once an op failed or the adapter was closed."""
        pg = self._backend
        if pg is None or self._broken is not None:
            raise CommAborted(self._broken or f"the Gloo transport of {self.ctx.label} is closed; create a new communicator", rank=self.rank)
        return pg

    def _failure(self, exc: BaseException, what: str, limit: float, collective: bool) -> FlagcxError:
        """The FlagcxError for a failed op (naming the missing peers of a collective).

        The adapter is unusable afterwards and drops its backend at once: its sockets
        close, so peers blocked on this rank fail now instead of at their timeout.
        """
        if self._broken is None:
            self._broken = f"the Gloo transport of {self.ctx.label} is unusable after '{what}' failed; abort this communicator and create a new one"
            self.abort()
        if not collective:
            return translate_error(exc, what, limit, self.rank, comm=self.ctx.label)
        report = self._peers.explain("timed out" if _gloo_cause(exc) is Cause.TIMEOUT else "failed")
        return translate_error(exc, what, limit, self.rank, report, self._peers.blamed, self.ctx.label)

    def _post(self, start: Callable[[ProcessGroupGloo], dist.Work], what: str, collective: bool = True) -> GlooHandle:
        """Start an op (``start(pg)`` returns its Work); failing to start it (a peer already gone) is the op's failure."""
        what = f"{what} on {self.ctx.label}"
        pg = self._pg
        try:
            work = start(pg)
        except Exception as exc:
            raise self._failure(exc, what, self.ctx.timeout, collective) from exc
        return GlooHandle(work, what, self, collective)

    def allreduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        if send.data_ptr() != recv.data_ptr():
            recv.copy_(send)
        opts = c10d.AllreduceOptions()
        opts.reduceOp = _GLOO_OPS[op]
        return self._post(lambda pg: pg.allreduce([recv], opts), "allreduce")

    def allgather(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        if overlaps(send, recv):
            send = send.clone()
        return self._post(lambda pg: pg._allgather_base(recv, send, c10d.AllgatherOptions()), "allgather")

    def reducescatter(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        if overlaps(send, recv):
            send = send.clone()
        opts = c10d.ReduceScatterOptions()
        opts.reduceOp = _GLOO_OPS[op]
        return self._post(lambda pg: pg._reduce_scatter_base(recv, send, opts), "reducescatter")

    def broadcast(self, tensor: torch.Tensor, root: int) -> Handle:
        opts = c10d.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        return self._post(lambda pg: pg.broadcast([tensor], opts), "broadcast")

    def reduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, root: int) -> Handle:
        # Gloo reduces in place and may scribble on non-root buffers: work on a copy there.
        work_buf = recv if self.rank == root else torch.empty_like(send)
        if work_buf.data_ptr() != send.data_ptr():
            work_buf.copy_(send)
        opts = c10d.ReduceOptions()
        opts.reduceOp = _GLOO_OPS[op]
        opts.rootRank = root
        opts.rootTensor = 0
        return self._post(lambda pg: pg.reduce([work_buf], opts), "reduce")

    def gather(self, send: torch.Tensor, recv: Optional[torch.Tensor], root: int) -> Handle:
        opts = c10d.GatherOptions()
        opts.rootRank = root
        outputs = [list(recv.chunk(self.size))] if recv is not None and self.rank == root else []
        if recv is not None and self.rank == root and recv.numel() == 0:
            outputs = [[recv.new_empty(0) for _ in range(self.size)]]
        return self._post(lambda pg: pg.gather(outputs, [send], opts), "gather")

    def scatter(self, send: Optional[torch.Tensor], recv: torch.Tensor, root: int) -> Handle:
        opts = c10d.ScatterOptions()
        opts.rootRank = root
        inputs = [list(send.view(self.size, -1).unbind(0))] if send is not None and self.rank == root else []
        return self._post(lambda pg: pg.scatter([recv], inputs, opts), "scatter")

    def alltoall(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        if overlaps(send, recv):
            send = send.clone()
        return self._post(lambda pg: pg.alltoall_base(recv, send, [], [], c10d.AllToAllOptions()), "alltoall")

    def alltoallv(self, send: torch.Tensor, send_counts: list[int], recv: torch.Tensor, recv_counts: list[int]) -> Handle:
        if overlaps(send, recv):
            send = send.clone()
        return self._post(lambda pg: pg.alltoall_base(recv, send, list(recv_counts), list(send_counts), c10d.AllToAllOptions()), "alltoallv")

    def send(self, tensor: torch.Tensor, peer: int) -> Handle:
        return self._post(lambda pg: pg.send([tensor], peer, 0), f"send to {self.ctx.peer_name(peer)}", collective=False)

    def recv(self, tensor: torch.Tensor, peer: Optional[int]) -> Handle:
        if peer is None:
            return self._post(lambda pg: pg.recv_anysource([tensor], 0), "recv from any source", collective=False)
        return self._post(lambda pg: pg.recv([tensor], peer, 0), f"recv from {self.ctx.peer_name(peer)}", collective=False)

    def barrier(self) -> Handle:
        return self._post(lambda pg: pg.barrier(c10d.BarrierOptions()), "barrier")

    def abort(self) -> None:
        pg, self._backend = self._backend, None
        if pg is not None:
            try:
                pg.abort()
            except Exception:  # already broken: dropping it below releases what is left
                pass

    def close(self) -> None:
        pg, self._backend = self._backend, None
        if pg is not None:
            try:
                pg.shutdown()
            except Exception:
                pass
