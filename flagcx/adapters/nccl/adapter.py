"""NCCL adapter: CUDA tensors through libnccl (or an NCCL-API clone) bound by :mod:`.lib`.

Stream contract: every op is enqueued on ``torch.cuda.current_stream(ctx.device)`` at
call time and returns :data:`DONE`; the core picks the stream and keeps tensors alive.

Point-to-point: outside an explicit group, send/recv are queued (with the stream that
was current when they were posted) and launched together inside one
ncclGroupStart/End when a collective is issued on this adapter, when a group starts,
or when one of their handles is waited on or polled. A p2p handle's ``wait`` makes
the caller's current stream wait for the launch (an event), so two ranks that both
post isend before irecv, or torch's ``batch_isend_irecv`` arriving as single calls,
never deadlock. Inside group_start/group_end every op launches directly.

Watchdog (FLAGCX_NCCL_WATCHDOG, on by default): every launch outside graph capture
records an event on its stream, and :mod:`flagcx.watchdog` polls the adapter for
NCCL's asynchronous error and for the age of its oldest unfinished launch. Past the
timeout it stores a FlagcxTimeout (naming the peers that did not report, see
:class:`flagcx.bootstrap.PeerReport`) and aborts the communicator; every later call
on the adapter, and the wait of a queued send/recv, raises that error.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from ... import config, watchdog
from ...bootstrap import PeerReport, store_allgather
from ...errors import Cause, CommAborted, FlagcxError, FlagcxTimeout, NotSupported
from ...tensors import overlaps
from ...types import FLOAT_DTYPES, INT_DTYPES, ReduceOp
from ..base import DONE, Adapter, AdapterContext, Capabilities, Handle
from . import lib as nccl_lib
from .ipc_allreduce import IpcAllreduce, open_ipc_allreduce
from .p2p import P2PBatch, QueuedP2P
from .watch import WatchedLaunches

log = logging.getLogger("flagcx.nccl")

_DTYPES = {
    torch.int8: nccl_lib.INT8,
    torch.uint8: nccl_lib.UINT8,
    torch.int32: nccl_lib.INT32,
    torch.int64: nccl_lib.INT64,
    torch.float16: nccl_lib.FLOAT16,
    torch.bfloat16: nccl_lib.BFLOAT16,
    torch.float32: nccl_lib.FLOAT32,
    torch.float64: nccl_lib.FLOAT64,
}
_DTYPE_OF = {code: dtype for dtype, code in _DTYPES.items()}
_OPS = {
    ReduceOp.SUM: nccl_lib.SUM,
    ReduceOp.PROD: nccl_lib.PROD,
    ReduceOp.MAX: nccl_lib.MAX,
    ReduceOp.MIN: nccl_lib.MIN,
    ReduceOp.AVG: nccl_lib.AVG,
}
_FIRST_WITH_AVG_AND_BF16 = (2, 10, 0)


class NcclAdapter(QueuedP2P, WatchedLaunches, Adapter):
    """Collectives and p2p on CUDA streams through NCCL (see the module docstring for the stream and p2p rules)."""

    name = "nccl"
    _ipc: Optional[IpcAllreduce]
    """The peer-mapped small-message allreduce (communicators of one host made by init, not by split), or None."""
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        reduce_dtypes=FLOAT_DTYPES | INT_DTYPES,
        reduce_ops=frozenset(_OPS),
        stream_ordered=True,
    )

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        if device.type != "cuda":
            return f"NCCL moves CUDA tensors, not {device.type} tensors"
        if not torch.cuda.is_available():
            return "no usable CUDA device or driver (torch.cuda.is_available() is False)"
        try:
            nccl_lib.load()
        except FlagcxError as exc:
            return str(exc)
        return None

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        lib = nccl_lib.load()
        what = f"NCCL init of {ctx.where}"
        mine = b""
        if ctx.rank == 0:
            try:
                mine = b"\0" + lib.get_unique_id()
            except FlagcxError as exc:
                mine = b"\1" + str(exc).encode()
        # Doubles as an arrival barrier: a missing rank is a FlagcxTimeout here, not a hang inside NCCL.
        record = store_allgather(ctx.store, "nccl/uid", ctx.rank, ctx.size, mine, ctx.timeout, what)[0]
        if record[:1] != b"\0":
            raise FlagcxError(f"rank 0 could not create the NCCL unique id: {record[1:].decode(errors='replace')}", op="init", rank=ctx.rank)
        uid = record[1:]
        cuda = torch.cuda.is_available()
        if cuda:
            index = ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
            with torch.cuda.device(index):
                comm = lib.comm_init_rank(ctx.size, uid, ctx.rank, hint=f"{ctx.where}, cuda:{index}")
        else:
            index = 0
            reason = "torch sees no usable CUDA device or driver (torch.cuda.is_available() is False); run on a machine with an NVIDIA GPU and driver"
            comm = lib.comm_init_rank(ctx.size, uid, ctx.rank, hint=reason)  # raises NCCL's own error here
        self._bind(lib, comm, index)
        if cuda:
            with torch.cuda.device(index):
                ipc_ctx = replace(ctx, store=dist.PrefixStore("ipc/", ctx.store), device=self._device)
                self._ipc = open_ipc_allreduce(ipc_ctx, config.get().fast_allreduce)
        log.info("%s: rank %d/%d NCCL communicator on cuda:%d (%s %s)", ctx.label, ctx.rank, ctx.size, index, lib.prefix, lib.version_string)

    @classmethod
    def _wrap(cls, ctx: AdapterContext, lib: nccl_lib.NcclLib, comm: Any, index: int) -> NcclAdapter:
        adapter = cls.__new__(cls)
        Adapter.__init__(adapter, ctx)
        adapter._bind(lib, comm, index)
        return adapter

    def _bind(self, lib: nccl_lib.NcclLib, comm: Any, index: int) -> None:
        self._lib = lib
        self._ncomm = comm
        self._failed: Optional[FlagcxError] = None
        self._launches: collections.deque[tuple[float, str, torch.cuda.Event, bool]] = collections.deque()
        self._spare_events: list[torch.cuda.Event] = []
        self._watch_lock = threading.Lock()
        self._index = index
        self._device = torch.device("cuda", index)
        self._raw_stream = torch._C._cuda_getCurrentRawStream
        self._capturing = torch._C._cuda_isCurrentStreamCapturing
        self._record = torch._C._CudaEventBase.record
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._allreduce = lib.AllReduce
        self._broadcast = lib.Broadcast
        self._reduce = lib.Reduce
        self._allgather = lib.AllGather
        self._reducescatter = lib.ReduceScatter
        self._send = lib.Send
        self._recv = lib.Recv
        self._group_start = lib.GroupStart
        self._group_end = lib.GroupEnd
        self._pending: list[tuple[bool, torch.Tensor, int, torch.cuda.Stream]] = []
        self._batch = P2PBatch()
        self._depth = 0
        self._async_out = lib.ffi.new("int*")
        self._barrier_buf: Optional[torch.Tensor] = None
        self._splits = 0
        self._ipc = None
        if lib.RedOpCreatePreMulSum is not None and lib.RedOpDestroy is not None:  # NCCL >= 2.11: PREMUL_SUM in one kernel
            self.capabilities = replace(self.capabilities, reduce_ops=self.capabilities.reduce_ops | {ReduceOp.PREMUL_SUM})
        if lib.version < _FIRST_WITH_AVG_AND_BF16:
            self.capabilities = replace(
                self.capabilities,
                reduce_dtypes=self.capabilities.reduce_dtypes - {torch.bfloat16},
                reduce_ops=self.capabilities.reduce_ops - {ReduceOp.AVG},
            )
        self._watched = config.get().nccl_watchdog
        if self._watched:
            self._peers = PeerReport(self.ctx.store, self.rank, self.size, self.ctx.timeout, self.ctx.peer_name)
            watchdog.watch(self)

    @property
    def _comm(self) -> Any:
        """The NCCL communicator; raises the watchdog's error, or CommAborted, once it is gone."""
        comm = self._ncomm
        if comm is None:
            raise self._failed or CommAborted(f"the NCCL communicator of {self.ctx.where} was aborted or destroyed; create a new one", rank=self.rank)
        return comm

    # ------------------------------------------------------------------ errors
    def _error(self, rc: int, call: str, op: str) -> FlagcxError:
        return self._lib.error(rc, call, self._ncomm, op=op, rank=self.rank, hint=f"{self.ctx.where}")

    def check_async_error(self) -> None:
        """Raise the error NCCL reports for this communicator's in-flight work (ncclCommGetAsyncError), if any."""
        if self._failed is not None:
            raise self._failed
        with self._watch_lock:  # the watchdog thread calls this too: never on a communicator being aborted
            comm = self._ncomm
            if comm is None or self._lib.CommGetAsyncError is None:
                return
            rc = self._lib.CommGetAsyncError(comm, self._async_out)
            err = self._async_out[0]
        if rc:
            raise self._error(rc, "CommGetAsyncError", "check_async_error")
        if err not in (nccl_lib.SUCCESS, nccl_lib.IN_PROGRESS):
            raise self._error(err, "CommGetAsyncError", "asynchronous NCCL error")

    @staticmethod
    def _dtype(t: torch.Tensor, op: str) -> int:
        dt = _DTYPES.get(t.dtype)
        if dt is None:
            raise NotSupported(f"NCCL has no datatype for {t.dtype}; supported: {', '.join(map(str, _DTYPES))}", op=op)
        return dt

    def _premul(self, launch: Callable[[int], int], factor: Optional[float], dt: int, call: str, op: str) -> Handle:
        """Launch with a PREMUL_SUM op made for this call (ncclRedOpCreatePreMulSum, the scalar read at once), then destroy it."""
        lib = self._lib
        scalar = torch.tensor([factor], dtype=_DTYPE_OF[dt])  # host memory, read before the create call returns
        op_out = lib.ffi.new("int*")
        rc = lib.RedOpCreatePreMulSum(op_out, lib.ffi.cast("void*", scalar.data_ptr()), dt, nccl_lib.SCALAR_HOST_IMMEDIATE, self._comm)
        if rc:
            raise self._error(rc, "RedOpCreatePreMulSum", op)
        try:
            rc = launch(op_out[0])
        finally:
            lib.RedOpDestroy(op_out[0], self._comm)  # allowed once the last call using the op has returned
        return self._checked(rc, call, op)

    def _checked(self, rc: int, call: str, op: str) -> Handle:
        """The end of every launch: a nonzero code becomes a FlagcxError; the launch is tracked for the watchdog."""
        if rc:
            raise self._error(rc, call, op)
        if self._watched:
            self._track(op)
        return DONE

    # ------------------------------------------------------------------ collectives
    def allreduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, factor: Optional[float] = None) -> Handle:
        if self._pending:
            self._flush()
        n = send.numel()
        if not n:
            return DONE
        if self._ipc is not None and not self._depth and self._ipc.takes(send, op):
            self._ipc.allreduce(send.view(-1), recv.view(-1))
            return self._checked(0, "AllReduce", "allreduce")
        dt = self._dtype(send, "allreduce")
        s, r = send.data_ptr(), recv.data_ptr()
        if op is ReduceOp.PREMUL_SUM:
            return self._premul(lambda red: self._allreduce(s, r, n, dt, red, self._comm, self._raw_stream(self._index)), factor, dt, "AllReduce", "allreduce")
        rc = self._allreduce(s, r, n, dt, _OPS[op], self._comm, self._raw_stream(self._index))
        if rc:  # inline rather than _checked(): this is the launch every decode step makes
            raise self._error(rc, "AllReduce", "allreduce")
        if self._watched:
            self._track("allreduce")
        return DONE

    def allgather(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        if self._pending:
            self._flush()
        n = send.numel()
        if not n:
            return DONE
        if overlaps(send, recv) and send.data_ptr() != recv.data_ptr() + self.rank * n * send.element_size():
            send = send.clone()  # NCCL defines only the in-place layout (send is this rank's block of recv)
        rc = self._allgather(send.data_ptr(), recv.data_ptr(), n, self._dtype(send, "allgather"), self._comm, self._raw_stream(self._index))
        return self._checked(rc, "AllGather", "allgather")

    def reducescatter(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, factor: Optional[float] = None) -> Handle:
        if self._pending:
            self._flush()
        n = recv.numel()
        if not n:
            return DONE
        if overlaps(send, recv) and recv.data_ptr() != send.data_ptr() + self.rank * n * send.element_size():
            send = send.clone()  # NCCL defines only the in-place layout (recv is this rank's block of send)
        dt = self._dtype(send, "reducescatter")
        s, r = send.data_ptr(), recv.data_ptr()
        if op is ReduceOp.PREMUL_SUM:
            launch = lambda red: self._reducescatter(s, r, n, dt, red, self._comm, self._raw_stream(self._index))
            return self._premul(launch, factor, dt, "ReduceScatter", "reducescatter")
        return self._checked(self._reducescatter(s, r, n, dt, _OPS[op], self._comm, self._raw_stream(self._index)), "ReduceScatter", "reducescatter")

    def broadcast(self, tensor: torch.Tensor, root: int) -> Handle:
        if self._pending:
            self._flush()
        n = tensor.numel()
        if not n:
            return DONE
        ptr = tensor.data_ptr()
        rc = self._broadcast(ptr, ptr, n, self._dtype(tensor, "broadcast"), root, self._comm, self._raw_stream(self._index))
        return self._checked(rc, "Broadcast", "broadcast")

    def reduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, root: int, factor: Optional[float] = None) -> Handle:
        if self._pending:
            self._flush()
        n = send.numel()
        if not n:
            return DONE
        dt = self._dtype(send, "reduce")
        s, r = send.data_ptr(), recv.data_ptr()
        if op is ReduceOp.PREMUL_SUM:
            return self._premul(lambda red: self._reduce(s, r, n, dt, red, root, self._comm, self._raw_stream(self._index)), factor, dt, "Reduce", "reduce")
        return self._checked(self._reduce(s, r, n, dt, _OPS[op], root, self._comm, self._raw_stream(self._index)), "Reduce", "reduce")

    def gather(self, send: torch.Tensor, recv: Optional[torch.Tensor], root: int) -> Handle:
        n = send.numel() * send.element_size()
        plan = [(True, send.data_ptr(), n, root)]
        if self.rank == root:
            assert recv is not None
            base = recv.data_ptr()
            plan += [(False, base + r * n, n, r) for r in range(self.size)]
        return self._grouped(plan, "gather")

    def scatter(self, send: Optional[torch.Tensor], recv: torch.Tensor, root: int) -> Handle:
        n = recv.numel() * recv.element_size()
        plan = []
        if self.rank == root:
            assert send is not None
            if overlaps(send, recv):
                send = send.clone()
            base = send.data_ptr()
            plan += [(True, base + r * n, n, r) for r in range(self.size)]
        plan.append((False, recv.data_ptr(), n, root))
        return self._grouped(plan, "scatter")

    def alltoall(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        n = send.numel() * send.element_size() // self.size
        counts = [n] * self.size
        return self.alltoallv(send, counts, recv, counts)

    def alltoallv(self, send: torch.Tensor, send_counts: list[int], recv: torch.Tensor, recv_counts: list[int]) -> Handle:
        if overlaps(send, recv):
            send = send.clone()
        plan = []
        s, r = send.data_ptr(), recv.data_ptr()
        for peer in range(self.size):
            plan.append((True, s, send_counts[peer], peer))
            plan.append((False, r, recv_counts[peer], peer))
            s += send_counts[peer]
            r += recv_counts[peer]
        return self._grouped(plan, "alltoallv")

    def _grouped(self, plan: list[tuple[bool, int, int, int]], op: str) -> Handle:
        """Launch (is_send, byte pointer, bytes, peer) p2p ops in one NCCL group on the current stream (empty ones skipped)."""
        if self._pending:
            self._flush()
        stream = self._raw_stream(self._index)
        comm = self._comm
        err = None
        rc = self._group_start()
        if rc:
            raise self._error(rc, "GroupStart", op)
        for is_send, ptr, nbytes, peer in plan:
            if nbytes:
                rc = (self._send if is_send else self._recv)(ptr, nbytes, nccl_lib.UINT8, peer, comm, stream)
                if rc and err is None:
                    err = self._error(rc, "Send" if is_send else "Recv", f"{op} with {self.ctx.peer_name(peer)}")
        rc = self._group_end()
        if rc and err is None:
            err = self._error(rc, "GroupEnd", op)
        if err is not None:
            raise err
        if self._watched:
            self._track(op)
        return DONE

    def barrier(self) -> Handle:
        """An allreduce of one int on the current stream; returns once every rank's barrier has completed on the device."""
        if self._barrier_buf is None:
            self._barrier_buf = torch.zeros(1, dtype=torch.int32, device=self._device)
        self.allreduce(self._barrier_buf, self._barrier_buf, ReduceOp.SUM)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self._device))
        self._host_wait(event, "barrier")
        return DONE

    def _host_wait(self, event: torch.cuda.Event, op: str) -> None:
        """Block the host until ``event`` completes, polling NCCL's async error; FlagcxTimeout after ctx.timeout."""
        deadline = time.monotonic() + self.ctx.timeout
        delay = 1e-5
        while not event.query():
            self.check_async_error()
            if time.monotonic() > deadline:
                peers = self._peers.explain("timed out") if self._watched else ""
                exc = FlagcxTimeout(
                    f"not finished on the device after {self.ctx.timeout:g} s on {self.ctx.where} ({peers or 'a peer did not arrive'}); "
                    "the communicator was aborted: create a new one",
                    op=op,
                    rank=self.rank,
                    peers=self._peers.blamed if peers else (),
                    cause=Cause.TIMEOUT,
                    comm=self.ctx.label,
                )
                self.fail(exc)  # ncclCommAbort ends the stuck kernel; a later ncclCommDestroy would wait for it
                raise exc
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)

    def group_start(self) -> None:
        if self._pending:
            self._flush()
        rc = self._group_start()
        if rc:
            raise self._error(rc, "GroupStart", "group_start")
        self._depth += 1

    def group_end(self) -> None:
        if self._depth == 0:
            raise FlagcxError("group_end without group_start", op="group_end", rank=self.rank)
        self._depth -= 1
        rc = self._group_end()
        if rc:
            raise self._error(rc, "GroupEnd", "group_end")
        if self._watched and not self._depth:
            self._track("group")

    # ------------------------------------------------------------------ extras beyond the contract
    def register(self, tensor: torch.Tensor) -> Any:
        """Register ``tensor``'s memory with the communicator (ncclCommRegister, NCCL >= 2.19); returns the handle for :meth:`deregister`."""
        lib = self._lib
        if lib.CommRegister is None:
            raise NotSupported(f"{lib.prefix}CommRegister is missing from {lib.path} (needs NCCL >= 2.19)", op="register", rank=self.rank)
        out = lib.ffi.new("void**")
        rc = lib.CommRegister(self._comm, tensor.data_ptr(), tensor.numel() * tensor.element_size(), out)
        if rc:
            raise self._error(rc, "CommRegister", "register")
        return out[0]

    def deregister(self, handle: Any) -> None:
        """Undo :meth:`register`."""
        lib = self._lib
        if lib.CommDeregister is None:
            raise NotSupported(f"{lib.prefix}CommDeregister is missing from {lib.path}", op="deregister", rank=self.rank)
        rc = lib.CommDeregister(self._comm, handle)
        if rc:
            raise self._error(rc, "CommDeregister", "deregister")

    # ------------------------------------------------------------------ subgroups and lifetime
    def split(self, ranks_or_color: Union[Sequence[int], int], key: Optional[int] = None) -> Optional[NcclAdapter]:
        """A child adapter from ncclCommSplit; every rank of this adapter must call it.

        ``ranks_or_color`` is either the list of member ranks (child ranks follow its
        order; non-members get None) or an NCCL color (ranks with equal colors form one
        child, ordered by ``key``; a negative color joins none and gets None).
        """
        lib = self._lib
        if lib.CommSplit is None:
            raise NotSupported(f"{lib.prefix}CommSplit is missing from {lib.path} (needs NCCL >= 2.18)", op="split", rank=self.rank)
        if self._pending:
            self._flush()
        if isinstance(ranks_or_color, int):
            color = ranks_or_color if ranks_or_color >= 0 else nccl_lib.SPLIT_NOCOLOR
            members: Optional[list[int]] = None
            key = self.rank if key is None else key
        else:
            members = [int(r) for r in ranks_or_color]
            inside = self.rank in members
            color = zlib.crc32(",".join(map(str, members)).encode()) & 0x7FFFFFFF if inside else nccl_lib.SPLIT_NOCOLOR
            key = (members.index(self.rank) if inside else 0) if key is None else key
        comm = lib.comm_split(self._comm, color, key, rank=self.rank)
        self._splits += 1
        if comm is None:
            return None
        rank, size = lib.comm_int("CommUserRank", comm), lib.comm_int("CommCount", comm)
        g = self.ctx.global_ranks
        child = AdapterContext(
            store=dist.PrefixStore(f"split{self._splits}/{color}/", self.ctx.store),  # one prefix per child (the watchdog's roll call)
            rank=rank,
            size=size,
            timeout=self.ctx.timeout,
            device=self._device,
            label=f"{self.ctx.label}.split{self._splits}",
            global_ranks=[g[r] for r in members] if members is not None and g else [],
        )
        return NcclAdapter._wrap(child, lib, comm, self._index)

    def _discard_pending(self, why: str) -> None:
        if self._pending:
            log.warning("%s: %d queued send/recv dropped (communicator %s before they were launched)", self.ctx.label, len(self._pending), why)
            self._batch.error = CommAborted(f"{self.ctx.where} was {why} before this send/recv was launched", op="send/recv", rank=self.rank)
            self._pending = []
            self._batch = P2PBatch()

    def _release(self) -> Any:
        """Detach the communicator (None when already gone), unmap the peer buffers, stop watching it."""
        if self._ipc is not None:
            self._ipc.close()
            self._ipc = None
        with self._watch_lock:
            comm, self._ncomm = getattr(self, "_ncomm", None), None
            self._launches.clear()
            self._spare_events.clear()
        if self._watched:
            watchdog.unwatch(self)
        return comm

    def abort(self) -> None:
        """ncclCommAbort: stop in-flight work without waiting for peers."""
        comm = self._release()
        if comm is None:
            return
        self._discard_pending("aborted")
        rc = self._lib.CommAbort(comm)
        if rc:
            log.warning("%s: %s", self.ctx.label, self._lib.error(rc, "CommAbort", rank=self.rank))

    def close(self) -> None:
        """ncclCommDestroy (idempotent)."""
        comm = self._release()
        if comm is None:
            return
        self._discard_pending("closed")
        rc = self._lib.CommDestroy(comm)
        if rc:
            log.warning("%s: %s", self.ctx.label, self._lib.error(rc, "CommDestroy", rank=self.rank))
