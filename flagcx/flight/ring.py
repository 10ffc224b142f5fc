"""The flight recorder's ring: the last calls of one communicator, cheap enough to keep on for every call.

A :class:`Recorder` belongs to one Communicator. Each call writes one tuple into a
preallocated ring (no tensor is kept: element counts, the dtype and a monotonic clock
reading only) and moves the ``done`` mark when it returns; a call that raised is kept
with its error. Reading the ring (for a dump) turns the tuples into the entries that
torch's flight-recorder analyzer reads (:mod:`.dump`). ``record_id`` comes from one
counter per process, so entries of all communicators of a rank sort into call order,
as in torch's own recorder.

The Communicator's fast path writes the tuple inline (see :mod:`flagcx.core.fast`);
everything else calls :meth:`Recorder.begin`.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import traceback
import weakref
from collections.abc import Sequence
from typing import Any, Optional

next_record_id = itertools.count().__next__
"""The process's call counter (record_id of torch's dumps): ordered across every communicator of the process."""

clock_ns = time.monotonic_ns
"""The recorder's clock; :mod:`.dump` turns its readings into wall-clock nanoseconds."""

FRAMES = 16
"""Python frames kept per call when FLAGCX_TRACE_STACK=1 (innermost user frames first)."""

# Fields of a ring tuple, in order.
RECORD_ID, INDEX, OP, IN_NUMEL, OUT_NUMEL, DTYPE, T_NS, ORDERED, FRAMES_OF = range(9)
"""ORDERED: a stream-ordered adapter ran it (its return means enqueued); FRAMES_OF: the caller's frames (FLAGCX_TRACE_STACK=1) or None."""

P2P_OPS = ("send ", "recv ")
"""How the names of point-to-point entries begin ("send 0->1", "recv 1<-0", torch's spelling)."""

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_live: weakref.WeakSet[Recorder] = weakref.WeakSet()
_live_lock = threading.Lock()


class Recorder:
    """The ring of one communicator (``capacity`` calls) plus what a dump says about the group."""

    __slots__ = ("name", "desc", "global_ranks", "rank", "capacity", "ring", "n", "done", "p2p", "stack", "errors", "store", "closed", "__weakref__")

    def __init__(self, name: str, global_ranks: Sequence[int], rank: int, capacity: int, *, stack: bool = False, store: Any = None) -> None:
        self.name = name
        self.desc = "undefined"
        self.global_ranks = list(global_ranks)
        self.rank = rank
        self.capacity = capacity
        self.ring: list[Optional[tuple]] = [None] * capacity
        self.n = 0
        """Calls recorded (the next call's index)."""
        self.done = 0
        """Calls below this index returned (unless they raised: ``errors``)."""
        self.p2p = 0
        """Send and recv calls recorded."""
        self.stack = stack
        self.errors: dict[int, tuple[str, str]] = {}
        """Index -> (state, error text) of calls that raised: "scheduled" before the transport, "started" in it."""
        self.store = store
        """The communicator's store: dump requests of peers arrive through it (:mod:`.requests`)."""
        self.closed = False
        with _live_lock:
            _live.add(self)

    @property
    def global_rank(self) -> int:
        return self.global_ranks[self.rank]

    def begin(self, op: str, in_numel: int, out_numel: int, dtype: object, ordered: bool, peer: Optional[int] = None) -> int:
        """Record the start of ``op`` on a stream-``ordered`` adapter or not (``peer``: the other rank of a send or recv); returns its index."""
        i = self.n
        if peer is not None:
            self.p2p += 1
            op = f"{op} {self.rank}->{peer}" if op == "send" else f"{op} {self.rank}<-{peer}"
        frames = _frames() if self.stack else None
        self.ring[i % self.capacity] = (next_record_id(), i, op, in_numel, out_numel, dtype, clock_ns(), ordered, frames)
        self.n = i + 1
        return i

    def end(self, i: int) -> None:
        """Call ``i`` returned."""
        if i >= self.done:
            self.done = i + 1

    def fail(self, i: int, exc: BaseException, started: bool = True) -> None:
        """Call ``i`` raised ``exc`` (``started``: inside the transport; False: refused before it)."""
        self.errors[i] = ("started" if started else "scheduled", f"{type(exc).__name__}: {exc}")
        for gone in [k for k in self.errors if k < self.n - self.capacity]:  # their calls left the ring
            del self.errors[gone]

    def entries(self) -> list[tuple[tuple, int]]:
        """The calls in the ring, oldest first, each with the number of sends and recvs up to it (itself included)."""
        n, cap, p2p = self.n, self.capacity, self.p2p
        ring = list(self.ring)
        kept = [e for e in (ring[i % cap] for i in range(max(0, n - cap), n)) if e is not None and e[INDEX] < n]
        counts = []
        for e in reversed(kept):
            counts.append(p2p)
            if e[OP].startswith(P2P_OPS):
                p2p -= 1
        return list(zip(kept, reversed(counts)))


def live_recorders() -> list[Recorder]:
    """Every recorder of this process whose communicator still exists."""
    with _live_lock:
        return list(_live)


def _frames() -> list[dict[str, Any]]:
    """The caller's frames outside flagcx and torch.distributed, innermost first (torch's frame format)."""
    found = []
    for frame in reversed(traceback.extract_stack(limit=FRAMES + 12)):
        path = os.path.abspath(frame.filename)
        if path.startswith(_PACKAGE) or f"{os.sep}torch{os.sep}distributed{os.sep}" in path:
            continue
        found.append({"name": frame.name, "filename": frame.filename, "line": frame.lineno})
        if len(found) == FRAMES:
            break
    return found
