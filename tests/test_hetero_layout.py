"""The heterogeneous layout as pure data: positions, peer groups and the block permutation, without processes."""

from __future__ import annotations

import pytest
import torch

from flagcx.hetero.layout import Layout, shards
from flagcx.topology.clusters import Cluster


def _clusters(*rank_lists: tuple[int, ...]) -> list[Cluster]:
    return [Cluster(f"cl-{i}", ranks, "cpu", ("h",)) for i, ranks in enumerate(rank_lists)]


def test_shards_cover_every_element_once() -> None:
    for n in (0, 1, 7, 30_011):
        for m in (1, 2, 3, 5):
            parts = shards(n, m)
            assert len(parts) == m and parts[0][0] == 0 and parts[-1][1] == n
            assert all(a <= b for a, b in parts) and all(parts[j][1] == parts[j + 1][0] for j in range(m - 1))


def test_interleaved_unequal_clusters() -> None:
    # clusters {0, 2, 4} and {1, 3}: m = 2; rank 4 (position 2) is represented in peer group 0
    clusters = _clusters((0, 2, 4), (1, 3))
    layouts = [Layout(clusters, r, 5) for r in range(5)]
    first = layouts[0]
    assert (first.k, first.m, first.sizes) == (2, 2, [3, 2])
    assert first.cluster_of == [0, 1, 0, 1, 0] and first.pos_of == [0, 0, 1, 1, 2]
    assert first.group_ranks == [[0, 4, 1], [2, 3]] and first.group_counts == [[2, 1], [1, 1]]
    assert first.p_order == [0, 4, 1, 2, 3] and first.p_offset == [0, 3] and not first.p_identity
    assert sorted(first.p_order) == list(range(5))
    assert [lay.peer_members() for lay in layouts] == [[0, 1], [0, 1], [2, 3], [2, 3], []]
    assert torch.equal(first.perm_index(torch.device("cpu")), torch.tensor([0, 4, 1, 2, 3]))


@pytest.mark.parametrize("n", [0, 5, 6, 37])
def test_my_shard_and_native_shards(n: int) -> None:
    clusters = _clusters((0, 1), (2, 3, 4))
    big = Layout(clusters, 4, 5)  # position 2 of a cluster of 3, m = 2: no shard of its own
    assert big.my_shard(torch.arange(n)) is None and not big.native_shards(6)
    small = Layout(clusters, 1, 5)
    shard = small.my_shard(torch.arange(n))
    a, b = shards(n, 2)[1]
    assert (shard is None) == (b == a) and (shard is None or torch.equal(shard, torch.arange(n)[a:b]))
    assert small.native_shards(6) and not small.native_shards(5)


def test_contiguous_equal_clusters_need_no_permutation() -> None:
    lay = Layout(_clusters((0, 1), (2, 3)), 2, 4)
    assert lay.p_order == [0, 2, 1, 3] and not lay.p_identity  # peer group j holds position j of every cluster
    one = Layout(_clusters((0,), (1,)), 0, 2)
    assert one.m == 1 and one.p_identity and one.group_ranks == [[0, 1]]
