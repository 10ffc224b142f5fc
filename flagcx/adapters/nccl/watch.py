"""The NCCL adapter's side of the watchdog: one CUDA event per launch, and what :mod:`flagcx.watchdog` asks.

:class:`WatchedLaunches` is mixed into :class:`~flagcx.adapters.nccl.NcclAdapter`; it
records each launch's event (outside groups and graph captures), drops finished ones in
batches, and answers the watchdog's questions (oldest unfinished launch, which peers
did not report); on a timeout the watchdog hands it the error to keep and aborts it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from ...errors import FlagcxError


class WatchedLaunches:
    """Launch tracking state and methods (the adapter sets the attributes in its ``_bind``)."""

    ctx: Any
    _depth: int
    _capturing: Any
    _raw_stream: Any
    _index: int
    _device: torch.device
    _streams: dict[int, torch.cuda.Stream]
    _spare_events: list[torch.cuda.Event]
    _record: Any
    _watch_lock: Any
    _launches: Any
    _peers: Any
    _failed: Optional[FlagcxError]
    abort: Callable[[], None]

    @property
    def watch_timeout(self) -> float:
        return self.ctx.timeout

    @property
    def watch_label(self) -> str:
        return self.ctx.where

    def _track(self, op: str) -> None:
        """Record the launch just enqueued on the current stream (nothing inside a group or a graph capture).

        One event per launch (as torch's ProcessGroupNCCL records per work); finished launches are
        dropped in batches once 64 are queued, so a launch pays about one event query. The
        stream is found by its handle (what the launch itself used); a cached torch Stream
        for a handle records on that very stream, whichever Python object made it current.
        """
        if self._depth or self._capturing():
            return
        raw = self._raw_stream(self._index)
        stream = self._streams.get(raw)
        if stream is None:  # one torch Stream object per CUDA stream: building one per launch costs more than the record
            if len(self._streams) >= 64:
                self._streams.clear()
            stream = self._streams[raw] = torch.cuda.current_stream(self._device)
        event = self._spare_events.pop() if self._spare_events else torch.cuda.Event()
        self._record(event, stream)
        with self._watch_lock:
            self._launches.append((time.monotonic(), op, event, True))
            if len(self._launches) >= 64:
                self._prune()

    def _prune(self) -> None:
        """Drop finished launches from the front (the lock is held)."""
        launches = self._launches
        while launches:
            _, _, event, spare = launches[0]
            try:
                finished = event.query()
            except Exception:  # not queryable (recorded under a capture): not a launch to wait for
                finished = True
            if not finished:
                return
            launches.popleft()
            if spare and len(self._spare_events) < 64:
                self._spare_events.append(event)

    def oldest_pending(self) -> Optional[tuple[float, str]]:
        """(time.monotonic() at launch, op) of the oldest launch not finished on the device."""
        with self._watch_lock:
            self._prune()
            return self._launches[0][:2] if self._launches else None

    def peer_report(self) -> str:
        return self._peers.explain("timed out")

    def fail(self, exc: FlagcxError) -> None:
        """Called by the watchdog: keep ``exc`` for the next call or wait, then ncclCommAbort."""
        self._failed = exc
        self.abort()
