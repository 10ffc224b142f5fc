"""Where each rank sits in a heterogeneous communicator: pure data, testable without processes.

Rank (c, l) is position l of cluster c. m is the smallest cluster size; positions
j < m of every cluster form peer group j, and a rank at position l >= m is represented
in peer group l % m by its cluster's member at position l % m. Reducescatter and
allgather blocks are permuted so that each peer group's blocks are contiguous
(``p_order``: the ranks of peer group 0, cluster by cluster, then group 1, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from ..topology.clusters import Cluster


def shards(n: int, m: int) -> list[tuple[int, int]]:
    """m contiguous shards of n elements (the last ones may be short or empty)."""
    q = -(-n // m)
    return [(min(j * q, n), min((j + 1) * q, n)) for j in range(m)]


class Layout:
    """The clusters of a communicator as seen from ``rank``."""

    def __init__(self, clusters: Sequence[Cluster], rank: int, size: int) -> None:
        self.clusters = list(clusters)
        self.rank = rank
        self.size = size
        self.sizes = [c.size for c in self.clusters]
        self.k = len(self.sizes)
        self.m = min(self.sizes)
        self.cluster_of = [0] * size
        self.pos_of = [0] * size
        for ci, cluster in enumerate(self.clusters):
            for li, r in enumerate(cluster.ranks):
                self.cluster_of[r], self.pos_of[r] = ci, li
        self.ci = self.cluster_of[rank]
        """This rank's cluster."""
        self.li = self.pos_of[rank]
        """This rank's position in its cluster."""
        self.mine = self.clusters[self.ci]
        m, k = self.m, self.k
        self.group_ranks: list[list[int]] = []
        """Peer group j's represented ranks, cluster by cluster."""
        self.group_counts: list[list[int]] = []
        """[j][c]: how many of cluster c's ranks peer group j represents."""
        for j in range(m):
            self.group_counts.append([len(range(j, self.sizes[c], m)) for c in range(k)])
            self.group_ranks.append([self.clusters[c].ranks[pos] for c in range(k) for pos in range(j, self.sizes[c], m)])
        self.p_order = [r for ranks in self.group_ranks for r in ranks]
        self.p_offset = [sum(len(g) for g in self.group_ranks[:j]) for j in range(m)]
        self.p_identity = self.p_order == list(range(size))
        self._p_index: dict[torch.device, torch.Tensor] = {}

    def peer_members(self) -> list[int]:
        """The ranks of this rank's peer group (empty at positions >= m)."""
        return [c.ranks[self.li] for c in self.clusters] if self.li < self.m else []

    def native_shards(self, n: int) -> bool:
        """Whether n elements split into this cluster's m shards by one reduce-scatter / all-gather."""
        return self.mine.size == self.m and n % self.m == 0

    def my_shard(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """This rank's shard of ``t`` (None at positions >= m, or when the shard is empty)."""
        if self.li >= self.m:
            return None
        a, b = shards(t.numel(), self.m)[self.li]
        return t[a:b] if b > a else None

    def perm_index(self, device: torch.device) -> torch.Tensor:
        """``p_order`` as an index tensor on ``device`` (cached)."""
        idx = self._p_index.get(device)
        if idx is None:
            idx = self._p_index[device] = torch.tensor(self.p_order, dtype=torch.long, device=device)
        return idx
