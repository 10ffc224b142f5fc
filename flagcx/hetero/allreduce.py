"""Heterogeneous allreduce: the hierarchical plan or the flat one, whichever measured faster for the size.

Hierarchical, chunk by chunk (chunk k on lane k % FLAGCX_HETERO_LANES): intra
reduce-scatter into m shards (or reduces to positions 0..m-1 when the shards do not
line up with the cluster) -> allreduce of shard j over peer group j on the host ->
intra all-gather (or broadcasts from positions 0..m-1). Device clusters queue their
intra phases on the caller's stream and stage only their own shard through pinned
memory, copies overlapped with the peer transfers.

Flat: every rank's whole buffer to the host, one allreduce over ``world``, back. It
wins for small sizes, where the hierarchical plan's three phases cost more than the
data. With FLAGCX_HETERO_ALLREDUCE=auto, :class:`~.plan.PlanChooser` times both
plans on the first calls of each size class and keeps the faster (results are exact
either way).
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..adapters import DONE, Handle
from ..types import ReduceOp
from .layout import shards
from .runtime import Runtime, reduce_to_positions, spread_from_positions


def run(rt: Runtime, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
    """The hierarchical or the flat plan, whichever :class:`PlanChooser` measured faster for this size."""
    rt.check_device(send, "allreduce")
    plan, timed = rt.plans.plan(send.nbytes)
    start = time.perf_counter()
    if plan == "flat":
        _flat(rt, send, recv, op)
    else:
        _hierarchical(rt, send, recv, op)
    rt.plans.record(send.nbytes, time.perf_counter() - start if timed else None, lambda s: _slowest(rt, s))
    return DONE


def _slowest(rt: Runtime, seconds: list[float]) -> list[float]:
    """Element-wise maximum over every rank (a tiny host allreduce over ``world``)."""
    lanes = rt.lanes
    t = torch.tensor(seconds, dtype=torch.float64)
    lanes.host(lanes.world, "allreduce").allreduce(t, t, ReduceOp.MAX).wait()
    return t.tolist()


def _flat(rt: Runtime, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> None:
    """Every rank's whole buffer through the host: one allreduce over ``world`` (device buffers staged in pinned memory)."""
    lanes, st = rt.lanes, rt.staging
    world = lanes.host(lanes.world, "allreduce")
    if send.device.type == "cpu":
        world.allreduce(send, recv, op).wait()
        return
    host = st.pinned(send)
    host.copy_(send)  # waits for the caller's stream (the data is there once it returns)
    world.allreduce(host, host, op).wait()
    recv.copy_(host)  # synchronous: nothing else is queued before it, so it cannot wait on a peer


def _hierarchical(rt: Runtime, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> None:
    """Chunk by chunk (chunk k on lane k % lanes): intra reduce to positions -> peer allreduce -> intra spread."""
    layout, lanes = rt.layout, rt.lanes
    name = "allreduce"
    bounds = lanes.chunks(send)
    if send.device.type != "cpu":
        _device(rt, send, recv, op, bounds)
        return

    def one(k: int, lane: int) -> None:
        a, b = bounds[k]
        reduce_to_positions(rt, send[a:b], recv[a:b], op, name, lane)
        shard = layout.my_shard(recv[a:b])
        if shard is not None:
            lanes.host(lanes.peers[lane], name).allreduce(shard, shard, op).wait()
        spread_from_positions(rt, recv[a:b], name, lane)

    lanes.run(bounds, one)


def _device(rt: Runtime, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, bounds: list[tuple[int, int]]) -> None:
    """The device side of allreduce: this thread drives the native adapter, lane threads the host transfers.

    Every chunk's intra phase is queued on the current stream at once; the host copy
    of this rank's shard of chunk k follows it on the D2H stream; a lane thread
    waits for that copy, all-reduces the shard over its peer lane and queues the copy
    back on the H2D stream; this thread then queues chunk k's intra spread behind it.
    """
    layout, lanes, st = rt.layout, rt.lanes, rt.staging
    name = "allreduce"
    module = torch.get_device_module(send.device.type)
    d2h, h2d = st.copy_streams(send.device)
    current = module.current_stream(send.device)
    host = st.pinned(send) if lanes.peers else None
    down: list = [None] * len(bounds)
    up: list = [None] * len(bounds)
    owned: list[Optional[tuple[int, int]]] = [None] * len(bounds)
    for k, (a, b) in enumerate(bounds):
        reduce_to_positions(rt, send[a:b], recv[a:b], op, name)
        if host is None:
            continue
        sa, sb = shards(b - a, layout.m)[layout.li]
        if sb > sa:
            owned[k] = (a + sa, a + sb)
            d2h.wait_stream(current)
            with module.stream(d2h):
                host[a + sa : a + sb].copy_(recv[a + sa : a + sb], non_blocking=True)
                down[k] = module.Event()
                down[k].record(d2h)
    if host is not None:
        h2d.wait_stream(current)

        def one(k: int, lane: int) -> None:
            span = owned[k]
            if span is None:
                return
            sa, sb = span
            down[k].synchronize()
            assert host is not None
            h = host[sa:sb]
            lanes.host(lanes.peers[lane], name).allreduce(h, h, op).wait()
            with module.stream(h2d):
                recv[sa:sb].copy_(h, non_blocking=True)
                event = module.Event()
                event.record(h2d)
            up[k] = event

        futures = lanes.start(bounds, one)
    for k, (a, b) in enumerate(bounds):
        if host is not None and owned[k] is not None:
            lanes.result(futures, k)
            current.wait_event(up[k])
        spread_from_positions(rt, recv[a:b], name)
    if host is not None:
        lanes.result(futures, None)
        current.wait_stream(d2h)
    st.finish_device(recv)
