"""The Communicator: flagcx's core, between the frontends and the adapters.

It owns the ranks of one group. Each op reads as three steps: **check** its arguments
(:mod:`.args`, plus the cross-rank comparison of :mod:`.check` under FLAGCX_CHECK),
**lower** the rich call forms (lists, uneven splits, non-contiguous tensors, AVG /
PREMUL_SUM, bool and complex dtypes; :mod:`.lowering`) to the flat NCCL-like calls of
the adapter contract, and **launch** through a :class:`~.call.Call` that holds the
per-call adapter, stream and completion policy. The adapter comes from
:mod:`.selection` (one :class:`~.selection.AdapterSet`), or is the heterogeneous runner
(:mod:`flagcx.hetero`) when the ranks form several clusters.

Usable on its own (an engine builds one from a store, rank and size) and as the
engine of the torch backend. Host adapters complete collectives before returning;
``async_op=True`` then returns a finished Work whose ``wait`` re-raises any error.
Synchronous calls that need no lowering take the fast path of :mod:`.fast`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.distributed as dist

from .. import config, flight
from ..adapters import Adapter, Handle
from ..adapters.streams import SideStream
from ..bootstrap import prepare_env, store_from_env
from ..errors import CommAborted, InvalidArgument, NotSupported, invalid
from ..tensors import as_bytes, nbytes, overlaps, tensors_in
from ..topology.detect import PeerRecord
from ..types import PremulSum, ReduceOp, ReduceOpLike, to_reduce_op
from ..work import Step, Work
from . import check, monitored
from .args import Args, TensorOrList, contig_in, contig_inout, contig_out
from .call import Call, GroupState
from .fast import FastPath
from .lowering import broadcast_blocks, concat_blocks, lower_reduction, native_as_called, reduce_buffers
from .selection import AdapterSet, exchange_records
from .sparse import all_reduce_sparse
from .transports import open_transports

if TYPE_CHECKING:
    from ..hetero import HeteroAdapter

_CPU = torch.device("cpu")

_TRACE_ROLES = {
    "all_reduce": (0, 1),
    "reduce": (0, 1),
    "gather": (0, 1),
    "broadcast": (0, 0),
    "send": (0, 0),
    "recv": (0, 0),
    "reduce_scatter": (1, 0),
    "all_gather": (1, 0),
    "scatter": (1, 0),
    "all_to_all": (1, 0),
}
"""Op -> positions of its input and output among the tensors it hands to ``_call`` (the recorder's sizes)."""


def _seconds(timeout: Union[None, float, timedelta]) -> Optional[float]:
    if timeout is None:
        return None
    value = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    return value if value > 0 else None


class Communicator:
    """A group of ranks and every collective over them (see the module docstring)."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        size: int,
        *,
        timeout: Union[None, float, timedelta] = None,
        name: str = "flagcx",
        global_ranks: Optional[Sequence[int]] = None,
        title: str = "",
        _records: Optional[list[PeerRecord]] = None,
        _device_adapters: Optional[dict[str, Adapter]] = None,
    ) -> None:
        if size < 1 or not 0 <= rank < size:
            raise InvalidArgument(f"rank {rank} is not in [0, {size}); check RANK / WORLD_SIZE", op="init")
        cfg = config.get()
        self.rank = rank
        self.size = size
        self.name = name
        self.title = title or f"communicator {name}"
        """The group as its user knows it, in messages ("the default group", "the group of ranks 0, 2"); see :meth:`retitle`."""
        self.timeout = config.resolve_timeout(_seconds(timeout))
        self.global_ranks = list(global_ranks) if global_ranks else list(range(size))
        self._store = store
        self._seq = 0
        self._closed: Optional[str] = None
        self._args = Args(rank, size)
        self._group = GroupState()
        self._sides: dict[str, SideStream] = {}
        self._pairs = check.PairCheck(rank, store, self.timeout) if cfg.check else None
        self._check = check.CallCheck(rank, size, self._host_allgather, self._pairs, self.title) if self._pairs is not None else None
        self._monitored = monitored.MonitoredBarrier(store, rank, size)
        self._records = _records if _records is not None else exchange_records(store, rank, size, self.timeout, f"init of {name}")
        self.topology, self.clusters, self._transports = open_transports(
            store,
            rank,
            size,
            self._records,
            name=name,
            timeout=self.timeout,
            global_ranks=self.global_ranks,
            device_adapters=_device_adapters,
            title=self.title,
        )
        self._adapters = self._transports if isinstance(self._transports, AdapterSet) else None
        self._hetero: Optional[HeteroAdapter] = self._transports if self._adapters is None else None  # type: ignore[assignment]
        self.recorder: Optional[flight.Recorder] = None
        """This communicator's flight recorder (None with FLAGCX_TRACE_BUFFER=0); its ``name`` and ``desc`` label the group in dumps."""
        if cfg.trace_buffer:
            self.recorder = flight.Recorder(name, self.global_ranks, rank, cfg.trace_buffer, stack=cfg.trace_stack, store=store)
            flight.watch(self.recorder)
        self._fast = FastPath(rank, size, allowed=self._check is None and not cfg.trace_stack, recorder=self.recorder)
        """The fast path runs unless FLAGCX_CHECK compares calls or FLAGCX_TRACE_STACK walks the stack (synchronous calls: outside groups)."""

    @classmethod
    def from_env(cls, *, timeout: Union[None, float, timedelta] = None, name: str = "flagcx") -> Communicator:
        """Build the world communicator of a job started by torchrun, mpiexec or flagcx.launch."""
        env = prepare_env()
        secs = config.resolve_timeout(_seconds(timeout))
        store = dist.PrefixStore(f"{name}/", store_from_env(secs))
        return cls(store, env.rank, env.size, timeout=secs, name=name)

    def retitle(self, title: str) -> None:
        """Name this group ``title`` in every message from now on (a frontend learns the name its user gave the group)."""
        self.title = title
        if self._adapters is not None:
            self._adapters.retitle(title)
        if self._hetero is not None:
            self._hetero.ctx.title = title
        if self._check is not None:
            self._check.title = title

    # ------------------------------------------------------------------ adapters and calls
    def adapter_name(self, device: Union[str, torch.device] = "cpu") -> str:
        """Name of the adapter that carries tensors of ``device``."""
        return self._adapter(torch.device(device), "adapter_name").name

    def _adapter(self, device: torch.device, op: str) -> Adapter:
        if self._hetero is not None:
            return self._hetero
        assert self._adapters is not None
        return self._adapters.adapter(device, op)

    def _side(self, adapter: Adapter) -> SideStream:
        kind = adapter.ctx.device.type
        side = self._sides.get(kind)
        if side is None:
            side = self._sides[kind] = SideStream(adapter.ctx.device)
        return side

    def _call(self, op: str, contract_op: str, device: torch.device, async_op: bool, *tensors: object, peer: Optional[int] = None) -> Call:
        """The Call of one op: open communicator, the adapter for ``device``, which must implement ``contract_op``.

        The flight recorder gets the op's entry here (``peer``: the other rank of a send or recv, -1 for any source).
        """
        self._open(op)
        adapter = self._adapter(device, op)
        if contract_op not in adapter.capabilities.ops:
            raise NotSupported(
                f"adapter {adapter.name} does not implement {contract_op}; choose another adapter for {device.type} tensors", op=op, rank=self.rank
            )
        rec, index = self.recorder, -1
        if rec is not None:
            roles = _TRACE_ROLES.get(op)
            ins, outs = (tensors_in((tensors[roles[0]],)), tensors_in((tensors[roles[1]],))) if roles else ([], [])
            dtype = (ins or outs)[0].dtype if ins or outs else None
            index = rec.begin(op, sum(t.numel() for t in ins), sum(t.numel() for t in outs), dtype, adapter.capabilities.stream_ordered, peer)
        return Call(op, adapter, async_op, self._group, self._side, tensors, rec, index)

    def _remember_move(self, op: str, device: torch.device, adapter: Adapter) -> None:
        """A data movement or send / recv ran on ``adapter``: the next ones of its kind may take the fast path (not in heterogeneous mode, whose adapter routes by rank)."""
        if self._hetero is None:
            self._fast.remember_move(op, device, adapter)

    def _open(self, op: str) -> None:
        if self._closed is not None:
            raise CommAborted(f"{self.title} is {self._closed}; create a new one", op=op, rank=self.rank)

    def _host_allgather(self, op: str, mine: torch.Tensor) -> torch.Tensor:
        """Every rank's ``mine`` (a small CPU tensor), in rank order, over the host transport (FLAGCX_CHECK's exchanges)."""
        self._open(op)
        every = torch.empty(mine.numel() * self.size, dtype=mine.dtype)
        self._adapter(_CPU, op).allgather(as_bytes(mine), as_bytes(every)).wait()
        return every

    # ------------------------------------------------------------------ reductions
    def all_reduce(
        self, tensor: torch.Tensor, op: ReduceOpLike = ReduceOp.SUM, *, out: Optional[torch.Tensor] = None, async_op: bool = False
    ) -> Optional[Work]:
        """Reduce ``tensor`` over all ranks; the result lands in ``out`` (default: in place)."""
        if not async_op and self._fast.reduction("all_reduce", tensor, tensor if out is None else out, op):
            return None
        name = "all_reduce"
        if self._check is not None:
            self._check.call(name, check.desc(tensor), check.op_label(op))
        kind, factor = to_reduce_op(op, name, self.rank)
        if isinstance(tensor, torch.Tensor) and tensor.layout is torch.sparse_coo and out is None:
            if self._group.depth:
                raise NotSupported("sparse tensors cannot be reduced inside a group (coalescing manager); reduce them outside it", op=name, rank=self.rank)
            self._open(name)
            all_reduce_sparse(tensor, kind, self.rank, self.size, self.all_gather)
            return Work(name, outputs=[tensor]) if async_op else None
        self._args.tensor(name, "tensor", tensor)
        out = self._args.out(name, out, tensor)
        self._args.writable(name, "tensor" if out is tensor else "out", out)
        with self._call(name, "allreduce", tensor.device, async_op, tensor, out) as call:
            if tensor.numel() == 0:
                return call.done([out])
            steps: list[Step] = []
            send, recv = reduce_buffers(tensor, out, steps)
            low = lower_reduction(name, self.rank, self.size, call.adapter, send, recv, kind, factor)
            if native_as_called(low, kind, tensor.dtype, steps):
                self._fast.remember_reduction(name, tensor, op, call.adapter, low.op)
            return call.finish(lambda: call.adapter.allreduce(low.send, low.recv, low.op, **low.kwargs()), low.steps + steps, [out])

    def reduce_scatter(self, out: torch.Tensor, tensor: TensorOrList, op: ReduceOpLike = ReduceOp.SUM, *, async_op: bool = False) -> Optional[Work]:
        """Reduce over ranks and give rank r block r: ``tensor`` has size * out.numel() elements (or is a list of size blocks)."""
        if not async_op and isinstance(tensor, torch.Tensor) and self._fast.reduction("reduce_scatter", tensor, out, op):
            return None
        name = "reduce_scatter"
        if self._check is not None:
            self._check.call(name, check.desc(out), check.desc(tensor), check.op_label(op))
        self._args.tensor(name, "out", out)
        self._args.writable(name, "out", out)
        kind, factor = to_reduce_op(op, name, self.rank)
        if isinstance(tensor, torch.Tensor):
            self._args.tensor(name, "tensor", tensor)
        with self._call(name, "reducescatter", out.device, async_op, out, tensor) as call:
            send = self._args.blocks_in(name, tensor, out)
            if out.numel() == 0:
                return call.done([out])
            steps: list[Step] = []
            recv = contig_out(out, steps)
            low = lower_reduction(name, self.rank, self.size, call.adapter, send, recv, kind, factor)
            if native_as_called(low, kind, out.dtype, steps):
                self._fast.remember_reduction(name, out, op, call.adapter, low.op)
            if overlaps(low.send, low.recv) and low.recv.data_ptr() != low.send.data_ptr() + self.rank * nbytes(low.recv):
                low.send = low.send.clone()
            return call.finish(lambda: call.adapter.reducescatter(low.send, low.recv, low.op, **low.kwargs()), low.steps + steps, [out])

    def reduce(
        self, tensor: torch.Tensor, root: int, op: ReduceOpLike = ReduceOp.SUM, *, out: Optional[torch.Tensor] = None, async_op: bool = False
    ) -> Optional[Work]:
        """Reduce over ranks into root's ``out`` (default: root's ``tensor``); other ranks' tensors are untouched."""
        if not async_op and self._fast.reduction("reduce", tensor, tensor if out is None else out, op, root):
            return None
        name = "reduce"
        if self._check is not None:
            self._check.call(name, check.desc(tensor), f"root={root}", check.op_label(op))
        self._args.tensor(name, "tensor", tensor)
        self._args.root(name, "root", root)
        kind, factor = to_reduce_op(op, name, self.rank)
        out = self._args.out(name, out, tensor)
        is_root = self.rank == root
        if is_root:
            self._args.writable(name, "tensor" if out is tensor else "out", out)
        with self._call(name, "reduce", tensor.device, async_op, tensor, out) as call:
            if tensor.numel() == 0:
                return call.done([out])
            steps: list[Step] = []
            send, recv = reduce_buffers(tensor, out, steps, receives=is_root)
            low = lower_reduction(name, self.rank, self.size, call.adapter, send, recv, kind, factor, divide_here=is_root)
            if native_as_called(low, kind, tensor.dtype, steps):
                self._fast.remember_reduction(name, tensor, op, call.adapter, low.op)
            return call.finish(lambda: call.adapter.reduce(low.send, low.recv, low.op, root, **low.kwargs()), low.steps + steps, [out])

    # ------------------------------------------------------------------ data movement
    def all_gather(self, out: TensorOrList, tensor: torch.Tensor, *, async_op: bool = False) -> Optional[Work]:
        """Gather every rank's ``tensor`` into ``out`` (a tensor of size * numel elements, or a list of size tensors)."""
        if not async_op and self._fast.movement("all_gather", tensor, out):
            return None
        name = "all_gather"
        if self._check is not None:
            self._check.call(name, check.desc(out), check.kind(tensor))
        self._args.tensor(name, "tensor", tensor)
        with self._call(name, "allgather", tensor.device, async_op, out, tensor) as call:
            steps: list[Step] = []
            if not isinstance(out, torch.Tensor):
                outs = self._args.tensors(name, "out", out, tensor, writable=True)
                if any(o.numel() != tensor.numel() for o in outs):
                    return self._all_gather_uneven(call, outs, tensor)
            recv, outputs = self._args.blocks_out(name, out, tensor, steps)
            if tensor.numel() == 0:
                return call.done(outputs)
            s, r = as_bytes(contig_in(tensor)), as_bytes(recv)
            if overlaps(s, r) and s.data_ptr() != r.data_ptr() + self.rank * s.numel():
                s = s.clone()
            self._remember_move(name, tensor.device, call.adapter)
            return call.finish(lambda: call.adapter.allgather(s, r), steps, outputs)

    def _all_gather_uneven(self, call: Call, outs: Sequence[torch.Tensor], tensor: torch.Tensor) -> Optional[Work]:
        """all_gather into blocks of different sizes: one broadcast per rank, launched together."""
        self._args.like(call.op, f"out[{self.rank}]", outs[self.rank], tensor, tensor.numel())
        steps: list[Step] = []
        bufs = [contig_out(o, steps) for o in outs]
        bufs[self.rank].copy_(tensor)
        return call.finish(lambda: broadcast_blocks(call.adapter, bufs), steps, list(outs))

    def broadcast(self, tensor: torch.Tensor, root: int, *, async_op: bool = False) -> Optional[Work]:
        """Copy root's ``tensor`` to every rank, in place."""
        if not async_op and self._fast.movement("broadcast", tensor, None, root):
            return None
        name = "broadcast"
        if self._check is not None:
            self._check.call(name, check.desc(tensor), f"root={root}")
        self._args.tensor(name, "tensor", tensor)
        self._args.root(name, "root", root)
        self._args.writable(name, "tensor", tensor)
        with self._call(name, "broadcast", tensor.device, async_op, tensor) as call:
            if tensor.numel() == 0:
                return call.done([tensor])
            steps: list[Step] = []
            b = as_bytes(contig_inout(tensor, steps))
            self._remember_move(name, tensor.device, call.adapter)
            return call.finish(lambda: call.adapter.broadcast(b, root), steps, [tensor])

    def gather(self, tensor: torch.Tensor, out: Optional[TensorOrList] = None, root: int = 0, *, async_op: bool = False) -> Optional[Work]:
        """Collect every rank's ``tensor`` on root into ``out`` (a tensor of size * numel elements, or a list)."""
        if not async_op and self._fast.movement("gather", tensor, out, root):
            return None
        name = "gather"
        if self._check is not None:
            self._check.call(name, check.desc(tensor), f"root={root}")
        self._args.tensor(name, "tensor", tensor)
        self._args.root(name, "root", root)
        with self._call(name, "gather", tensor.device, async_op, tensor, out) as call:
            steps: list[Step] = []
            outputs: list[torch.Tensor] = []
            recv: Optional[torch.Tensor] = None
            if self.rank == root:
                if out is None:
                    raise invalid(name, self.rank, "out", "is missing on the root", "pass a gather list (or a tensor of size * numel elements) on the root")
                recv, outputs = self._args.blocks_out(name, out, tensor, steps)
            if tensor.numel() == 0:
                return call.done(outputs)
            s = as_bytes(contig_in(tensor))
            r = as_bytes(recv) if recv is not None else None
            self._remember_move(name, tensor.device, call.adapter)
            return call.finish(lambda: call.adapter.gather(s, r, root), steps, outputs)

    def scatter(self, out: torch.Tensor, tensor: Optional[TensorOrList] = None, root: int = 0, *, async_op: bool = False) -> Optional[Work]:
        """Give rank r block r of root's ``tensor`` (size * out.numel() elements, or a list of size tensors)."""
        if not async_op and self._fast.movement("scatter", out, tensor, root):
            return None
        name = "scatter"
        if self._check is not None:
            self._check.call(name, check.desc(out), f"root={root}")
        self._args.tensor(name, "out", out)
        self._args.root(name, "root", root)
        self._args.writable(name, "out", out)
        with self._call(name, "scatter", out.device, async_op, out, tensor) as call:
            send: Optional[torch.Tensor] = None
            if self.rank == root:
                if tensor is None:
                    raise invalid(name, self.rank, "tensor", "is missing on the root", "pass a scatter list (or a tensor of size * numel elements) on the root")
                send = self._args.blocks_in(name, tensor, out)
            if out.numel() == 0:
                return call.done([out])
            steps: list[Step] = []
            r = as_bytes(contig_out(out, steps))
            s = as_bytes(send) if send is not None else None
            self._remember_move(name, out.device, call.adapter)
            return call.finish(lambda: call.adapter.scatter(s, r, root), steps, [out])

    def all_to_all(
        self,
        out: TensorOrList,
        tensor: TensorOrList,
        out_splits: Optional[Sequence[int]] = None,
        in_splits: Optional[Sequence[int]] = None,
        *,
        async_op: bool = False,
    ) -> Optional[Work]:
        """Exchange blocks: block j of ``tensor`` goes to rank j, block i of ``out`` comes from rank i.

        With tensors, blocks split dim 0 evenly, or by ``in_splits`` / ``out_splits``
        (rows per rank); with lists, block j is ``tensor[j]`` / ``out[j]``. In place
        (``out`` is ``tensor``) runs in place on every rank or on none.
        """
        if not async_op and out_splits is None and in_splits is None and self._fast.movement("all_to_all", tensor, out):
            return None
        name = "all_to_all"
        if self._check is not None:
            self._check.call(name, check.kind(tensor))
        if isinstance(tensor, torch.Tensor) != isinstance(out, torch.Tensor):
            raise invalid(name, self.rank, "out", "and 'tensor' must both be tensors or both be lists", "pass two tensors or two lists")
        if isinstance(tensor, torch.Tensor):
            assert isinstance(out, torch.Tensor)
            return self._all_to_all_tensor(out, tensor, out_splits, in_splits, async_op)
        ins = list(tensor)
        if not ins:
            raise invalid(name, self.rank, "tensor", "is an empty list", f"pass {self.size} tensors")
        self._args.tensor(name, "tensor[0]", ins[0])
        ins = self._args.tensors(name, "tensor", ins, ins[0])
        outs = self._args.tensors(name, "out", out, ins[0], writable=True)
        with self._call(name, "alltoallv", ins[0].device, async_op, outs, ins) as call:
            s, send_counts, r, recv_counts, unpack_step = concat_blocks(ins, outs)
            if self._check is not None:
                self._check.counts(name, send_counts, recv_counts)
            return call.finish(lambda: call.adapter.alltoallv(s, send_counts, r, recv_counts), [unpack_step], list(outs))

    def _all_to_all_tensor(
        self, out: torch.Tensor, tensor: torch.Tensor, out_splits: Optional[Sequence[int]], in_splits: Optional[Sequence[int]], async_op: bool
    ) -> Optional[Work]:
        name = "all_to_all"
        self._args.tensor(name, "tensor", tensor)
        self._args.tensor(name, "out", out)
        self._args.like(name, "out", out, tensor)
        self._args.writable(name, "out", out)
        even = in_splits is None and out_splits is None
        if even and (tensor.numel() != out.numel() or (tensor.dim() and tensor.shape[0] % self.size)):
            raise invalid(
                name,
                self.rank,
                "tensor",
                f"shape {tuple(tensor.shape)} / out {tuple(out.shape)} cannot be split evenly over {self.size} ranks",
                "make dim 0 divisible by the group size and out the same size, or pass split sizes",
            )
        with self._call(name, "alltoall" if even else "alltoallv", tensor.device, async_op, out, tensor) as call:
            steps: list[Step] = []
            s, r = as_bytes(contig_in(tensor)), as_bytes(contig_out(out, steps))
            if overlaps(s, r) and not (even and call.adapter.capabilities.alltoall_in_place and s.data_ptr() == r.data_ptr()):
                s = s.clone()
            if even:
                if self._check is not None:
                    self._check.counts(name, [nbytes(tensor) // self.size] * self.size, [nbytes(out) // self.size] * self.size)
                if tensor.numel() == 0:
                    return call.done([out])
                self._remember_move(name, tensor.device, call.adapter)
                return call.finish(lambda: call.adapter.alltoall(s, r), steps, [out])
            send_counts = self._args.split_bytes(name, "in_splits", tensor, in_splits)
            recv_counts = self._args.split_bytes(name, "out_splits", out, out_splits)
            if self._check is not None:
                self._check.counts(name, send_counts, recv_counts)
            return call.finish(lambda: call.adapter.alltoallv(s, send_counts, r, recv_counts), steps, [out])

    # ------------------------------------------------------------------ point to point, barriers
    def send(self, tensor: torch.Tensor, peer: int, *, async_op: bool = False) -> Optional[Work]:
        """Send ``tensor`` to group rank ``peer``."""
        if not async_op and not self._group.depth:
            if self._fast.p2p("send", tensor, peer) is not None:
                return None
        else:
            posted = self._fast.post("send", tensor, peer)
            if posted is not None:
                return self._posted("send", posted, tensor)
        name = "send"
        self._args.tensor(name, "tensor", tensor)
        self._args.peer(name, peer)
        if self._pairs is not None:
            self._pairs.send(name, tensor, peer)
        with self._call(name, "send", tensor.device, async_op, tensor, peer=peer) as call:
            b = as_bytes(contig_in(tensor))
            self._remember_move(name, tensor.device, call.adapter)
            return call.finish(lambda: call.adapter.send(b, peer), [], [tensor])

    def recv(self, tensor: torch.Tensor, peer: Optional[int] = None, *, async_op: bool = False) -> Union[Work, int, None]:
        """Receive into ``tensor`` from ``peer`` (None: any source, where the adapter allows it).

        Synchronous calls return the source rank; asynchronous ones return a Work whose
        ``source_rank()`` tells it.
        """
        if not async_op and not self._group.depth:
            source = self._fast.p2p("recv", tensor, peer)
            if source is not None:
                return source
        else:
            posted = self._fast.post("recv", tensor, peer)
            if posted is not None:
                return self._posted("recv", posted, tensor)
        name = "recv"
        self._args.tensor(name, "tensor", tensor)
        self._args.writable(name, "tensor", tensor)
        with self._call(name, "recv", tensor.device, async_op, tensor, peer=-1 if peer is None else peer) as call:
            if peer is None:
                if not call.adapter.capabilities.any_source:
                    raise NotSupported(f"adapter {call.adapter.name} cannot receive from any source; pass the sending rank", op=name, rank=self.rank)
            else:
                self._args.peer(name, peer)
            steps: list[Step] = []
            b = as_bytes(contig_out(tensor, steps))
            if self._pairs is not None and peer is not None:
                steps.append(self._pairs.recv(name, tensor, peer))
            self._remember_move(name, tensor.device, call.adapter)
            if async_op or call.group is not None:
                return call.finish(lambda: call.adapter.recv(b, peer), steps, [tensor])
            source = call.adapter.recv_wait(b, peer)
            for step in steps:
                step()
            return source

    def _posted(self, op: str, posted: tuple[Handle, int], tensor: torch.Tensor) -> Work:
        """The Work of a send or recv the fast path posted (the group's, inside one)."""
        handle, index = posted
        work = Work(op, [handle], outputs=[tensor])
        if index >= 0:
            work.trace = (self.recorder, index)  # type: ignore[assignment]
        if self._group.depth:
            self._group.works.append(work)
        return work

    def barrier(self, *, async_op: bool = False) -> Optional[Work]:
        """Block until every rank has called barrier."""
        name = "barrier"
        if self._check is not None:
            self._check.call(name)
        with self._call(name, "barrier", _CPU, async_op) as call:
            return call.finish(call.adapter.barrier, [], [])

    def monitored_barrier(self, timeout: Union[None, float, timedelta] = None, wait_all_ranks: bool = False) -> None:
        """A barrier through the store that names the ranks that did not arrive (see :mod:`.monitored`)."""
        self._open("monitored_barrier")
        secs = _seconds(timeout)
        self._monitored.wait(self.timeout if timeout is None else (secs or 0.0), wait_all_ranks)

    # ------------------------------------------------------------------ groups, subgroups, lifetime
    def group_start(self) -> None:
        """Start a group: ops are launched together at group_end (NCCL semantics)."""
        self._open("group_start")
        self._group.depth += 1
        self._fast.enabled = False

    def group_end(self) -> Work:
        """End the group; returns one Work covering every op issued inside it."""
        if self._group.depth == 0:
            raise InvalidArgument("group_end without group_start", op="group_end", rank=self.rank)
        self._group.depth -= 1
        if self._group.depth:
            return Work("group")
        self._fast.enabled = self._fast.allowed
        return self._group.end(self._side)

    @contextmanager
    def group(self) -> Iterator[list[Work]]:
        """``with comm.group():`` launch the ops inside together (see group_start)."""
        self.group_start()
        holder: list[Work] = []
        try:
            yield holder
        finally:
            holder.append(self.group_end())

    def split(self, ranks: Sequence[int], *, name: Optional[str] = None) -> Optional[Communicator]:
        """A communicator over ``ranks`` (group ranks of this one, in the child's rank order).

        Every rank of this communicator must call it; non-members get None. Device
        adapters that can split (NCCL: ncclCommSplit) give the child its device
        communicator without a new bootstrap; the rest are created on first use.
        """
        self._open("split")
        ranks = [int(r) for r in ranks]
        if sorted(set(ranks)) != sorted(ranks) or any(not 0 <= r < self.size for r in ranks) or not ranks:
            raise invalid("split", self.rank, "ranks", f"{ranks} must be distinct ranks in [0, {self.size})", "pass a non-empty list of distinct group ranks")
        self._seq += 1
        children = {t: self.split_device(t, ranks) for t in (self._adapters.splittable() if self._adapters is not None else [])}
        if self.rank not in ranks:
            return None
        store = dist.PrefixStore(f"split/{self._seq}/{','.join(map(str, ranks))}/", self._store)
        return Communicator(
            store,
            ranks.index(self.rank),
            len(ranks),
            timeout=self.timeout,
            name=name or f"{self.name}.split{self._seq}",
            global_ranks=[self.global_ranks[r] for r in ranks],
            _records=[self._records[r] for r in ranks],
            _device_adapters={t: a for t, a in children.items() if a is not None},
        )

    def can_split(self, device_type: str) -> bool:
        """Whether the adapter for ``device_type`` splits without a new bootstrap (created or not yet)."""
        return self._adapters is not None and self._adapters.can_split(device_type)

    def split_device(self, device_type: str, ranks: Optional[Sequence[int]]) -> Optional[Adapter]:
        """Split only the device adapter (every rank calls; ``ranks=None`` joins no child).

        Returns the child adapter for members, None otherwise. Used by the torch
        backend, whose subgroups are built by their members only.
        """
        assert self._adapters is not None
        return self._adapters.split_device(device_type, ranks)

    def connect(self, device: Union[str, torch.device]) -> None:
        """Create the adapter for ``device`` now instead of at its first op (every rank calls)."""
        self._open("connect")
        self._adapter(torch.device(device), "connect")

    def abort(self) -> None:
        """Tear down without waiting for peers, after dumping the flight recorder; every later call raises CommAborted. Never raises (failures are logged)."""
        if self._closed is None:
            self._closed = "aborted"
            self._fast.allowed = self._fast.enabled = False
            if self.recorder is not None:
                flight.dump_on_abort(self.name)
                flight.close(self.recorder)
            self._transports.abort()

    def destroy(self) -> None:
        """Release every transport (all of them: the first failure is raised afterwards); every later call raises CommAborted."""
        if self._closed is None:
            self._closed = "destroyed"
            self._fast.allowed = self._fast.enabled = False
            if self.recorder is not None:
                flight.close(self.recorder)
            self._transports.close()

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"Communicator(name={self.name!r}, rank={self.rank}, size={self.size})"


__all__ = ["Communicator", "PremulSum", "ReduceOp"]
