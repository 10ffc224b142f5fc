"""Work: what the Communicator returns for an asynchronous op.

A Work owns the adapter's Handle plus the core's follow-up steps (copy-out of list
outputs, AVG division...). ``wait`` runs the handle's wait, then the steps, exactly
once; an error is kept and raised again by every later ``wait``. On stream-ordered
adapters the steps are stream ops, so ``wait`` never blocks the host.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Optional

import torch

from .errors import FlagcxError
from .flight import Recorder, failed

Step = Callable[[], object]
"""A follow-up step of an op (a copy-out, the AVG division...); its return value is ignored."""


class Work:
    """Handle to one posted op (or a coalesced group of ops)."""

    __slots__ = ("op", "_handles", "_steps", "_outputs", "_exc", "_done", "_lock", "trace")

    def __init__(
        self,
        op: str,
        handles: Sequence = (),
        steps: Sequence[Step] = (),
        outputs: Sequence[torch.Tensor] = (),
        exc: Optional[BaseException] = None,
    ) -> None:
        self.op = op
        self._handles = list(handles)
        self._steps = list(steps)
        self._outputs = list(outputs)
        self._exc = exc
        self._done = exc is None and not self._handles and not self._steps
        self._lock: Optional[threading.Lock] = None if self._done else threading.Lock()
        self.trace: Optional[tuple[Recorder, int]] = None
        """(recorder, index) of the op's flight-recorder entry, completed or failed by ``wait``."""

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Complete the op (or order the current stream after it); raises the op's error.

        Safe to call from several threads: the follow-up steps run exactly once.
        """
        if self._exc is not None:
            raise self._exc
        if self._done:
            return True
        assert self._lock is not None
        with self._lock:
            if self._exc is not None:
                raise self._exc
            if self._done:
                return True
            try:
                for handle in self._handles:
                    handle.wait(timeout)
                for step in self._steps:
                    step()
            except BaseException as exc:
                self._exc = exc
                if self.trace is not None:
                    failed(self.trace[0], self.trace[1], exc)
                raise
            self._done = True
            self._steps = []
            if self.trace is not None:
                self.trace[0].end(self.trace[1])
        return True

    @property
    def finished(self) -> bool:
        """True once ``wait`` has run (or there was nothing to wait for); never waits, unlike ``is_completed``."""
        return self._done

    def is_completed(self) -> bool:
        """True once the op finished (successfully or not); never blocks."""
        if self._done or self._exc is not None:
            return True
        if all(h.done() for h in self._handles):
            try:
                self.wait()
            except FlagcxError:
                pass
            return True
        return False

    def is_success(self) -> bool:
        return self.is_completed() and self._exc is None

    def exception(self) -> Optional[BaseException]:
        return self._exc

    def result(self) -> list[torch.Tensor]:
        """The output tensors of the op."""
        return self._outputs

    def source_rank(self) -> int:
        """For recv from any source: the rank the message came from (after wait)."""
        self.wait()
        if len(self._handles) != 1:
            raise FlagcxError("source_rank() is only defined for a single recv", op=self.op)
        return self._handles[0].source()


def merge(op: str, works: Sequence[Optional[Work]]) -> Work:
    """One Work that completes when every one of ``works`` has."""
    real = [w for w in works if w is not None]
    return Work(op, steps=[w.wait for w in real], outputs=[t for w in real for t in w.result()])
