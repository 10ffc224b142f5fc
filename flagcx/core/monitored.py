"""monitored_barrier: a barrier through the store that names the ranks that did not arrive (Gloo's ``monitoredBarrier``).

It runs through the store, not the transport, so it answers even when a rank is stuck
inside a collective. Rank 0 waits for every other rank up to the timeout and raises
FlagcxTimeout naming the first missing rank (every missing rank with
``wait_all_ranks``); the others then raise too, naming rank 0. Every rank must call it
the same number of times.
"""

from __future__ import annotations

import time

import torch.distributed as dist

from ..bootstrap import store_poll
from ..errors import FlagcxTimeout


class MonitoredBarrier:
    """The monitored barriers of one communicator (keys ``monitored/<n>`` in its store)."""

    def __init__(self, store: dist.Store, rank: int, size: int) -> None:
        self._store = store
        self.rank = rank
        self.size = size
        self._seq = 0

    def wait(self, secs: float, wait_all_ranks: bool) -> None:
        """One barrier: every rank within ``secs`` (see the module docstring)."""
        name = "monitored_barrier"
        ms = int(secs * 1000)
        self._seq += 1
        key = f"monitored/{self._seq}"
        if self.rank != 0:
            self._store.set(f"{key}/arrived/{self.rank}", "1")
            verdict = store_poll(self._store, f"{key}/verdict", secs + max(secs, 1.0))
            if verdict != b"ok":
                raise FlagcxTimeout(
                    f"Rank {self.rank} successfully reached monitoredBarrier, but received errors while waiting for send/recv from rank 0. "
                    f"Please check rank 0 logs for faulty rank ({(verdict or b'rank 0 did not answer').decode()})",
                    op=name,
                    rank=self.rank,
                )
            return
        deadline = time.monotonic() + secs
        missing: list[int] = []
        for peer in range(1, self.size):
            left = deadline - time.monotonic()
            if left <= 0 and not wait_all_ranks:
                message = f"Rank 0 timed out in monitoredBarrier after {ms} ms (ranks that answered: {list(range(1, peer))})"
                self._store.set(f"{key}/verdict", message)
                raise FlagcxTimeout(message, op=name, rank=0)
            if store_poll(self._store, f"{key}/arrived/{peer}", max(left, 0.0)) is None:
                missing.append(peer)
                if not wait_all_ranks:
                    break
        if missing:
            who = f"Rank {missing[0]}" if len(missing) == 1 else f"Ranks {', '.join(map(str, missing))}"
            message = f"{who} failed to pass monitoredBarrier in {ms} ms"
            self._store.set(f"{key}/verdict", message)
            raise FlagcxTimeout(message, op=name, rank=0)
        self._store.set(f"{key}/verdict", "ok")
