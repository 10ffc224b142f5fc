"""torch's Work for flagcx's: what the torch.distributed frontend returns from every op.

:class:`FlagcxWork` wraps a flagcx :class:`~flagcx.work.Work` as a ``dist.Work``
(wait, completion, exception, futures, the source rank of a recv from any source);
:func:`completed` is the one finished Work that synchronous calls share.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import FlagcxError
from ..work import Work


class _Completer:
    """One daemon thread that completes the futures of works nobody waits on (DDP hooks)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Work, torch.futures.Future, list]] = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def submit(self, work: Work, future: torch.futures.Future, outputs: list) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="flagcx-completer", daemon=True)
                self._thread.start()
        self._queue.put((work, future, outputs))

    def _run(self) -> None:
        while True:
            work, future, outputs = self._queue.get()
            try:
                work.wait()
            except BaseException as exc:  # surfaced through the future
                future.set_exception(exc)
            else:
                future.set_result(outputs)


_completer = _Completer()


class FlagcxWork(dist.Work):
    """A torch Work over a flagcx Work (wait / is_completed / get_future / exception)."""

    def __init__(self, work: Optional[Work], outputs: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self._work = work
        self._outputs = list(outputs)
        self._future: Optional[torch.futures.Future] = None

    def wait(self, timeout: Optional[timedelta] = None) -> bool:
        if self._work is not None:
            secs = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
            self._work.wait(secs if secs and secs > 0 else None)
        return True

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()

    def is_success(self) -> bool:
        return self._work is None or self._work.is_success()

    def exception(self) -> Optional[BaseException]:
        return None if self._work is None else self._work.exception()

    def result(self) -> list[torch.Tensor]:
        return self._outputs

    def _source_rank(self) -> int:
        if self._work is None:
            raise FlagcxError("source rank is only known for a recv from any source")
        return self._work.source_rank()

    source_rank = _source_rank

    def get_future(self) -> torch.futures.Future:
        if self._future is None:
            devices = sorted({t.device for t in self._outputs if t.device.type != "cpu"}, key=str)
            if devices:
                # Stream-ordered work: the value is ready in stream order once the caller's
                # stream waits for it; a device-aware future records that on set_result.
                fut: torch.futures.Future = torch.futures.Future(devices=list(devices))
                self.wait()
                fut.set_result(self._outputs)
                self._future = fut
                return fut
            fut = torch.futures.Future()
            if self._work is None or self._work.is_completed():
                exc = None if self._work is None else self._work.exception()
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(self._outputs)
            else:
                _completer.submit(self._work, fut, self._outputs)
            self._future = fut
        return self._future


@functools.cache
def completed() -> FlagcxWork:
    """One finished Work shared by every synchronous call that completed in place.

    torch waits on a synchronous call's Work and drops it (``dist.all_reduce`` returns
    None), so building a new one per call (a C++ object behind a Python one) is pure
    cost on the decode path; an asynchronous call always gets its own.
    """
    return FlagcxWork(None)
