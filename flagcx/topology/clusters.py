"""Clusters: the sets of ranks that one native adapter connects (heterogeneous mode).

Ranks with the same cluster label (vendor + device type by default, or
FLAGCX_CLUSTER_ID) form a cluster; a cluster's ranks need not be contiguous in rank
order. One cluster means a homogeneous communicator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .detect import RankRecord


@dataclass(frozen=True)
class Cluster:
    """One cluster: its label, member ranks (ascending), device type and hosts."""

    label: str
    ranks: tuple[int, ...]
    device_type: str
    hosts: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.ranks)

    def local_rank(self, rank: int) -> int:
        return self.ranks.index(rank)


def form_clusters(records: Sequence[RankRecord]) -> list[Cluster]:
    """Group ranks by cluster label, ordered by each cluster's lowest rank."""
    members: dict[str, list[int]] = {}
    for rank, rec in enumerate(records):
        members.setdefault(rec.cluster, []).append(rank)
    clusters = []
    for label, ranks in members.items():
        types = {records[r].device_type for r in ranks}
        if len(types) != 1:
            detail = ", ".join(f"rank {r}: {records[r].device_type}" for r in ranks)
            raise ValueError(f"cluster {label!r} mixes device types ({detail}); give each device type its own FLAGCX_CLUSTER_ID")
        hosts = tuple(dict.fromkeys(records[r].host for r in ranks))
        clusters.append(Cluster(label, tuple(ranks), types.pop(), hosts))
    return sorted(clusters, key=lambda c: c.ranks[0])
