"""The NCCL adapter's point-to-point queue: send/recv posted outside a group are launched together.

:class:`QueuedP2P` is mixed into :class:`~flagcx.adapters.nccl.NcclAdapter`. Outside an
explicit group, send/recv are queued with the stream that was current when they were
posted, and launched inside one ncclGroupStart/End when a collective is issued on the
adapter, when a group starts, or when one of their handles is waited on or polled
(:class:`P2PHandle`). Inside group_start/group_end they launch directly.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch

from ...errors import FlagcxError, NotSupported
from ..base import DONE, AdapterContext, Handle


class P2PBatch:
    """Queued send/recv launched together; ``events`` (per raw stream) once launched, or the launch error."""

    __slots__ = ("events", "error")

    def __init__(self) -> None:
        self.events: Optional[dict[int, torch.cuda.Event]] = None
        self.error: Optional[BaseException] = None


class P2PHandle(Handle):
    """A queued send or recv: waiting launches the queue, then orders the caller's stream after it."""

    __slots__ = ("_adapter", "_batch", "_stream")

    def __init__(self, adapter: QueuedP2P, batch: P2PBatch, stream: int) -> None:
        self._adapter = adapter
        self._batch = batch
        self._stream = stream

    def _launched(self) -> dict[int, torch.cuda.Event]:
        batch = self._batch
        if batch.events is None and batch.error is None:
            self._adapter._flush()
        if batch.error is not None:
            raise batch.error
        assert batch.events is not None
        return batch.events

    def wait(self, timeout: Optional[float] = None) -> None:
        if self._adapter._failed is not None:
            raise self._adapter._failed
        event = self._launched()[self._stream]
        current = torch.cuda.current_stream(self._adapter._device)
        if current.cuda_stream != self._stream:
            current.wait_event(event)

    def done(self) -> bool:
        try:
            events = self._launched()
        except FlagcxError:
            return True  # finished, with an error that wait() raises
        return events[self._stream].query()


class QueuedP2P:
    """send / recv and their queue (the adapter sets the attributes in its ``_bind``)."""

    ctx: AdapterContext
    rank: int
    _depth: int
    _pending: list[tuple[bool, torch.Tensor, int, torch.cuda.Stream]]
    _batch: P2PBatch
    _device: torch.device
    _failed: Optional[FlagcxError]
    _send: Any
    _recv: Any
    _group_start: Any
    _group_end: Any
    _raw_stream: Any
    _index: int
    _watched: bool
    _watch_lock: Any
    _launches: Any
    _comm: Any
    _dtype: Any
    _error: Any

    def send(self, tensor: torch.Tensor, peer: int) -> Handle:
        return self._p2p(True, tensor, peer)

    def recv(self, tensor: torch.Tensor, peer: Optional[int]) -> Handle:
        if peer is None:
            raise NotSupported("NCCL cannot receive from any source; pass the sending rank", op="recv", rank=self.rank)
        return self._p2p(False, tensor, peer)

    def _p2p(self, is_send: bool, tensor: torch.Tensor, peer: int) -> Handle:
        n = tensor.numel()
        if not n:
            return DONE
        if self._depth:
            fn, call = (self._send, "Send") if is_send else (self._recv, "Recv")
            rc = fn(tensor.data_ptr(), n, self._dtype(tensor, call.lower()), peer, self._comm, self._raw_stream(self._index))
            if rc:
                raise self._error(rc, call, f"{call.lower()} with {self.ctx.peer_name(peer)}")
            return DONE
        stream = torch.cuda.current_stream(self._device)
        self._pending.append((is_send, tensor, peer, stream))
        return P2PHandle(self, self._batch, stream.cuda_stream)

    def _flush(self) -> None:
        """Launch every queued send/recv inside one NCCL group, each on the stream it was posted on."""
        pending, self._pending = self._pending, []
        batch, self._batch = self._batch, P2PBatch()
        comm = self._comm
        err = None
        rc = self._group_start()
        if rc:
            err = self._error(rc, "GroupStart", "send/recv")
        else:
            for is_send, tensor, peer, stream in pending:
                fn, call = (self._send, "Send") if is_send else (self._recv, "Recv")
                rc = fn(tensor.data_ptr(), tensor.numel(), self._dtype(tensor, call.lower()), peer, comm, stream.cuda_stream)
                if rc and err is None:
                    err = self._error(rc, call, f"{call.lower()} with {self.ctx.peer_name(peer)}")
            rc = self._group_end()
            if rc and err is None:
                err = self._error(rc, "GroupEnd", "send/recv")
        if err is not None:
            batch.error = err
            raise err
        events: dict[int, torch.cuda.Event] = {}
        for _, _, _, stream in pending:
            if stream.cuda_stream not in events:
                event = torch.cuda.Event()
                event.record(stream)
                events[stream.cuda_stream] = event
        batch.events = events
        if self._watched and not torch.cuda.is_current_stream_capturing():
            now = time.monotonic()
            with self._watch_lock:
                self._launches.extend((now, "send/recv", event, False) for event in events.values())
