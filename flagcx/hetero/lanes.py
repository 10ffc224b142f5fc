"""The transports of a heterogeneous communicator: AdapterGroups for its intra, peer and world lanes, and the lane threads.

- ``intras[lane]``: the ranks of this rank's cluster, on the cluster's native adapters
  (its requested CPU adapter for host tensors, NCCL & co. for device tensors);
- ``peers[lane]``: this rank's peer group (position j < m in every cluster), on the
  host transport (shm when they share a host, else gloo);
- ``world``: every rank on the host transport (point to point between clusters, barrier).

Large ops are cut into chunks (FLAGCX_HETERO_CHUNK) and chunk k travels on lane
k % FLAGCX_HETERO_LANES, the lanes working in parallel threads (their transports
release the GIL): the host side of a transfer is memory-bound per thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
import torch.distributed as dist

from .. import config
from ..adapters import Adapter, AdapterGroup, AdapterGroupFactory, Handle, grouped
from ..errors import FlagcxTimeout
from ..tensors import as_bytes
from ..topology.detect import PeerRecord
from .layout import Layout

_CPU = torch.device("cpu")

Bounds = list[tuple[int, int]]


class Lanes:
    """The AdapterGroups of one heterogeneous communicator, built by every rank in the same order (intra, peer, world)."""

    def __init__(
        self,
        store: dist.Store,
        records: Sequence[PeerRecord],
        layout: Layout,
        make_group: AdapterGroupFactory,
        *,
        name: str,
        timeout: float,
        global_ranks: Sequence[int],
        intra_cpu: str,
        nlanes: int,
        chunk: int,
    ) -> None:
        self.rank = layout.rank
        self.timeout = timeout
        self.nlanes = nlanes
        self.chunk = chunk

        def over(ranks: Sequence[int], key: str, cpu_adapter: str) -> AdapterGroup:
            ranks = list(ranks)
            return make_group(
                dist.PrefixStore(f"sub/{key}/", store),
                ranks.index(layout.rank),
                len(ranks),
                [records[r] for r in ranks],
                name=f"{name}.{key}",
                timeout=timeout,
                global_ranks=[global_ranks[r] for r in ranks],
                cpu_adapter=cpu_adapter,
            )

        mine = layout.mine
        self.intras: list[Optional[AdapterGroup]] = [
            over(mine.ranks, f"hetero/intra{layout.ci}.{lane}", intra_cpu) if mine.size > 1 else None for lane in range(nlanes)
        ]
        self.intra = self.intras[0]
        members = layout.peer_members()
        self.peers = [over(members, f"hetero/peer{layout.li}.{lane}", "auto") for lane in range(nlanes)] if members else []
        self.peer = self.peers[0] if self.peers else None
        self.world = over(range(layout.size), "hetero/world", "auto")
        self._pool = ThreadPoolExecutor(nlanes, thread_name_prefix="flagcx-hetero") if nlanes > 1 else None

    def intra_adapter(self, t: torch.Tensor, op: str, lane: int = 0) -> Adapter:
        """The intra-cluster adapter for ``t``'s device on ``lane``."""
        intra = self.intras[lane]
        assert intra is not None
        return intra.adapter(t.device, op)

    @staticmethod
    def host(lane: Optional[AdapterGroup], op: str) -> Adapter:
        """The host adapter of ``lane``."""
        assert lane is not None
        return lane.adapter(_CPU, op)

    def sets(self) -> list[AdapterGroup]:
        return [s for s in (*self.intras, *self.peers, self.world) if s is not None]

    def chunks(self, t: torch.Tensor) -> Bounds:
        """Element bounds of ``t``'s chunks (one chunk when chunking is off)."""
        n = t.numel()
        step = max(1, self.chunk // t.element_size()) if self.chunk else n
        return [(a, min(a + step, n)) for a in range(0, n, step)]

    # ------------------------------------------------------------------ lane threads
    def start(self, bounds: Bounds, one: Callable[[int, int], None]) -> list:
        """Start ``one(k, lane)`` for every chunk k, lane = k % lanes: each lane takes its chunks in order, the lanes in parallel.

        Returns per-chunk done flags and error holders for :meth:`result`.
        """
        nlanes = min(self.nlanes, len(bounds))
        progress: list[list[int]] = [[] for _ in range(nlanes)]
        for k in range(len(bounds)):
            progress[k % nlanes].append(k)
        done = [threading.Event() for _ in bounds]
        errors: list[Optional[BaseException]] = [None] * len(bounds)

        def lane_work(lane: int) -> None:
            for k in progress[lane]:
                try:
                    one(k, lane)
                except BaseException as exc:  # handed to the caller by result()
                    errors[k] = exc
                    for rest in progress[lane]:
                        errors[rest] = errors[rest] or exc
                        done[rest].set()
                    return
                done[k].set()

        if self._pool is None or nlanes == 1:
            for lane in range(nlanes):
                lane_work(lane)
        else:
            for lane in range(nlanes):
                self._pool.submit(lane_work, lane)
        return [done, errors]

    def result(self, started: list, k: Optional[int]) -> None:
        """Wait for chunk k (every chunk when k is None) of :meth:`start`; re-raise its error."""
        done, errors = started
        for i in range(len(done)) if k is None else (k,):
            limit = config.LANE_WAIT_FACTOR * self.timeout
            if not done[i].wait(limit):
                raise FlagcxTimeout(f"a transfer between clusters did not finish within {limit:g} s", rank=self.rank)
            if errors[i] is not None:
                raise errors[i]

    def run(self, bounds: Bounds, one: Callable[[int, int], None]) -> None:
        """:meth:`start` and wait for every chunk."""
        self.result(self.start(bounds, one), None)

    # ------------------------------------------------------------------ lifetime
    def abort(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        for s in self.sets():
            s.abort()

    def close(self) -> None:
        for s in self.sets():
            s.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def p2p(adapter: Adapter, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]) -> list[Handle]:
    """Post sends and receives together (one group for adapters that need it)."""
    return grouped(
        adapter,
        lambda: [adapter.recv(as_bytes(t), peer) for t, peer in recvs if t.numel()] + [adapter.send(as_bytes(t), peer) for t, peer in sends if t.numel()],
    )


def wait_all(handles: Sequence[Handle]) -> None:
    for h in handles:
        h.wait()
