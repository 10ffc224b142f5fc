"""The synchronous fast path: a call that an earlier call showed needs no lowering goes straight to its adapter.

A reduction whose (device, dtype, op) the adapter computed as called (no emulation, no
dtype mapping, no copies), or an all-gather on a device whose adapter moved data
before, skips the argument objects, the Call and the Work: about 1 us above the
adapter on the CPU. The eligibility rule is written once, in :meth:`FastPath.run`; any
call that fails it takes the ordinary path, which gives the same result. The flight recorder's entry is written
inline here (one tuple of counts, dtype and a clock reading: about 0.1 us).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..adapters import Adapter
from ..flight import Recorder, failed
from ..flight.ring import clock_ns, next_record_id
from ..tensors import as_bytes, flat
from ..types import ReduceOp, ReduceOpLike


class FastPath:
    """The fast-path cache of one communicator; ``enabled`` is False inside a group, under FLAGCX_CHECK or FLAGCX_TRACE_STACK and once closed."""

    __slots__ = ("size", "enabled", "recorder", "_reduce", "_move")

    def __init__(self, size: int, enabled: bool, recorder: Optional[Recorder] = None) -> None:
        self.size = size
        self.enabled = enabled
        self.recorder = recorder
        self._reduce: dict[tuple, tuple[Adapter, ReduceOp, bool]] = {}
        self._move: dict[torch.device, tuple[Adapter, bool]] = {}

    def remember_reduction(self, t: torch.Tensor, op: ReduceOpLike, adapter: Adapter, native: ReduceOp) -> None:
        """Enter (device, dtype, op) (op spellings that are singletons only, so the cache stays small)."""
        if isinstance(op, (ReduceOp, str)) or type(op).__name__ == "RedOpType":
            self._reduce[(t.device, t.dtype, op)] = (adapter, native, adapter.capabilities.stream_ordered)

    def remember_move(self, device: torch.device, adapter: Adapter) -> None:
        self._move[device] = (adapter, adapter.capabilities.stream_ordered)

    def run(self, kind: str, send: torch.Tensor, recv: object, op: object = None) -> bool:
        """Run ``kind`` (all_reduce, reduce_scatter, all_gather) synchronously if eligible; False when the ordinary path must.

        Eligible: enabled; the cache knows the call; dense contiguous non-empty tensors of
        one dtype and device, sized as ``kind`` requires, not overlapping (allreduce: or
        the very same tensor). Checked in the order that rejects a cheap miss first.
        """
        if not self.enabled:
            return False
        try:
            dtype = send.dtype
            if kind == "all_gather":
                moved = self._move.get(send.device)
                if moved is None:
                    return False
                adapter, ordered = moved
                native = ReduceOp.SUM  # unused
            else:
                entry = self._reduce.get((send.device, dtype, op))
                if entry is None:
                    return False
                adapter, native, ordered = entry
        except (AttributeError, TypeError):  # not tensors, or an unhashable op
            return False
        if send.layout is not torch.strided or not send.is_contiguous():
            return False
        n = send.numel()
        if recv is send:
            if kind != "all_reduce" or not n:
                return False
            recv, m = send, n
        else:
            if not isinstance(recv, torch.Tensor) or not n or recv.dtype != dtype or not recv.is_contiguous() or recv.device != send.device:
                return False
            m = recv.numel()
            if not (n == m if kind == "all_reduce" else m == n * self.size if kind == "all_gather" else n == m * self.size):
                return False
            # tensors.overlaps() inline: its device and size checks are done above, and calling it costs ~0.5 us here
            s0, r0 = send.data_ptr(), recv.data_ptr()
            if s0 < r0 + recv.nbytes and r0 < s0 + send.nbytes:  # overlapping buffers take the ordinary path
                return False
        rec = self.recorder
        if rec is not None:  # Recorder.begin inline
            i = rec.n
            rec.ring[i % rec.capacity] = (next_record_id(), i, kind, n, m, dtype, clock_ns(), ordered, None)
            rec.n = i + 1
        try:
            if kind == "all_reduce":
                adapter.allreduce(send, recv, native).wait()
            elif kind == "reduce_scatter":
                adapter.reducescatter(flat(send), flat(recv), native).wait()
            else:
                adapter.allgather(as_bytes(send), as_bytes(recv)).wait()
        except BaseException as exc:
            if rec is not None:
                failed(rec, i, exc)
            raise
        if rec is not None:
            rec.done = i + 1
        return True
