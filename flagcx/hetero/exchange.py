"""Heterogeneous point-to-point traffic: alltoall(v), send, recv and barrier.

Blocks between ranks of one cluster go over the cluster's intra lane (its native
adapter, device tensors included); blocks between clusters go over ``world`` on the
host, device tensors staged through host memory.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..adapters import DONE, Handle, then
from ..errors import NotSupported
from .lanes import p2p, wait_all
from .runtime import Runtime


def alltoall(rt: Runtime, send: torch.Tensor, recv: torch.Tensor) -> Handle:
    layout = rt.layout
    counts = [send.numel() // layout.size] * layout.size
    return _exchange(rt, "alltoall", send, counts, recv, counts)


def alltoallv(rt: Runtime, send: torch.Tensor, send_counts: list[int], recv: torch.Tensor, recv_counts: list[int]) -> Handle:
    return _exchange(rt, "alltoallv", send, list(send_counts), recv, list(recv_counts))


def _exchange(rt: Runtime, name: str, send: torch.Tensor, send_counts: list[int], recv: torch.Tensor, recv_counts: list[int]) -> Handle:
    layout, lanes, st = rt.layout, rt.lanes, rt.staging
    rt.check_device(send, name)
    me = layout.rank
    soff = [sum(send_counts[:p]) for p in range(layout.size)]
    roff = [sum(recv_counts[:p]) for p in range(layout.size)]
    sblock = lambda t, p: t[soff[p] : soff[p] + send_counts[p]]  # noqa: E731
    rblock = lambda t, p: t[roff[p] : roff[p] + recv_counts[p]]  # noqa: E731
    if send.data_ptr() == recv.data_ptr() and send.numel():
        send = send.clone()
    others = [r for r in range(layout.size) if layout.cluster_of[r] != layout.ci]
    host_send = st.to_host(send)  # before the intra exchange is queued on the same stream
    host_recv = st.to_host(recv, with_data=False)
    handles: list[Handle] = []
    if lanes.intra is not None:
        peers = [r for r in layout.mine.ranks if r != me]
        sends = [(sblock(send, p), layout.pos_of[p]) for p in peers]
        recvs = [(rblock(recv, p), layout.pos_of[p]) for p in peers]
        handles += p2p(lanes.intra_adapter(send, name), sends, recvs)
    rblock(recv, me).copy_(sblock(send, me))
    world = lanes.host(lanes.world, name)
    cross = p2p(world, [(sblock(host_send, p), p) for p in others], [(rblock(host_recv, p), p) for p in others])
    wait_all(cross)
    if recv.device.type != "cpu":
        for p in others:
            if recv_counts[p]:
                rblock(recv, p).copy_(rblock(host_recv, p), non_blocking=True)
    wait_all(handles)
    st.finish_device(recv)
    return DONE


def send(rt: Runtime, tensor: torch.Tensor, peer: int) -> Handle:
    layout, lanes, st = rt.layout, rt.lanes, rt.staging
    rt.check_device(tensor, "send")
    if layout.cluster_of[peer] == layout.ci:
        handle = lanes.intra_adapter(tensor, "send").send(tensor, layout.pos_of[peer])
        return then(handle, lambda: st.finish_device(tensor))
    return lanes.host(lanes.world, "send").send(st.to_host(tensor), peer)


def recv(rt: Runtime, tensor: torch.Tensor, peer: Optional[int]) -> Handle:
    layout, lanes, st = rt.layout, rt.lanes, rt.staging
    if peer is None:
        raise NotSupported("a heterogeneous communicator cannot receive from any source; pass the sending rank", op="recv", rank=rt.rank)
    rt.check_device(tensor, "recv")
    if layout.cluster_of[peer] == layout.ci:
        handle = lanes.intra_adapter(tensor, "recv").recv(tensor, layout.pos_of[peer])
        return then(handle, lambda: st.finish_device(tensor))
    host = st.to_host(tensor, with_data=False)
    handle = lanes.host(lanes.world, "recv").recv(host, peer)
    if host is tensor:
        return handle
    return then(handle, lambda: tensor.copy_(host))


def barrier(rt: Runtime) -> Handle:
    lanes = rt.lanes
    return lanes.host(lanes.world, "barrier").barrier()
