"""The synchronous fast path: a call that an earlier call of its kind showed needs no lowering goes straight to its adapter.

Every op has one. A reduction whose (op kind, device, dtype, reduce op) the adapter
computed as called (no emulation, no dtype mapping, no copies), or a data movement or
send / recv on a device whose adapter ran that kind before, skips the argument objects,
the Call and the Work: about 1-2 us above the adapter on the CPU. The eligibility rules
are written once per family (:meth:`FastPath.reduction`, :meth:`FastPath.movement`,
which also hands the root's tensor list of gather / scatter to adapters with
``block_lists``, :meth:`FastPath.p2p`); any call that fails them takes the ordinary path, which gives the
same result or the error. Adapters with ``typed_moves`` get the caller's tensors as they
are (a uint8 view costs ~1 us). The flight recorder's entry is written inline here (one
tuple of counts, dtype and a clock reading: about 0.1 us).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from ..adapters import Adapter, Handle
from ..flight import Recorder, failed
from ..flight.ring import clock_ns, next_record_id
from ..tensors import as_bytes, flat
from ..types import ReduceOp, ReduceOpLike

_strided = torch.strided
_ROOTED = frozenset({"broadcast", "gather", "scatter"})
_ROOTED_BLOCKS = frozenset({"gather", "scatter"})


def _dense(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.layout is _strided and t.is_contiguous()


def _apart(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The two buffers do not overlap (tensors.overlaps() inline: ~0.5 us cheaper here; devices are checked by the caller)."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return not (a0 < b0 + b.nbytes and b0 < a0 + a.nbytes)


def _in_block(part: torch.Tensor, whole: torch.Tensor, index: int) -> bool:
    """``part`` is exactly block ``index`` of ``whole`` (NCCL's in-place layout of all_gather, gather, scatter, reduce_scatter)."""
    return part.data_ptr() == whole.data_ptr() + index * part.nbytes


class FastPath:
    """The fast-path cache of one communicator and whether it may run now (``allowed``, ``enabled``)."""

    __slots__ = ("rank", "size", "allowed", "enabled", "recorder", "_reduce", "_move", "_p2p_names")

    def __init__(self, rank: int, size: int, allowed: bool, recorder: Optional[Recorder] = None) -> None:
        self.rank = rank
        self.size = size
        self.allowed = allowed
        """Not under FLAGCX_CHECK or FLAGCX_TRACE_STACK and not closed: posted send / recv may take the fast path, in groups too."""
        self.enabled = allowed
        """Allowed and outside a group: synchronous calls may take it."""
        self.recorder = recorder
        self._reduce: dict[tuple, tuple[Adapter, ReduceOp, bool]] = {}
        self._move: dict[tuple[str, torch.device], tuple[Adapter, bool]] = {}
        self._p2p_names: dict[tuple[str, int], str] = {}

    def remember_reduction(self, kind: str, t: torch.Tensor, op: ReduceOpLike, adapter: Adapter, native: ReduceOp) -> None:
        """Enter (kind, device, dtype, op) (op spellings that are singletons only, so the cache stays small)."""
        if isinstance(op, (ReduceOp, str)) or type(op).__name__ == "RedOpType":
            self._reduce[(kind, t.device, t.dtype, op)] = (adapter, native, adapter.capabilities.stream_ordered)

    def remember_move(self, kind: str, device: torch.device, adapter: Adapter) -> None:
        """Enter (kind, device): data movements and send / recv, which need no dtype logic."""
        self._move[(kind, device)] = (adapter, adapter.capabilities.stream_ordered)

    def _begin(self, kind: str, n: int, m: int, dtype: torch.dtype, ordered: bool) -> int:
        rec = self.recorder
        assert rec is not None
        i = rec.n  # Recorder.begin inline
        rec.ring[i % rec.capacity] = (next_record_id(), i, kind, n, m, dtype, clock_ns(), ordered, None)
        rec.n = i + 1
        return i

    def _root_ok(self, root: object) -> bool:
        return type(root) is int and 0 <= root < self.size

    def reduction(self, kind: str, send: torch.Tensor, recv: object, op: object, root: object = None) -> bool:
        """Run all_reduce, reduce_scatter or reduce (with ``root``) synchronously if eligible; False when the ordinary path must.

        Eligible: enabled; the cache knows the call; dense contiguous non-empty tensors of
        one dtype and device, sized as ``kind`` requires, not overlapping (all_reduce and
        reduce: or the very same tensor; reduce_scatter: or NCCL's in-place layout).
        Checked in the order that rejects a cheap miss first.
        """
        if not self.enabled:
            return False
        try:
            dtype, device = send.dtype, send.device
            entry = self._reduce.get((kind, device, dtype, op))
        except (AttributeError, TypeError):  # not a tensor, or an unhashable op
            return False
        # the hottest call of an engine: checks written inline (a helper call costs ~0.1 us each)
        if entry is None or send.layout is not _strided or not send.is_contiguous() or (kind == "reduce" and not self._root_ok(root)):
            return False
        adapter, native, ordered = entry
        n = send.numel()
        if not n:
            return False
        if recv is send:
            if kind == "reduce_scatter":
                return False
            m = n
        else:
            if not isinstance(recv, torch.Tensor) or recv.layout is not _strided or not recv.is_contiguous() or recv.dtype != dtype or recv.device != device:
                return False
            m = recv.numel()
            if m * (self.size if kind == "reduce_scatter" else 1) != n:
                return False
            s0, r0 = send.data_ptr(), recv.data_ptr()
            if s0 < r0 + recv.nbytes and r0 < s0 + send.nbytes and not (kind == "reduce_scatter" and r0 == s0 + self.rank * recv.nbytes):
                return False  # overlapping, and not NCCL's in-place layout
        rec = self.recorder
        if rec is not None:  # Recorder.begin inline
            i = rec.n
            rec.ring[i % rec.capacity] = (next_record_id(), i, kind, n, m, dtype, clock_ns(), ordered, None)
            rec.n = i + 1
        try:
            if kind == "all_reduce":
                adapter.allreduce(send, recv, native).wait()  # type: ignore[arg-type]
            elif kind == "reduce_scatter":
                adapter.reducescatter(flat(send), flat(recv), native).wait()  # type: ignore[arg-type]
            else:
                adapter.reduce(flat(send), flat(recv), native, root).wait()  # type: ignore[arg-type]
        except BaseException as exc:
            if rec is not None:
                failed(rec, i, exc)
            raise
        if rec is not None:
            rec.done = i + 1
        return True

    def movement(self, kind: str, mine: object, whole: object, root: object = None) -> bool:
        """Run all_gather, all_to_all, broadcast, gather or scatter (the last three with ``root``) synchronously if eligible.

        ``mine`` is this rank's buffer (the input; scatter's output; broadcast's only
        one), ``whole`` the other: size blocks like ``mine`` (all_gather's and gather's
        output, scatter's input; ignored off the root), all_to_all's output (as large as
        ``mine``), None for broadcast. Eligible: enabled; the cache
        knows (kind, device); dense contiguous non-empty tensors of one dtype and device,
        sized as ``kind`` requires, apart or in NCCL's in-place layout (all_to_all: the same buffer).
        """
        if not self.enabled or not _dense(mine):
            return False
        assert isinstance(mine, torch.Tensor)
        moved = self._move.get((kind, mine.device))
        if moved is None:
            return False
        adapter, ordered = moved
        n = mine.numel()
        size, rank = self.size, self.rank
        rooted = kind in _ROOTED
        if not n or (rooted and not self._root_ok(root)):
            return False
        if kind in _ROOTED_BLOCKS and rank != root:
            whole = None  # gather's output and scatter's input matter on the root only
        if whole is None:
            if not (kind == "broadcast" or (rooted and rank != root)):
                return False
            m = n if kind == "broadcast" else 0
        elif kind in _ROOTED_BLOCKS and isinstance(whole, (list, tuple)):
            return self._block_list(kind, adapter, ordered, mine, whole, n, root)
        else:
            if kind == "broadcast" or not _dense(whole):
                return False
            assert isinstance(whole, torch.Tensor)
            m = whole.numel()
            if whole.dtype != mine.dtype or whole.device != mine.device:
                return False
            if kind == "all_to_all":  # in place (the very same buffer) where the adapter takes it
                if m != n or mine.dim() == 0 or mine.shape[0] % size:
                    return False
                if not (_apart(mine, whole) or (adapter.capabilities.alltoall_in_place and mine.data_ptr() == whole.data_ptr())):
                    return False
            elif m != n * size or not (_apart(mine, whole) or _in_block(mine, whole, rank)):
                return False
        i = self._begin(kind, m if kind == "scatter" else n, n if kind == "scatter" else m, mine.dtype, ordered) if self.recorder is not None else 0
        typed = adapter.capabilities.typed_moves
        a = mine if typed else as_bytes(mine)
        b = whole if typed or whole is None else as_bytes(whole)  # type: ignore[arg-type]
        rec = self.recorder
        try:  # inline, as in reduction(): a helper and a closure per call cost ~0.3 us here
            if kind == "all_gather":
                adapter.allgather(a, b).wait()  # type: ignore[arg-type]
            elif kind == "broadcast":
                adapter.broadcast(a, root).wait()  # type: ignore[arg-type]
            elif kind == "all_to_all":
                adapter.alltoall(a, b).wait()  # type: ignore[arg-type]
            elif kind == "gather":
                adapter.gather(a, b, root).wait()  # type: ignore[arg-type]
            else:
                adapter.scatter(b, a, root).wait()  # type: ignore[arg-type]
        except BaseException as exc:
            if rec is not None:
                failed(rec, i, exc)
            raise
        if rec is not None:
            rec.done = i + 1
        return True

    def _block_list(self, kind: str, adapter: Adapter, ordered: bool, mine: torch.Tensor, blocks: list | tuple, n: int, root: object) -> bool:
        """gather into / scatter from the root's tensor list (torch's form) where the adapter takes each block at its own address.

        Eligible besides movement()'s rules: ``size`` dense tensors of mine's dtype, device
        and numel, each apart from ``mine``, or the root's own block at mine's very address.
        """
        if not adapter.capabilities.block_lists or len(blocks) != self.size:
            return False
        dtype, device, rank = mine.dtype, mine.device, self.rank
        for j, t in enumerate(blocks):
            if (
                not _dense(t)
                or t.numel() != n
                or t.dtype != dtype
                or t.device != device
                or not (_apart(t, mine) or (j == rank and t.data_ptr() == mine.data_ptr()))
            ):
                return False
        whole = n * self.size
        i = self._begin(kind, whole if kind == "scatter" else n, n if kind == "scatter" else whole, dtype, ordered) if self.recorder is not None else 0
        if kind == "gather":
            self._recorded(i, lambda: adapter.gather_list(mine, blocks, root).wait())  # type: ignore[arg-type]
        else:
            self._recorded(i, lambda: adapter.scatter_list(blocks, mine, root).wait())  # type: ignore[arg-type]
        return True

    def _recorded(self, i: int, call: Callable[[], object]) -> None:
        """Run ``call`` for recorder entry ``i``: the entry ends when it returns and keeps the error when it raises."""
        rec = self.recorder
        try:
            call()
        except BaseException as exc:
            if rec is not None:
                failed(rec, i, exc)
            raise
        if rec is not None:
            rec.done = i + 1

    def _p2p_adapter(self, kind: str, tensor: torch.Tensor, peer: object) -> Optional[tuple[Adapter, bool]]:
        """The cached adapter of a send or recv of ``tensor`` with ``peer`` (an int, another rank), or None."""
        if not _dense(tensor) or type(peer) is not int or not tensor.numel():
            return None
        moved = self._move.get((kind, tensor.device))
        if moved is None or not 0 <= peer < self.size or peer == self.rank:  # type: ignore[operator]
            return None
        return moved

    def _begin_p2p(self, kind: str, tensor: torch.Tensor, peer: int, ordered: bool) -> int:
        """Recorder.begin's p2p entry, inline (its op names, "send 0->1", built once per peer)."""
        rec = self.recorder
        assert rec is not None
        rec.p2p += 1
        name = self._p2p_names.get((kind, peer))
        if name is None:
            name = self._p2p_names[(kind, peer)] = f"send {self.rank}->{peer}" if kind == "send" else f"recv {self.rank}<-{peer}"
        n = tensor.numel()
        return self._begin(name, n, n, tensor.dtype, ordered)

    def p2p(self, kind: str, tensor: torch.Tensor, peer: object) -> Optional[int]:
        """Run a blocking send or recv if eligible: the peer rank, or None when the ordinary path must."""
        if not self.enabled:
            return None
        found = self._p2p_adapter(kind, tensor, peer)
        if found is None:
            return None
        adapter, ordered = found
        assert isinstance(peer, int)
        i = self._begin_p2p(kind, tensor, peer, ordered) if self.recorder is not None else 0
        t = tensor if adapter.capabilities.typed_moves else as_bytes(tensor)
        self._recorded(i, lambda: adapter.send_wait(t, peer) if kind == "send" else adapter.recv_wait(t, peer))
        return peer

    def post(self, kind: str, tensor: torch.Tensor, peer: object) -> Optional[tuple[Handle, int]]:
        """Post a send or recv on a host adapter if eligible (asynchronous or inside a group): its handle and recorder index (-1: none)."""
        if not self.allowed:
            return None
        found = self._p2p_adapter(kind, tensor, peer)
        if found is None or found[1]:  # stream-ordered adapters need the ordinary path's streams
            return None
        adapter = found[0]
        assert isinstance(peer, int)
        i = self._begin_p2p(kind, tensor, peer, False) if self.recorder is not None else -1
        t = tensor if adapter.capabilities.typed_moves else as_bytes(tensor)
        try:
            return (adapter.send(t, peer) if kind == "send" else adapter.recv(t, peer)), i
        except BaseException as exc:
            if self.recorder is not None:
                failed(self.recorder, i, exc)
            raise
