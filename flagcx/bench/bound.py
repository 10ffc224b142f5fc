"""The memory-bandwidth bound of a host allreduce, measured in the same run as the sweep.

Every rank at once times ``dst.copy_(src)`` and ``a.add_(b)`` on buffers of the sweep's
largest size (1 MiB to 64 MiB): with as many processes as ranks busy, this is the memory
bandwidth one rank gets while its peers run too. Then the copy again with every core of
the host busy (each rank copying with its share of the cores as torch intra-op threads):
the all-core bandwidth a rank could reach if the transport used more than one thread.
Bytes are those read and written (copy: 2 B, add: 3 B); the slowest rank's median over
``REPEATS`` calls counts.

Model: a host allreduce that stages through shared memory moves at least
``BYTES_PER_RANK`` x S bytes through each rank's memory path for S bytes: its input read
and written into shared memory (2 S), the result read from shared memory and written to
its output (2 S); the reduction's own reads come on top. So no such allreduce of S bytes
takes less than 4 S / copy bandwidth (flagcx's shm transport moves about 5 S + S/n).
The report prints each size's time over that bound for sizes of at least ``MIN_BYTES``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .control import Control

BYTES_PER_RANK = 4
"""Bytes moved through each rank's memory per byte of allreduce (see the module docstring)."""

MIN_BYTES = 1 << 20
"""Sizes below this are latency-bound (and cache-resident): no bound is printed for them."""

MAX_BUFFER = 64 << 20
REPEATS = 5


@dataclass(frozen=True)
class MemoryBandwidth:
    """Per-rank bandwidth with every rank busy, in GB/s (decimal), and how it was measured."""

    copy_gbps: float
    add_gbps: float
    ranks: int
    buffer_bytes: int
    all_core_copy_gbps: float
    """Copy bandwidth per rank with every core busy (``threads`` intra-op threads per rank)."""
    threads: int

    def allreduce_bound_us(self, size: int) -> float:
        """The least time a host allreduce of ``size`` bytes can take under the model, one thread per rank, in us."""
        return BYTES_PER_RANK * size / (self.copy_gbps * 1e3)

    def all_core_bound_us(self, size: int) -> float:
        """The same bound at the all-core copy bandwidth, in us."""
        return BYTES_PER_RANK * size / (self.all_core_copy_gbps * 1e3)

    def as_dict(self) -> dict:
        return {
            "copy_gbps_per_rank": self.copy_gbps,
            "add_gbps_per_rank": self.add_gbps,
            "all_core_copy_gbps_per_rank": self.all_core_copy_gbps,
            "threads_per_rank_all_core": self.threads,
            "ranks_at_once": self.ranks,
            "buffer_bytes": self.buffer_bytes,
            "model": f"host allreduce moves {BYTES_PER_RANK} x size bytes per rank at the copy bandwidth",
        }


def median_seconds(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after one untimed call."""
    fn()  # first touch and warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def buffer_bytes(max_bytes: int) -> int:
    """The size of the buffers the bandwidth is measured on, for a sweep up to ``max_bytes``."""
    return max(MIN_BYTES, min(max_bytes, MAX_BUFFER))


def local_seconds(nbytes: int, repeats: int = REPEATS, add: bool = True) -> tuple[float, float]:
    """(copy, add) seconds of this rank on ``nbytes``-byte float32 host buffers; add is 0.0 unless asked (call it on every rank at once)."""
    a = torch.ones(nbytes // 4, dtype=torch.float32)
    b = torch.ones_like(a)
    return median_seconds(lambda: a.copy_(b), repeats), median_seconds(lambda: a.add_(b), repeats) if add else 0.0


def measure(control: Control, max_bytes: int, cpus: int, local_ranks: int, repeats: int = REPEATS) -> MemoryBandwidth:
    """Copy and add bandwidth per rank with all ranks running, then the copy with all ``cpus`` busy (every rank calls this together)."""
    nbytes = buffer_bytes(max_bytes)
    control.barrier()
    copy_s, add_s = local_seconds(nbytes, repeats)
    threads = max(1, cpus // max(local_ranks, 1))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        control.barrier()
        all_core_s, _ = local_seconds(nbytes, repeats, add=False)
    finally:
        torch.set_num_threads(before)
    copy_s, add_s, all_core_s = control.max_each([copy_s, add_s, all_core_s])
    return MemoryBandwidth(2 * nbytes / copy_s / 1e9, 3 * nbytes / add_s / 1e9, control.size, nbytes, 2 * nbytes / all_core_s / 1e9, threads)
