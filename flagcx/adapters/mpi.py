"""MPI adapter: mpi4py's nonblocking collectives on zero-copy views of CPU tensors.

Usable when the job was started by ``mpiexec`` (MPICH, Open MPI, or any launcher
that sets PMI_RANK / PMIX_RANK / OMPI_COMM_WORLD_RANK) and mpi4py can load the
MPI library of that launcher (``pip install flagcx[mpi]`` brings mpi4py + MPICH).

The communicator's ranks may be any subset of MPI_COMM_WORLD in any order: each
member publishes its world rank through the adapter's store, and the members build
their own MPI communicator (``Create_group``, collective over members only) whose
rank order is the flagcx rank order.

Every op is posted with its nonblocking MPI form (Iallreduce, Ibcast, Isend, ...) on
buffers that alias the tensors' memory (``MPI.buffer.fromaddress``, no copies), and
returns a handle; ``wait`` polls ``Test()``: busy for up to 2 ms like MPI's blocking
calls (200 us when the host runs more ranks than cores, so that peers get the CPU),
then with ``sched_yield``, then with short sleeps, until the op completes or the
timeout expires with FlagcxTimeout naming the op, the group and (for a collective)
the peers that did not arrive (a roll call in the store, :class:`flagcx.bootstrap.PeerReport`).
After a timed-out collective (or send) the MPI communicator is out of step with its
peers, so every later call raises CommAborted; a timed-out recv is cancelled and
leaves it usable. MPI itself is not fault tolerant: under mpiexec a rank that dies
ends the whole job (the launcher kills the other ranks).

gather and scatter are point-to-point messages tagged with the communicator's count of
collective calls (MPI's own Igather / Iscatter carry nothing flagcx can check, and MPICH
matches them against any other collective): a rank that skipped a collective, because it
raised before reaching the transport (torch's own checks of a gather list on the root, say),
is then one count behind, so its next gather or scatter cannot match its peers' stale
messages and times out instead of returning their data. Its other collectives still match
its peers' as MPI orders them.

Reductions: float32, float64, int8, uint8, int32 and int64 are reduced natively
(integers wrap around); float16 and bfloat16 are staged through a float32 copy,
accumulated in float32 and rounded once to the tensor's dtype when copied back.
SUM, PROD, MAX and MIN are native; the core emulates AVG and PREMUL_SUM on SUM.
"""

from __future__ import annotations

import importlib.util
import os
import time
import zlib
from collections.abc import Callable
from typing import Any, Optional

import torch

from ..bootstrap import PeerReport, detect_launch_env, store_allgather
from ..errors import Cause, CommAborted, FlagcxError, FlagcxTimeout
from ..tensors import overlaps
from ..types import REDUCE_DTYPES, ReduceOp
from .base import Adapter, AdapterContext, Capabilities, Handle

_LAUNCHER_VARS = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")
"""Set in every rank by the MPI launchers (MPICH/Intel MPI hydra, PMIx, Open MPI)."""

_SPIN = 50
"""Test() calls before the first clock read (the fast path of small messages)."""
_SPIN_FOR = 2e-3
"""Seconds of busy Test() polling (like MPI's own blocking calls) before yielding the CPU."""
_SPIN_FOR_SHARED = 200e-6
"""The same when this host runs more ranks than it has cores: yield early so that peers can run."""
_YIELD_FOR = 0.02
"""Seconds of Test() + sched_yield polling before the wait starts to sleep."""
_SLEEP_MIN, _SLEEP_MAX = 50e-6, 1e-3
"""Sleep between Test() calls once an op is late (doubling from MIN up to MAX)."""
_HALF = (torch.float16, torch.bfloat16)
_TAGS = 32767
"""MPI_TAG_UB is at least this; tag 0 is send/recv's, collective tags cycle through 1.._TAGS - 1."""

_MPI: Any = None


def _load_mpi() -> Any:
    """mpi4py's MPI module (imported on first use: the import initialises MPI)."""
    global _MPI
    if _MPI is None:
        from mpi4py import MPI

        _MPI = MPI
    return _MPI


def _buf(t: torch.Tensor) -> Any:
    """A writable buffer over a contiguous CPU tensor's memory (no copy)."""
    return _MPI.buffer.fromaddress(t.data_ptr(), t.numel() * t.element_size())


class MpiHandle(Handle):
    """An MPI request plus the tensors it uses and the copy-out to run once it completes."""

    __slots__ = ("_adapter", "_req", "_op", "_peer", "_keep", "_after", "_status", "_exc")

    def __init__(
        self,
        adapter: MpiAdapter,
        req: Any,
        op: str,
        keep: tuple,
        after: Optional[Callable[[], Any]] = None,
        peer: Optional[int] = None,
        status: Any = None,
    ) -> None:
        self._adapter = adapter
        self._req = req
        self._op = op
        self._peer = peer
        self._keep = keep
        self._after = after
        self._status = status
        self._exc: Optional[FlagcxError] = None

    def wait(self, timeout: Optional[float] = None) -> None:
        req = self._req
        if req is None:
            if self._exc is not None:
                raise self._exc
            return
        status = self._status
        try:
            for _ in range(_SPIN):
                if req.Test(status):
                    break
            else:
                limit = self._adapter.ctx.timeout if timeout is None else timeout
                if not _poll(req, status, limit, self._adapter._spin_for):
                    self._adapter._expired(self, limit)
        except _MPI.Exception as exc:
            self._fail(self._adapter._mpi_error(self._op, self._peer, exc))
        except FlagcxError as exc:
            self._fail(exc)
        self._complete()

    def done(self) -> bool:
        if self._req is None:
            return True
        try:
            finished = self._req.Test(self._status)
        except _MPI.Exception as exc:  # wait() raises it
            self._req, self._keep, self._after = None, (), None
            self._exc = self._adapter._mpi_error(self._op, self._peer, exc)
            return True
        if finished:
            self._complete()
        return finished

    def source(self) -> int:
        if self._status is None or self._req is not None or self._exc is not None:
            raise FlagcxError("source() is defined for a successfully completed recv only", op=self._op, rank=self._adapter.rank)
        return self._status.Get_source()

    def _fail(self, exc: FlagcxError) -> None:
        self._req, self._keep, self._after, self._exc = None, (), None, exc
        raise exc from None

    def _complete(self) -> None:
        self._req = None
        self._keep = ()
        after, self._after = self._after, None
        if after is not None:
            after()


class _Requests:
    """Several MPI requests waited on as one (the per-peer messages of a gather or scatter)."""

    __slots__ = ("reqs",)

    def __init__(self, reqs: list) -> None:
        self.reqs = reqs

    def Test(self, status: Any = None) -> bool:  # noqa: N802  (the mpi4py Request method it stands for)
        return bool(_MPI.Request.Testall(self.reqs))


def _poll(req: Any, status: Any, timeout: float, spin_for: float = _SPIN_FOR_SHARED) -> bool:
    """Test ``req`` until it completes (True) or ``timeout`` seconds pass (False).

    Busy-polls for ``spin_for`` seconds, then polls with sched_yield, then sleeps between polls.
    """
    start = time.monotonic()
    deadline = start + timeout
    pause = _SLEEP_MIN
    while True:
        if req.Test(status):
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        waited = now - start
        if waited < spin_for:
            continue
        if waited < _YIELD_FOR:
            os.sched_yield()
        else:
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, _SLEEP_MAX)


class MpiAdapter(Adapter):
    """Collectives and point-to-point over an MPI communicator of the flagcx ranks."""

    name = "mpi"
    capabilities = Capabilities(
        devices=frozenset({"cpu"}),
        reduce_dtypes=REDUCE_DTYPES,
        reduce_ops=frozenset({ReduceOp.SUM, ReduceOp.PROD, ReduceOp.MAX, ReduceOp.MIN}),
        any_source=True,
    )

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        what = f"creating the MPI transport of {ctx.where}"
        MPI = _load_mpi()
        world = MPI.COMM_WORLD
        mine = f"{world.Get_rank()},{world.Get_size()}".encode()
        raw = store_allgather(ctx.store, "world", ctx.rank, ctx.size, mine, ctx.timeout, what)
        rows = [tuple(int(x) for x in r.decode().split(",")) for r in raw]
        world_ranks = [r for r, _ in rows]
        if len({s for _, s in rows}) != 1 or len(set(world_ranks)) != ctx.size:
            raise FlagcxError(
                f"{what}: the ranks are not one MPI job (MPI world rank, size per rank: {rows}); start every rank "
                "with one mpiexec whose MPI library is the one mpi4py loads, or use FLAGCX_CPU_ADAPTER=gloo",
                op="init",
                rank=ctx.rank,
            )
        self.world_ranks = world_ranks
        """MPI_COMM_WORLD rank of each member, in flagcx rank order."""
        self._peers = PeerReport(ctx.store, ctx.rank, ctx.size, ctx.timeout, ctx.peer_name)
        self._ops = {ReduceOp.SUM: MPI.SUM, ReduceOp.PROD: MPI.PROD, ReduceOp.MAX: MPI.MAX, ReduceOp.MIN: MPI.MIN}
        self._types = {
            torch.float32: MPI.FLOAT,
            torch.float64: MPI.DOUBLE,
            torch.int8: MPI.INT8_T,
            torch.uint8: MPI.UINT8_T,
            torch.int32: MPI.INT32_T,
            torch.int64: MPI.INT64_T,
        }
        self._byte = MPI.BYTE
        self._in_place = MPI.IN_PLACE
        self._any_source = MPI.ANY_SOURCE
        launch = detect_launch_env()
        local_ranks = launch.local_size if launch is not None else ctx.size
        self._spin_for = _SPIN_FOR if local_ranks <= (os.cpu_count() or 1) else _SPIN_FOR_SHARED
        self._orphans: list[tuple[Any, tuple]] = []
        self._broken: Optional[str] = None
        self._calls = 0
        """Collective calls posted so far (the tag of gather and scatter messages; see the module docstring)."""
        group = world.Get_group()
        members = group.Incl(world_ranks)
        try:
            # The tag tells apart concurrent creations of different groups; every member derives the same one.
            self._comm = world.Create_group(members, zlib.crc32(repr(world_ranks).encode()) % 32768)
        except MPI.Exception as exc:
            raise FlagcxError(f"{what}: MPI_Comm_create_group failed: {exc.Get_error_string()}", op="init", rank=ctx.rank) from None
        finally:
            members.Free()
            group.Free()

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        if device.type != "cpu":
            return f"the MPI adapter moves CPU tensors only, not {device.type} tensors"
        if importlib.util.find_spec("mpi4py") is None:
            return "mpi4py is not installed (pip install flagcx[mpi])"
        if not any(os.environ.get(v) for v in _LAUNCHER_VARS):
            return (
                "the job was not started by mpiexec (no PMI_RANK / PMIX_RANK / OMPI_COMM_WORLD_RANK); "
                "launch it with 'mpiexec -n N ...' or use FLAGCX_CPU_ADAPTER=gloo"
            )
        try:
            _load_mpi()
        except (ImportError, RuntimeError) as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"mpi4py cannot load an MPI library ({detail}); pip install flagcx[mpi] installs MPICH"
        return None

    # ------------------------------------------------------------------ plumbing
    def _post(
        self,
        op: str,
        start: Callable[..., Any],
        args: tuple,
        keep: tuple,
        after: Optional[Callable[[], Any]] = None,
        peer: Optional[int] = None,
        status: Any = None,
    ) -> Handle:
        """Post ``start(*args)`` (a nonblocking MPI call); ``keep`` holds the tensors MPI uses until it completes."""
        if self._broken is not None:
            raise CommAborted(self._broken, op=op, rank=self.rank)
        if op not in ("send", "recv"):
            self._calls += 1
        try:
            req = start(*args)
        except _MPI.Exception as exc:
            raise self._mpi_error(op, peer, exc) from None
        return MpiHandle(self, req, op, keep, after, peer, status)

    def _msg(self, t: torch.Tensor) -> list:
        """mpi4py message spec over ``t``'s memory, typed by its dtype (uint8 for data movement)."""
        return [_buf(t), self._types[t.dtype]]

    def _what(self, op: str, peer: Optional[int]) -> str:
        if op == "send" and peer is not None:
            return f"send to {self.ctx.peer_name(peer)} on {self.ctx.where}"
        if op == "recv":
            return f"recv from {'any source' if peer is None else self.ctx.peer_name(peer)} on {self.ctx.where}"
        return f"{op} on {self.ctx.where}"

    def _mpi_error(self, op: str, peer: Optional[int], exc: Any) -> FlagcxError:
        text = exc.Get_error_string().strip()
        hint = ""
        if exc.Get_error_class() == _MPI.ERR_TRUNCATE:
            hint = "; the message was larger than the receive buffer: size the recv like the send"
        return FlagcxError(f"{self._what(op, peer)}: MPI error: {text}{hint}", op=op, rank=self.rank)

    def _expired(self, handle: MpiHandle, limit: float) -> None:
        """Raise FlagcxTimeout for ``handle`` (a recv is cancelled; anything else breaks the communicator).

        Returns normally only when a recv matched while being cancelled (its data is in place).
        """
        what = self._what(handle._op, handle._peer)
        req = handle._req
        if handle._op == "recv":
            req.Cancel()
            status = handle._status
            if _poll(req, status, min(limit, 5.0)):
                if not status.Is_cancelled():
                    return
                raise FlagcxTimeout(
                    f"{what}: nothing arrived within {limit:g} s (the sender crashed, did not send, or is blocked); the recv was cancelled",
                    op="recv",
                    rank=self.rank,
                )
        self._orphans.append((req, handle._keep))  # MPI may still write into these buffers
        self._broken = f"the MPI communicator of {self.ctx.where} is unusable after '{what}' timed out; destroy this communicator and create a new one"
        peers = self._peers.explain("timed out") if handle._op != "send" else ""
        raise FlagcxTimeout(
            f"{what}: not complete within {limit:g} s ({peers or 'a peer crashed, did not call it, or is blocked in another call'}); "
            "this communicator is unusable now: destroy it and create a new one",
            op=handle._op,
            rank=self.rank,
            peers=self._peers.blamed if peers else (),
            cause=Cause.TIMEOUT,
            comm=self.ctx.label,
        )

    # ------------------------------------------------------------------ collectives
    def allreduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        mop = self._ops[op]
        if send.dtype in _HALF:
            stage = send.float()
            args = (self._in_place, self._msg(stage), mop)
            return self._post("allreduce", self._comm.Iallreduce, args, (stage, recv), lambda: recv.copy_(stage))
        if send.data_ptr() == recv.data_ptr():
            sbuf = self._in_place
        else:
            send = _apart(send, recv)
            sbuf = self._msg(send)
        return self._post("allreduce", self._comm.Iallreduce, (sbuf, self._msg(recv), mop), (send, recv))

    def allgather(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        if send.data_ptr() == recv.data_ptr() + self.rank * send.numel():
            sbuf = self._in_place
        else:
            send = _apart(send, recv)
            sbuf = self._msg(send)
        return self._post("allgather", self._comm.Iallgather, (sbuf, self._msg(recv)), (send, recv))

    def reducescatter(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        mop = self._ops[op]
        start = self._comm.Ireduce_scatter_block
        if send.dtype in _HALF:
            stage, n = send.float(), recv.numel()  # MPI's in place: the result lands in stage[:n]
            args = (self._in_place, self._msg(stage), mop)
            return self._post("reducescatter", start, args, (stage, recv), lambda: recv.copy_(stage[:n]))
        send = _apart(send, recv)  # MPI's in-place layout is not NCCL's: an overlapping send is reduced from a copy
        return self._post("reducescatter", start, (self._msg(send), self._msg(recv), mop), (send, recv))

    def broadcast(self, tensor: torch.Tensor, root: int) -> Handle:
        return self._post("broadcast", self._comm.Ibcast, (self._msg(tensor), root), (tensor,))

    def reduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, root: int) -> Handle:
        mop = self._ops[op]
        start = self._comm.Ireduce
        if send.dtype in _HALF:
            stage = send.float()
            if self.rank == root:
                args = (self._in_place, self._msg(stage), mop, root)
                return self._post("reduce", start, args, (stage, recv), lambda: recv.copy_(stage))
            return self._post("reduce", start, (self._msg(stage), None, mop, root), (stage,))
        if self.rank != root:
            return self._post("reduce", start, (self._msg(send), None, mop, root), (send,))
        if send.data_ptr() == recv.data_ptr():
            sbuf = self._in_place
        else:
            send = _apart(send, recv)
            sbuf = self._msg(send)
        return self._post("reduce", start, (sbuf, self._msg(recv), mop, root), (send, recv))

    def _tag(self) -> int:
        """The tag of the collective about to be posted (``_post`` counts it)."""
        return 1 + self._calls % (_TAGS - 1)

    def gather(self, send: torch.Tensor, recv: Optional[torch.Tensor], root: int) -> Handle:
        tag, comm = self._tag(), self._comm
        if self.rank != root:
            return self._post("gather", lambda: _Requests([comm.Isend(self._msg(send), root, tag)]), (), (send,))
        assert recv is not None
        k = send.numel()
        mine = recv[root * k : (root + 1) * k]
        if send.data_ptr() != mine.data_ptr():
            mine.copy_(send)
        pieces = [(p, recv[p * k : (p + 1) * k]) for p in range(self.size) if p != root]
        return self._post("gather", lambda: _Requests([comm.Irecv(self._msg(t), p, tag) for p, t in pieces]), (), (send, recv))

    def scatter(self, send: Optional[torch.Tensor], recv: torch.Tensor, root: int) -> Handle:
        tag, comm = self._tag(), self._comm
        if self.rank != root:
            return self._post("scatter", lambda: _Requests([comm.Irecv(self._msg(recv), root, tag)]), (), (recv,))
        assert send is not None
        k = recv.numel()
        if recv.data_ptr() != send.data_ptr() + root * k * recv.element_size():
            recv.copy_(send[root * k : (root + 1) * k])
        pieces = [(p, send[p * k : (p + 1) * k]) for p in range(self.size) if p != root]
        return self._post("scatter", lambda: _Requests([comm.Isend(self._msg(t), p, tag) for p, t in pieces]), (), (send, recv))

    def alltoall(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        send = _apart(send, recv)
        return self._post("alltoall", self._comm.Ialltoall, (self._msg(send), self._msg(recv)), (send, recv))

    def alltoallv(self, send: torch.Tensor, send_counts: list[int], recv: torch.Tensor, recv_counts: list[int]) -> Handle:
        send = _apart(send, recv)
        smsg = [_buf(send), (list(send_counts), _displacements(send_counts)), self._byte]
        rmsg = [_buf(recv), (list(recv_counts), _displacements(recv_counts)), self._byte]
        return self._post("alltoallv", self._comm.Ialltoallv, (smsg, rmsg), (send, recv))

    def send(self, tensor: torch.Tensor, peer: int) -> Handle:
        return self._post("send", self._comm.Isend, (self._msg(tensor), peer, 0), (tensor,), peer=peer)

    def recv(self, tensor: torch.Tensor, peer: Optional[int]) -> Handle:
        source = self._any_source if peer is None else peer
        return self._post("recv", self._comm.Irecv, (self._msg(tensor), source, 0), (tensor,), peer=peer, status=_MPI.Status())

    def barrier(self) -> Handle:
        return self._post("barrier", self._comm.Ibarrier, (), ())

    def close(self) -> None:
        if self._broken is None:
            self._broken = f"the MPI communicator of {self.ctx.where} was closed; create a new communicator"
        if self._comm != _MPI.COMM_NULL and not _MPI.Is_finalized():
            # Freeing is local (it makes self._comm COMM_NULL); MPI keeps the communicator until
            # timed-out (orphaned) requests complete.
            self._comm.Free()


def _apart(send: torch.Tensor, recv: torch.Tensor) -> torch.Tensor:
    """``send``, or a copy of it where it overlaps ``recv`` (for ops without an in-place form)."""
    return send.clone() if overlaps(send, recv) else send


def _displacements(counts: list[int]) -> list[int]:
    out, total = [], 0
    for c in counts:
        out.append(total)
        total += c
    return out
