"""Heterogeneous reducescatter and allgather: blocks permuted so that each peer group's are contiguous.

reducescatter: the input is permuted into peer-group order (:class:`~.layout.Layout`'s
``p_order``); intra reduce-scatter (or reduces) of those blocks -> reduce-scatter (or
reduces) over peer group j on the host -> the representative sends members at
positions >= m their blocks. allgather is the reverse: members send their block to
their representative -> all-gather (or broadcasts) over peer groups -> intra
all-gather (or broadcasts) -> permute back into rank order.
"""

from __future__ import annotations

import torch

from ..adapters import DONE, Handle, grouped
from ..types import ReduceOp
from .lanes import p2p, wait_all
from .runtime import Runtime


def reducescatter(rt: Runtime, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
    layout, lanes, st = rt.layout, rt.lanes, rt.staging
    name = "reducescatter"
    rt.check_device(send, name)
    n = recv.numel()
    size = layout.size
    if layout.p_identity:
        perm = send
    else:
        perm = send.view(size, n).index_select(0, layout.perm_index(send.device)).reshape(-1)
    # intra: position j < m gets the cluster's partial sums of peer group j's blocks
    j = layout.li
    mine = None
    if j < layout.m:
        mine = torch.empty(len(layout.group_ranks[j]) * n, dtype=send.dtype, device=send.device)
    if lanes.intra is None:  # a one-rank cluster: m == 1 and peer group 0 holds every block
        assert mine is not None
        mine.copy_(perm)
    else:
        adapter = lanes.intra_adapter(send, name)
        lengths = [len(g) for g in layout.group_ranks]
        if layout.mine.size == layout.m and len(set(lengths)) == 1:
            assert mine is not None  # every position of the cluster is below m
            adapter.reducescatter(perm, mine, op).wait()
        else:
            spans = [(layout.p_offset[g] * n, (layout.p_offset[g] + lengths[g]) * n) for g in range(layout.m)]
            into = [mine if g == j and mine is not None else perm[a:b] for g, (a, b) in enumerate(spans)]  # mine exists where g == j
            wait_all(grouped(adapter, lambda: [adapter.reduce(perm[a:b], into[g], op, g) for g, (a, b) in enumerate(spans)]))
    # peer group j: cluster c's member gets the totals of the blocks of its cluster's ranks in group j
    out = None
    if mine is not None:
        counts = layout.group_counts[j]
        peer = lanes.host(lanes.peer, name)
        host = st.to_host(mine)
        if len(set(counts)) == 1:
            out_h = torch.empty(counts[layout.ci] * n, dtype=host.dtype, device=host.device, pin_memory=host.is_pinned())
            peer.reducescatter(host, out_h, op).wait()
        else:
            handles = []
            starts = [sum(counts[:c]) * n for c in range(layout.k)]
            for c in range(layout.k):
                seg = host[starts[c] : starts[c] + counts[c] * n]
                handles.append(peer.reduce(seg, seg, op, c))
            wait_all(handles)
            out_h = host[starts[layout.ci] : starts[layout.ci] + counts[layout.ci] * n]
        out = out_h
    # intra: the representative hands each member at position >= m its block
    if out is not None:
        st.to_device(out[:n], recv)
    if lanes.intra is not None and layout.mine.size > layout.m:
        adapter = lanes.intra_adapter(send, name)
        if j < layout.m:
            assert out is not None
            extra = list(range(j + layout.m, layout.mine.size, layout.m))
            dev_out = out if send.device.type == "cpu" else out.to(send.device, non_blocking=True)
            sends = [(dev_out[(i + 1) * n : (i + 2) * n], pos) for i, pos in enumerate(extra)]
            wait_all(p2p(adapter, sends, []))
        else:
            wait_all(p2p(adapter, [], [(recv, j % layout.m)]))
    st.finish_device(recv)
    return DONE


def allgather(rt: Runtime, send: torch.Tensor, recv: torch.Tensor) -> Handle:
    layout, lanes, st = rt.layout, rt.lanes, rt.staging
    name = "allgather"
    rt.check_device(send, name)
    n = send.numel()
    j = layout.li
    # intra: position j < m collects the blocks of its cluster's ranks in peer group j
    pack = send
    if lanes.intra is not None and layout.mine.size > layout.m:
        adapter = lanes.intra_adapter(send, name)
        if j < layout.m:
            extra = list(range(j + layout.m, layout.mine.size, layout.m))
            pack = torch.empty((1 + len(extra)) * n, dtype=send.dtype, device=send.device)
            pack[:n].copy_(send)
            recvs = [(pack[(i + 1) * n : (i + 2) * n], pos) for i, pos in enumerate(extra)]
            wait_all(p2p(adapter, [], recvs))
        else:
            wait_all(p2p(adapter, [(send, j % layout.m)], []))
    # peer group j: every member gets every cluster's pack, cluster by cluster
    size = layout.size
    gathered = recv if layout.p_identity else torch.empty(size * n, dtype=send.dtype, device=send.device)
    if j < layout.m:
        off, cnt = layout.p_offset[j] * n, len(layout.group_ranks[j]) * n
        counts = layout.group_counts[j]
        peer = lanes.host(lanes.peer, name)
        host_in = st.to_host(pack)
        dest = gathered[off : off + cnt]
        host_out = st.to_host(dest, with_data=False)
        if len(set(counts)) == 1:
            peer.allgather(host_in, host_out).wait()
        else:
            starts = [sum(counts[:c]) * n for c in range(layout.k)]
            host_out[starts[layout.ci] : starts[layout.ci] + counts[layout.ci] * n].copy_(host_in)
            handles = []
            for c in range(layout.k):
                handles.append(peer.broadcast(host_out[starts[c] : starts[c] + counts[c] * n], c))
            wait_all(handles)
        st.to_device(host_out, dest)
    # intra: everyone gets every peer group's blocks
    if lanes.intra is not None:
        adapter = lanes.intra_adapter(send, name)
        lengths = [len(g) for g in layout.group_ranks]
        if layout.mine.size == layout.m and len(set(lengths)) == 1:
            off = layout.p_offset[j] * n
            adapter.allgather(gathered[off : off + lengths[j] * n], gathered).wait()
        else:
            starts = [layout.p_offset[g] * n for g in range(layout.m)]
            wait_all(grouped(adapter, lambda: [adapter.broadcast(gathered[a : a + lengths[g] * n], g) for g, a in enumerate(starts)]))
    if not layout.p_identity:
        recv.view(size, n).index_copy_(0, layout.perm_index(send.device), gathered.view(size, n))
    st.finish_device(recv)
    return DONE
