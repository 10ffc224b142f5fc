"""The hierarchical collective layer: every op of the adapter contract as a plan over the clusters of one communicator.

A communicator whose ranks form several clusters (see :mod:`flagcx.topology.clusters`)
gets one :class:`HeteroAdapter`. It composes adapters, never communicators: the
AdapterSets of its intra, peer and world lanes (:mod:`.lanes`), over a pure
:class:`~.layout.Layout` of who sits where, with device data staged through pinned
host memory (:mod:`.staging`). The algorithms live in one module per family:

- :mod:`.allreduce` (hierarchical or flat, measured per size class by :mod:`.plan`);
- :mod:`.blocks`: reducescatter, allgather;
- :mod:`.rooted`: broadcast, reduce, gather, scatter;
- :mod:`.exchange`: alltoall(v), send, recv, barrier.

Clusters need not be contiguous in rank order and may differ in size. Every op
completes on the host before it returns (``stream_ordered=False``); how ops fail (all
lanes aborted at once, errors in this communicator's rank numbering, the chain of peer
failures, CUDA graph capture refused) is :mod:`.failures`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Optional

import torch

from .. import config
from ..adapters import ALL_OPS, Adapter, AdapterContext, AdapterGroupFactory, Capabilities, Handle
from ..bootstrap import require_same, store_allgather
from ..topology.clusters import Cluster
from ..topology.detect import PeerRecord
from ..types import ReduceOp
from . import allreduce, blocks, exchange, rooted
from .failures import fail_fast
from .lanes import Lanes
from .layout import Layout
from .plan import PlanChooser
from .runtime import Runtime
from .staging import Staging

log = logging.getLogger("flagcx.hetero")

_HIERARCHICAL_OPS = (ReduceOp.SUM, ReduceOp.PROD, ReduceOp.MAX, ReduceOp.MIN)
_CPU = torch.device("cpu")


class HeteroAdapter(Adapter):
    """Hierarchical collectives over the clusters of one communicator (see the module docstring)."""

    name = "hetero"

    def __init__(self, ctx: AdapterContext, records: Sequence[PeerRecord], clusters: Sequence[Cluster], make_group: AdapterGroupFactory) -> None:
        super().__init__(ctx)
        layout = Layout(clusters, ctx.rank, ctx.size)
        intra_cpu, chunk, nlanes, plan = self._agreed_settings(records, layout)
        # creation order (intra lanes, peer lanes, world) is the same on every rank: no member waits on a non-member
        self.lanes = Lanes(
            ctx.store,
            records,
            layout,
            make_group,
            name=ctx.label,
            timeout=ctx.timeout,
            global_ranks=ctx.global_ranks,
            intra_cpu=intra_cpu,
            nlanes=nlanes,
            chunk=chunk,
        )
        self.rt = Runtime(layout, self.lanes, Staging(ctx.rank, ctx.timeout, ctx.label), PlanChooser(None if plan == "auto" else plan), ctx.label)
        caps = [Lanes.host(self.lanes.world, "init").capabilities]
        if self.lanes.peer is not None:
            caps.append(Lanes.host(self.lanes.peer, "init").capabilities)
        if self.lanes.intra is not None:
            caps.append(Lanes.host(self.lanes.intra, "init").capabilities)
            if layout.mine.device_type != "cpu":  # created now, while every member is here (p2p may come first)
                caps.append(self.lanes.intra.adapter(torch.device(layout.mine.device_type), "init").capabilities)
        self.capabilities = self._agreed_capabilities(caps, layout)
        log.info(
            "%s: rank %d in cluster %s (%d of %d clusters, sizes %s), chunk %s, lanes %d",
            ctx.label, ctx.rank, layout.mine.label, layout.ci + 1, layout.k, layout.sizes, chunk or "off", nlanes,
        )  # fmt: skip

    @property
    def layout(self) -> Layout:
        return self.rt.layout

    @property
    def plans(self) -> PlanChooser:
        """The allreduce plan choice (replaceable, e.g. by a fixed plan)."""
        return self.rt.plans

    @plans.setter
    def plans(self, chooser: PlanChooser) -> None:
        self.rt.plans = chooser

    # ------------------------------------------------------------------ init agreement
    def _allgather_json(self, value: dict, key: str) -> list[dict]:
        raw = store_allgather(
            self.ctx.store, key, self.rank, self.size, json.dumps(value).encode(), self.ctx.timeout, f"heterogeneous init of {self.ctx.where}"
        )
        return [json.loads(r) for r in raw]

    def _agreed_settings(self, records: Sequence[PeerRecord], layout: Layout) -> tuple[str, int, int, str]:
        """What every rank must set alike (so all raise, none waits): (this cluster's CPU adapter, chunk, lanes, allreduce plan)."""
        for cluster in layout.clusters:
            require_same(
                [records[r].cpu_adapter for r in cluster.ranks],
                self.rank,
                f"FLAGCX_CPU_ADAPTER in cluster {cluster.label!r}",
                "set one value per cluster",
                ranks=cluster.ranks,
            )
        has_devices = any(c.device_type != "cpu" for c in layout.clusters)
        cfg = config.get()
        mine = {
            "FLAGCX_HETERO_CHUNK": cfg.hetero_chunk or (config.DEFAULT_HETERO_CHUNK if has_devices else 0),
            "FLAGCX_HETERO_LANES": cfg.hetero_lanes or (config.DEFAULT_HETERO_LANES if has_devices else 1),
            "FLAGCX_HETERO_ALLREDUCE": cfg.hetero_allreduce,
        }
        raw = self._allgather_json(mine, "settings")
        agreed = [require_same([a[key] for a in raw], self.rank, key, "set the same value on every rank") for key in mine]
        return records[layout.mine.ranks[0]].cpu_adapter, int(agreed[0]), int(agreed[1]), str(agreed[2])

    def _agreed_capabilities(self, caps: list[Capabilities], layout: Layout) -> Capabilities:
        """The reduce dtypes / ops that every rank's transports support (every rank declares the same)."""
        dtypes = frozenset.intersection(*(c.reduce_dtypes for c in caps))
        ops = frozenset(_HIERARCHICAL_OPS).intersection(*(c.reduce_ops for c in caps))
        raw = self._allgather_json({"dtypes": sorted(str(d) for d in dtypes), "ops": sorted(o.name for o in ops)}, "capabilities")
        names = set.intersection(*(set(a["dtypes"]) for a in raw))
        op_names = set.intersection(*(set(a["ops"]) for a in raw))
        return Capabilities(
            devices=frozenset({"cpu"} | {c.device_type for c in layout.clusters}),
            reduce_dtypes=frozenset(d for d in dtypes if str(d) in names),
            reduce_ops=frozenset(o for o in ops if o.name in op_names),
            ops=ALL_OPS,
            any_source=False,
            stream_ordered=False,
        )

    # ------------------------------------------------------------------ the contract's ops
    @fail_fast
    def allreduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        return allreduce.run(self.rt, send, recv, op)

    @fail_fast
    def reducescatter(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        return blocks.reducescatter(self.rt, send, recv, op)

    @fail_fast
    def allgather(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        return blocks.allgather(self.rt, send, recv)

    @fail_fast
    def broadcast(self, tensor: torch.Tensor, root: int) -> Handle:
        return rooted.broadcast(self.rt, tensor, root)

    @fail_fast
    def reduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, root: int) -> Handle:
        return rooted.reduce(self.rt, send, recv, op, root)

    @fail_fast
    def gather(self, send: torch.Tensor, recv: Optional[torch.Tensor], root: int) -> Handle:
        return rooted.gather(self.rt, send, recv, root)

    @fail_fast
    def scatter(self, send: Optional[torch.Tensor], recv: torch.Tensor, root: int) -> Handle:
        return rooted.scatter(self.rt, send, recv, root)

    @fail_fast
    def alltoall(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        return exchange.alltoall(self.rt, send, recv)

    @fail_fast
    def alltoallv(self, send: torch.Tensor, send_counts: list[int], recv: torch.Tensor, recv_counts: list[int]) -> Handle:
        return exchange.alltoallv(self.rt, send, send_counts, recv, recv_counts)

    @fail_fast
    def send(self, tensor: torch.Tensor, peer: int) -> Handle:
        return exchange.send(self.rt, tensor, peer)

    @fail_fast
    def recv(self, tensor: torch.Tensor, peer: Optional[int]) -> Handle:
        return exchange.recv(self.rt, tensor, peer)

    @fail_fast
    def barrier(self) -> Handle:
        return exchange.barrier(self.rt)

    # ------------------------------------------------------------------ lifetime
    def abort(self) -> None:
        self.lanes.abort()

    def close(self) -> None:
        self.lanes.close()


__all__ = ["HeteroAdapter", "PlanChooser"]
