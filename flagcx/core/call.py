"""How one op of the Communicator runs: its adapter, its stream and its completion, held by a :class:`Call`.

Every op builds a Call once its arguments are checked (``with comm._call(...) as call``)
and ends with ``call.finish(launch, steps, outputs)`` or ``call.done(outputs)``. The
per-call state lives in the Call, never in the Communicator:

- host adapters: a synchronous call waits and runs ``steps``; an asynchronous one
  returns a Work that does both on ``wait``;
- stream-ordered adapters (CUDA...): a synchronous op is enqueued on the caller's
  current stream, ``steps`` right after it; an asynchronous op (or one inside a group)
  runs on the communicator's side stream, ordered after the current stream, and the
  caller's tensors are recorded on that stream so the caching allocator keeps them
  alive; the Work waits on an event of the side stream;
- inside a group (:class:`GroupState`), adapters are started once, works collect, and
  stream steps wait for group_end, where the ops are launched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch

from ..adapters import DONE, Adapter, Handle
from ..adapters.streams import SideStream, is_capturing
from ..errors import FlagcxError, InvalidArgument, NotSupported
from ..flight import Recorder, failed
from ..tensors import tensors_in
from ..work import Step, Work, merge


class GroupState:
    """The open group of a Communicator (group_start .. group_end), NCCL semantics."""

    __slots__ = ("depth", "adapters", "works", "steps")

    def __init__(self) -> None:
        self.depth = 0
        self.adapters: list[Adapter] = []
        self.works: list[Work] = []
        self.steps: list[Step] = []

    def join(self, adapter: Adapter) -> None:
        """First use of ``adapter`` inside the group: start its group."""
        if adapter not in self.adapters:
            adapter.group_start()
            self.adapters.append(adapter)

    def end(self, side_of: Callable[[Adapter], SideStream]) -> Work:
        """Launch the group's ops; one Work over every op issued inside it."""
        adapters, works, steps = self.adapters, self.works, self.steps
        self.adapters, self.works, self.steps = [], [], []
        for adapter in adapters:
            adapter.group_end()
        for adapter in adapters:
            if adapter.capabilities.stream_ordered:
                side = side_of(adapter)
                side.enter()
                try:
                    for step in steps:
                        step()
                    works.append(Work("group", [side.record()]))
                finally:
                    side.exit()
        return merge("group", works)


class Call:
    """One op in flight: its adapter, whether it is asynchronous, the side stream it runs on (or None), its recorder entry."""

    __slots__ = ("op", "adapter", "async_op", "group", "side", "_tensors", "rec", "index")

    def __init__(
        self,
        op: str,
        adapter: Adapter,
        async_op: bool,
        group: GroupState,
        side_of: Callable[[Adapter], SideStream],
        tensors: Sequence[object],
        rec: Optional[Recorder] = None,
        index: int = -1,
    ) -> None:
        self.op = op
        self.rec = rec
        self.index = index
        self.adapter = adapter
        self.async_op = async_op
        self.group = group if group.depth else None
        if self.group is not None:
            self.group.join(adapter)
        self.side: Optional[SideStream] = None
        self._tensors = tensors
        if adapter.capabilities.stream_ordered and (async_op or self.group is not None):
            self.side = side_of(adapter)
            self.side.enter()

    def __enter__(self) -> Call:
        return self

    def __exit__(self, exc_type: object, exc: Optional[BaseException], tb: object) -> None:
        if self.rec is not None:
            if exc is not None:
                self._failed(exc)
            elif not (self.async_op or self.group is not None):
                self.rec.end(self.index)
        side = self.side
        if side is None:
            return
        side.exit()
        if not is_capturing(side.stream.device):
            for t in tensors_in(self._tensors):
                if t.device.type != "cpu":
                    t.record_stream(side.stream)

    def _record(self, work: Work) -> Work:
        if self.group is not None:
            self.group.works.append(work)
        if self.rec is not None and work.exception() is None:
            if work.finished:
                self.rec.end(self.index)
            else:
                work.trace = (self.rec, self.index)
        return work

    def _failed(self, exc: BaseException) -> None:
        """The op raised ``exc``: its recorder entry keeps it; a timeout dumps this rank and asks the peers to."""
        assert self.rec is not None
        failed(self.rec, self.index, exc, started=not isinstance(exc, (InvalidArgument, NotSupported)))

    def done(self, outputs: Sequence[torch.Tensor]) -> Optional[Work]:
        """Finish a call with nothing to move (empty tensors)."""
        return self._record(Work(self.op, outputs=outputs)) if (self.async_op or self.group is not None) else None

    def finish(self, launch: Callable[[], Handle], steps: Sequence[Step], outputs: Sequence[torch.Tensor]) -> Optional[Work]:
        """Launch the adapter call and apply the completion policy of its adapter (see the module docstring)."""
        try:
            handle = launch()
        except (InvalidArgument, NotSupported):
            raise
        except FlagcxError as exc:
            if self.async_op or self.group is not None:
                if self.rec is not None:
                    self._failed(exc)
                return self._record(Work(self.op, outputs=outputs, exc=exc))
            raise
        stream = self.adapter.capabilities.stream_ordered
        if self.group is not None:
            if stream:
                self.group.steps.extend(steps)
                steps = ()
            return self._record(Work(self.op, [] if handle is DONE else [handle], steps, outputs))
        if stream and handle is DONE:
            for step in steps:
                step()
            if self.async_op:
                assert self.side is not None
                return self._record(Work(self.op, [self.side.record()], (), outputs))
            return None
        if self.async_op:
            return self._record(Work(self.op, [handle], steps, outputs))
        handle.wait()
        for step in steps:
            step()
        return None
