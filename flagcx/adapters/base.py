"""The adapter contract: the one small interface every transport implements.

An adapter wraps one collective library (Gloo, our shm transport, MPI, NCCL and its
clones, a vendor's torch backend) for the ranks of one communicator. It sees only
flat, contiguous tensors on one device and NCCL-like calls; everything else (lists,
uneven sizes, AVG/PREMUL_SUM emulation, bool/complex, validation, routing by device)
is the core's job. An adapter knows nothing about torch.distributed's process groups.

Data-movement ops (allgather, broadcast, gather, scatter, alltoall(v), send, recv)
receive uint8 byte views, so adapters need no dtype logic for them (one that declares
``capabilities.typed_moves`` reads only the bytes and accepts any dtype, which spares
the core's fast path the views); reductions
receive the real dtype, restricted to ``capabilities.reduce_dtypes`` and
``capabilities.reduce_ops``. An adapter that declares ``ReduceOp.PREMUL_SUM`` there
receives that op with a keyword ``factor`` (a float: the result is the SUM of
``factor * x``) in allreduce, reducescatter and reduce; for the others the core
scales the input and asks for SUM. In-place calls pass the same tensor (or, for
allgather/reducescatter, the NCCL in-place layout) as send and recv. ``capabilities.ops``
lists the ops an adapter implements; the core refuses the others with NotSupported.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Protocol

import torch

from ..errors import NotSupported
from ..topology.detect import PeerRecord
from ..types import ReduceOp

ADAPTER_API_VERSION = 1
"""Version of this contract; plugins declare the version they implement."""

ALL_OPS = frozenset(
    {
        "allreduce",
        "allgather",
        "reducescatter",
        "broadcast",
        "reduce",
        "gather",
        "scatter",
        "alltoall",
        "alltoallv",
        "send",
        "recv",
        "barrier",
    }
)


@dataclass(frozen=True)
class Capabilities:
    """What an adapter declares it can do; the core checks calls against it before dispatch."""

    devices: frozenset[str]
    """torch device types whose tensors the adapter moves ("cpu", "cuda", "npu", ...)."""
    reduce_dtypes: frozenset[torch.dtype]
    """dtypes allowed in allreduce / reducescatter / reduce."""
    reduce_ops: frozenset[ReduceOp]
    """Reduce ops computed natively (the core emulates AVG and PREMUL_SUM on top of SUM; PREMUL_SUM here: the reductions take ``factor``)."""
    ops: frozenset[str] = ALL_OPS
    """Collective names from ALL_OPS the adapter implements (the core raises NotSupported for the others)."""
    any_source: bool = False
    """recv(peer=None) receives from whichever rank sends first."""
    stream_ordered: bool = False
    """Ops are enqueued on a device stream (CUDA-like) instead of completing on the host."""
    typed_moves: bool = False
    """Data-movement ops accept contiguous tensors of any dtype (sizes in bytes: ``nbytes``), not only uint8 views."""
    alltoall_in_place: bool = False
    """alltoall accepts the same tensor as send and recv (the core otherwise copies the input first)."""
    block_lists: bool = False
    """gather_list / scatter_list take the root's blocks as separate tensors (a torch tensor list, no staging copy)."""


class Handle(abc.ABC):
    """A posted operation.

    ``wait`` completes it: on host adapters it blocks until the data is in place;
    on stream-ordered adapters it makes the caller's current stream wait for it.
    """

    __slots__ = ()

    @abc.abstractmethod
    def wait(self, timeout: Optional[float] = None) -> None:
        """Complete the operation or raise a FlagcxError."""

    @abc.abstractmethod
    def done(self) -> bool:
        """True once the operation has finished (never blocks)."""

    def source(self) -> int:
        """The sending rank of a completed any-source recv."""
        raise NotImplementedError


class _Done(Handle):
    __slots__ = ()

    def wait(self, timeout: Optional[float] = None) -> None:
        return None

    def done(self) -> bool:
        return True


DONE: Handle = _Done()
"""The handle of an operation that completed before the call returned."""


class _AllOf(Handle):
    """Several handles posted together, completed in order."""

    __slots__ = ("_handles",)

    def __init__(self, handles: list[Handle]) -> None:
        self._handles = handles

    def wait(self, timeout: Optional[float] = None) -> None:
        for h in self._handles:
            h.wait(timeout)

    def done(self) -> bool:
        return all(h.done() for h in self._handles)


def all_of(handles: Sequence[Handle]) -> Handle:
    """One handle over ``handles`` (DONE ones dropped)."""
    pending = [h for h in handles if h is not DONE]
    if not pending:
        return DONE
    return pending[0] if len(pending) == 1 else _AllOf(pending)


class _Then(Handle):
    """A handle plus follow-up steps (a copy back to the device...) run once, after it completes."""

    __slots__ = ("_handle", "_steps", "_finished")

    def __init__(self, handle: Handle, steps: Sequence[Callable[[], object]]) -> None:
        self._handle = handle
        self._steps = list(steps)
        self._finished = False

    def wait(self, timeout: Optional[float] = None) -> None:
        if self._finished:
            return
        self._handle.wait(timeout)
        for step in self._steps:
            step()
        self._finished = True

    def done(self) -> bool:
        return self._finished or self._handle.done()


def then(handle: Handle, *steps: Callable[[], object]) -> Handle:
    """``handle`` followed by ``steps`` on wait."""
    return _Then(handle, steps)


@dataclass
class AdapterContext:
    """What an adapter is built from: the ranks of one communicator and a store private to this adapter."""

    store: Any
    """A torch.distributed Store (already prefixed: keys are private to this adapter instance)."""
    rank: int
    size: int
    timeout: float
    """Seconds any blocking wait may last before raising FlagcxTimeout."""
    device: torch.device
    label: str = "flagcx"
    """The communicator's name: its identity in errors' ``comm`` and in logs."""
    global_ranks: list[int] = field(default_factory=list)
    """Global rank of each member, for error messages."""
    title: str = ""
    """The group as its user knows it, for messages ("the default group", "the group of ranks 0, 2"); empty: "communicator <label>"."""

    @property
    def where(self) -> str:
        """The group for a message: its title, else ``communicator <label>``."""
        return self.title or f"communicator {self.label}"

    def peer_name(self, rank: int) -> str:
        if self.global_ranks and 0 <= rank < len(self.global_ranks) and self.global_ranks[rank] != rank:
            return f"rank {rank} (global {self.global_ranks[rank]})"
        return f"rank {rank}"


class Adapter(abc.ABC):
    """One transport for the ranks of one communicator (see the module docstring for the rules)."""

    name: ClassVar[str]
    api_version: ClassVar[int] = ADAPTER_API_VERSION
    capabilities: Capabilities

    def __init__(self, ctx: AdapterContext) -> None:
        self.ctx = ctx
        self.rank = ctx.rank
        self.size = ctx.size

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        """None when the adapter can run here for tensors on ``device``, else a one-line reason."""
        return None

    # Collectives. recv is significant on every rank unless the docstring says otherwise.
    @abc.abstractmethod
    def allreduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        """send and recv are contiguous with equal shapes (the one op whose tensors may be multi-dimensional)."""

    @abc.abstractmethod
    def allgather(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        """recv holds size * send.numel() bytes, rank r's input at offset r * send.numel()."""

    @abc.abstractmethod
    def reducescatter(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        """send holds size * recv.numel() elements; rank r gets the reduction of chunk r."""

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, root: int) -> Handle:
        """In place: every rank's tensor ends equal to root's."""

    @abc.abstractmethod
    def reduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, root: int) -> Handle:
        """recv is written on root only; send is never modified."""

    @abc.abstractmethod
    def gather(self, send: torch.Tensor, recv: Optional[torch.Tensor], root: int) -> Handle:
        """recv (size * send.numel() bytes) is given on root only."""

    @abc.abstractmethod
    def scatter(self, send: Optional[torch.Tensor], recv: torch.Tensor, root: int) -> Handle:
        """send (size * recv.numel() bytes) is given on root only."""

    def gather_list(self, send: torch.Tensor, recvs: Optional[Sequence[torch.Tensor]], root: int) -> Handle:
        """gather into root's ``size`` contiguous tensors of send's dtype and numel (given on root only); adapters with ``block_lists``."""
        raise NotSupported(f"adapter {self.name} has no gather into a tensor list", op="gather", rank=self.rank)

    def scatter_list(self, sends: Optional[Sequence[torch.Tensor]], recv: torch.Tensor, root: int) -> Handle:
        """scatter from root's ``size`` contiguous tensors of recv's dtype and numel (given on root only); adapters with ``block_lists``."""
        raise NotSupported(f"adapter {self.name} has no scatter from a tensor list", op="scatter", rank=self.rank)

    @abc.abstractmethod
    def alltoall(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        """Even exchange: chunk j of send goes to rank j, chunk i of recv comes from rank i."""

    @abc.abstractmethod
    def alltoallv(self, send: torch.Tensor, send_counts: list[int], recv: torch.Tensor, recv_counts: list[int]) -> Handle:
        """Uneven exchange; counts in bytes, chunks packed back to back in rank order."""

    @abc.abstractmethod
    def send(self, tensor: torch.Tensor, peer: int) -> Handle: ...

    def send_wait(self, tensor: torch.Tensor, peer: int) -> None:
        """A blocking send (what a synchronous call runs); adapters may do it cheaper than send + wait."""
        self.send(tensor, peer).wait()

    def recv_wait(self, tensor: torch.Tensor, peer: Optional[int]) -> int:
        """A blocking recv; returns the sending rank."""
        handle = self.recv(tensor, peer)
        handle.wait()
        return peer if peer is not None else handle.source()

    @abc.abstractmethod
    def recv(self, tensor: torch.Tensor, peer: Optional[int]) -> Handle:
        """peer None means any source (only when capabilities.any_source)."""

    @abc.abstractmethod
    def barrier(self) -> Handle: ...

    def group_start(self) -> None:
        """Begin a group of ops launched together (NCCL ncclGroupStart); host adapters need nothing."""

    def group_end(self) -> None:
        """End the group begun by group_start."""

    def abort(self) -> None:
        """Tear down without waiting for peers (after an error)."""
        self.close()

    def close(self) -> None:
        """Release resources; the adapter is unusable afterwards."""


def grouped(adapter: Adapter, launch: Callable[[], list[Handle]]) -> list[Handle]:
    """Post the ops ``launch`` issues on ``adapter`` as one group (group_end runs even when one fails); their handles."""
    adapter.group_start()
    try:
        return launch()
    finally:
        adapter.group_end()


class AdapterGroup(Protocol):
    """The adapters of one group of ranks, by device type (the core's AdapterSet): what a composing adapter needs of it."""

    name: str
    global_ranks: list[int]

    def adapter(self, device: torch.device, op: str) -> Adapter:
        """The adapter for ``device``'s tensors, created on first use (every rank reaches the same op)."""

    def abort(self) -> None: ...

    def close(self) -> None: ...


class AdapterGroupFactory(Protocol):
    """Builds an AdapterGroup over some ranks; the core hands one to adapters that compose others (the heterogeneous runner)."""

    def __call__(
        self,
        store: torch.distributed.Store,
        rank: int,
        size: int,
        records: Sequence[PeerRecord],
        *,
        name: str,
        timeout: float,
        global_ranks: Sequence[int],
        cpu_adapter: Optional[str] = None,
    ) -> AdapterGroup: ...
