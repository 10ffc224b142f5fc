"""The one timing loop every backend shares.

Each of the timed calls is measured on its own: ``time.perf_counter_ns()`` around
the call on CPU (host backends return once the op is complete), a pair of CUDA events
on the current stream on GPU (stream-ordered backends make that stream wait for the
op). With CUDA graphs the calls are captured once and every replay is timed, giving
replay time / calls per op. The per-call times of all ranks are combined afterwards
(:func:`summarize`): the time of call i is the slowest rank's, the reported time is
the median over calls.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def warm_up(fn: Callable[[], None], calls: int, device: torch.device) -> None:
    """Untimed calls (NCCL and Gloo set up connections lazily)."""
    for _ in range(calls):
        fn()
    synchronize(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], None], iters: int, device: torch.device) -> list[float]:
    """Seconds taken by each of ``iters`` calls on this rank."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
    times = [0] * iters
    clock = time.perf_counter_ns
    for i in range(iters):
        t0 = clock()
        fn()
        times[i] = clock() - t0
    return [t * 1e-9 for t in times]


def capture(fn: Callable[[], None], iters: int, device: torch.device) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``iters`` back-to-back calls."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    torch.cuda.synchronize(device)
    return graph


def time_replays(graph: torch.cuda.CUDAGraph, replays: int, iters: int, device: torch.device) -> list[float]:
    """Seconds per call for each of ``replays`` graph replays (replay time / calls in the graph)."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for i in range(replays):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) * 1e-3 / iters for s, e in zip(starts, ends)]


def summarize(slowest: list[float]) -> float:
    """The reported time in seconds: median over calls of the per-call maximum over ranks."""
    return statistics.median(slowest)
