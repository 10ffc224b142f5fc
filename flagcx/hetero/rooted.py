"""Heterogeneous rooted ops: broadcast, reduce, gather, scatter.

broadcast / reduce: m shards, moved (chunked, on the lanes) over the peer groups
between the root's cluster and the others, with intra broadcasts / reduces / sends
around them. gather / scatter: intra gather / scatter to each cluster's first rank,
which trades its cluster's blocks with the root over ``world``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..adapters import DONE, Handle
from ..types import ReduceOp
from .lanes import p2p, wait_all
from .layout import shards
from .runtime import Runtime, reduce_to_positions, spread_from_positions


def broadcast(rt: Runtime, tensor: torch.Tensor, root: int) -> Handle:
    layout, lanes, st = rt.layout, rt.lanes, rt.staging
    name = "broadcast"
    rt.check_device(tensor, name)
    rc, lr = layout.cluster_of[root], layout.pos_of[root]
    if layout.ci == rc and lanes.intra is not None:
        lanes.intra_adapter(tensor, name).broadcast(tensor, lr).wait()
    shard = layout.my_shard(tensor)
    if shard is not None:
        st.staged(lanes, shard, lambda lane, h: lane.broadcast(h, rc).wait(), reads=layout.ci == rc, writes=layout.ci != rc, name=name)
    if layout.ci != rc:
        spread_from_positions(rt, tensor, name)
    st.finish_device(tensor)
    return DONE


def reduce(rt: Runtime, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, root: int) -> Handle:
    layout, lanes, st = rt.layout, rt.lanes, rt.staging
    name = "reduce"
    rt.check_device(send, name)
    rc, lr = layout.cluster_of[root], layout.pos_of[root]
    is_root = layout.rank == root
    work = recv if is_root else torch.empty_like(send)
    reduce_to_positions(rt, send, work, op, name)
    shard = layout.my_shard(work)
    if shard is not None:
        st.staged(lanes, shard, lambda lane, h: lane.reduce(h, h, op, rc).wait(), reads=True, writes=layout.ci == rc, name=name)
    if layout.ci == rc and lanes.intra is not None:
        parts = shards(work.numel(), layout.m)
        adapter = lanes.intra_adapter(work, name)
        if is_root:
            recvs = [(work[a:b], j) for j, (a, b) in enumerate(parts) if j != lr]
            wait_all(p2p(adapter, [], recvs))
        elif layout.li < layout.m:
            a, b = parts[layout.li]
            wait_all(p2p(adapter, [(work[a:b], lr)], []))
    st.finish_device(send)
    return DONE


def gather(rt: Runtime, send: torch.Tensor, recv: Optional[torch.Tensor], root: int) -> Handle:
    layout, lanes, st = rt.layout, rt.lanes, rt.staging
    name = "gather"
    rt.check_device(send, name)
    n = send.numel()
    rc, lr = layout.cluster_of[root], layout.pos_of[root]
    is_root = layout.rank == root
    # intra: gather to the root (root's cluster) or to position 0 (other clusters)
    target = lr if layout.ci == rc else 0
    pack = None
    if layout.li == target:
        pack = send if lanes.intra is None else torch.empty(layout.mine.size * n, dtype=send.dtype, device=send.device)
    if lanes.intra is not None:
        lanes.intra_adapter(send, name).gather(send, pack, target).wait()
    world = lanes.host(lanes.world, name)
    if is_root:
        assert recv is not None and pack is not None  # the root's recv; the root holds its cluster's pack
        recv.view(-1, n).index_copy_(0, torch.tensor(layout.mine.ranks, device=send.device), pack.view(-1, n))
        others = [c for c in range(layout.k) if c != rc]
        bufs = {c: st.to_host(torch.empty(layout.sizes[c] * n, dtype=send.dtype, device=send.device), with_data=False) for c in others}
        wait_all(p2p(world, [], [(bufs[c], layout.clusters[c].ranks[0]) for c in others]))
        for c in others:
            idx = torch.tensor(layout.clusters[c].ranks, device=send.device)
            recv.view(-1, n).index_copy_(0, idx, bufs[c].view(-1, n).to(send.device, non_blocking=True))
    elif layout.ci != rc and layout.li == 0:
        assert pack is not None  # position 0 gathered its cluster
        wait_all(p2p(world, [(st.to_host(pack), root)], []))
    st.finish_device(send)
    return DONE


def scatter(rt: Runtime, send: Optional[torch.Tensor], recv: torch.Tensor, root: int) -> Handle:
    layout, lanes, st = rt.layout, rt.lanes, rt.staging
    name = "scatter"
    rt.check_device(recv, name)
    n = recv.numel()
    rc, lr = layout.cluster_of[root], layout.pos_of[root]
    is_root = layout.rank == root
    world = lanes.host(lanes.world, name)
    pack = None
    if is_root:
        assert send is not None
        blocks = send.view(-1, n)
        sends = []
        for c in range(layout.k):
            if c != rc:
                part = blocks.index_select(0, torch.tensor(layout.clusters[c].ranks, device=send.device)).reshape(-1)
                sends.append((st.to_host(part), layout.clusters[c].ranks[0]))
        handles = p2p(world, sends, [])
        pack = blocks.index_select(0, torch.tensor(layout.mine.ranks, device=send.device)).reshape(-1)
        wait_all(handles)
    elif layout.ci != rc and layout.li == 0:
        pack = torch.empty(layout.mine.size * n, dtype=recv.dtype, device=recv.device)
        host = st.to_host(pack, with_data=False)
        wait_all(p2p(world, [], [(host, root)]))
        st.to_device(host, pack)
    source = lr if layout.ci == rc else 0
    if lanes.intra is None:
        assert pack is not None  # a one-rank cluster's rank is the root or its cluster's position 0
        recv.copy_(pack)
    else:
        lanes.intra_adapter(recv, name).scatter(pack, recv, source).wait()
    st.finish_device(recv)
    return DONE
