"""What the heterogeneous algorithms work with: the layout, the lanes, the staging, and the intra-cluster shard phases.

The shard phases are shared by allreduce, broadcast and reduce: a cluster's data is
cut into m shards (m = the smallest cluster size), position j < m handles shard j
between clusters, and the intra phases move shards to and from those positions
(one reduce-scatter / all-gather when the shards line up with the cluster, else
reduces / broadcasts per shard).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import grouped
from ..errors import NotSupported
from ..tensors import as_bytes
from ..types import ReduceOp
from .lanes import Lanes, wait_all
from .layout import Layout, shards
from .plan import PlanChooser
from .staging import Staging


@dataclass
class Runtime:
    """One heterogeneous communicator's parts, as the algorithm modules use them."""

    layout: Layout
    lanes: Lanes
    staging: Staging
    plans: PlanChooser
    name: str

    @property
    def rank(self) -> int:
        return self.layout.rank

    def check_device(self, t: torch.Tensor, op: str) -> None:
        """A rank moves CPU tensors and its own cluster's device type only."""
        kind = t.device.type
        mine = self.layout.mine
        if kind != "cpu" and kind != mine.device_type:
            raise NotSupported(
                f"rank {self.rank} is in cluster {mine.label!r} ({mine.device_type}); it cannot move {t.device} tensors. "
                f"Pass cpu or {mine.device_type} tensors, or set FLAGCX_CLUSTER_ID so that each device type has its own cluster",
                op=op,
                rank=self.rank,
            )


def reduce_to_positions(rt: Runtime, send: torch.Tensor, work: torch.Tensor, op: ReduceOp, name: str, lane: int = 0) -> None:
    """Intra phase: position j < m ends with the cluster's reduction of shard j in ``work``."""
    layout = rt.layout
    n = send.numel()
    if rt.lanes.intra is None:
        if work.data_ptr() != send.data_ptr():
            work.copy_(send)
        return
    adapter = rt.lanes.intra_adapter(send, name, lane)
    if layout.native_shards(n):
        q = n // layout.m
        adapter.reducescatter(send, work[layout.li * q : (layout.li + 1) * q], op).wait()
        return
    parts = shards(n, layout.m)
    wait_all(
        grouped(adapter, lambda: [adapter.reduce(send[a:b], work[a:b] if j == layout.li else send[a:b], op, j) for j, (a, b) in enumerate(parts) if b > a])
    )


def spread_from_positions(rt: Runtime, work: torch.Tensor, name: str, lane: int = 0) -> None:
    """Intra phase: every member gets every shard j from position j."""
    layout = rt.layout
    if rt.lanes.intra is None:
        return
    n = work.numel()
    adapter = rt.lanes.intra_adapter(work, name, lane)
    if layout.native_shards(n):
        q = n // layout.m
        adapter.allgather(as_bytes(work[layout.li * q : (layout.li + 1) * q]), as_bytes(work)).wait()
        return
    parts = shards(n, layout.m)
    wait_all(grouped(adapter, lambda: [adapter.broadcast(as_bytes(work[a:b]), j) for j, (a, b) in enumerate(parts) if b > a]))
