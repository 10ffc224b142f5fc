"""Nested TP planner (flagcx.topology.plan_tp_groups): every invariant over many layouts, every invalid input.

Pure planning, no processes: layouts of 1, 2 and 4 hosts (contiguous and interleaved
rank order) x tp 8/16/32 x ogroup_tp 1/2/4/8 x 1 or 2 TP groups, uneven and random
host layouts, and each invalid argument with the text of its error.
"""

from __future__ import annotations

import itertools
import random
import warnings

import pytest

import flagcx
from flagcx.topology import PlacementWarning, TPPlan, plan_tp_groups


def hosts_for(world: int, nhosts: int, interleaved: bool) -> list[str]:
    return [f"h{r % nhosts if interleaved else r * nhosts // world}" for r in range(world)]


def make_plan(*args, **kwargs) -> tuple[TPPlan, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_tp_groups(*args, **kwargs)
    return plan, [w for w in caught if issubclass(w.category, PlacementWarning)]


def assert_partition(groups: list[list[int]], world: int, size: int) -> None:
    assert all(len(g) == size for g in groups), groups
    assert all(g == sorted(g) for g in groups), "group lists must be ascending (torch group-rank order)"
    assert sorted(r for g in groups for r in g) == list(range(world))


def check_invariants(plan: TPPlan, hosts: list) -> None:
    W, T, t, G = plan.world_size, plan.tp, plan.ogroup_tp, plan.o_groups
    R, D = T // t, W // T
    assert (plan.replicas, plan.dp, plan.ogroups_per_rank) == (R, D, G // t)
    assert plan.hosts == hosts
    assert (plan.order, plan.tp_axes) == ("tp-dp", "otp-orep")
    assert_partition(plan.tp_groups, W, T)
    assert_partition(plan.ogroup_tp_groups, W, t)
    assert_partition(plan.ogroup_replica_groups, W, R)
    assert len(plan.tp_groups) == D and len(plan.ogroup_tp_groups) == D * R and len(plan.ogroup_replica_groups) == D * t
    for d, members in enumerate(plan.tp_groups):
        blocks = plan.ogroup_tp_groups[d * R : (d + 1) * R]
        assert sorted(r for b in blocks for r in b) == members
        assert blocks == sorted(blocks), "blocks of a TP group are numbered by their smallest rank"
        for j in range(t):
            assert plan.ogroup_replica_groups[d * t + j] == sorted(b[j] for b in blocks)
        for b in blocks:  # each block owns every o-group exactly once, in position order
            owned = [g for r in b for g in plan.owned_ogroups(r)]
            assert owned == list(range(G))
    assert plan.rank_order == [r for b in plan.ogroup_tp_groups for r in b]
    if D > 1:
        assert_partition(plan.dp_groups, W, D)
        assert len(plan.dp_groups) == T
    else:
        assert plan.dp_groups == []
    for r in range(W):
        p = plan.placement(r)
        assert p.rank == r and p.host == hosts[r]
        assert plan.tp_groups[p.tp_group][p.tp_rank] == r and plan.tp_group(r) == plan.tp_groups[p.tp_group]
        assert plan.ogroup_tp_groups[p.block][p.ogroup_rank] == r and plan.ogroup_tp_group(r) == plan.ogroup_tp_groups[p.block]
        assert p.block == p.tp_group * R + p.replica_index
        assert plan.ogroup_replica_groups[p.replica_group][p.replica_rank] == r
        assert p.replica_group == p.tp_group * t + p.ogroup_rank
        assert p.ogroups == range(p.ogroup_rank * (G // t), (p.ogroup_rank + 1) * (G // t))
        replica = plan.replica_group(r)
        assert all(plan.placement(q).ogroups == p.ogroups and plan.placement(q).tp_group == p.tp_group for q in replica)
        assert sorted(plan.placement(q).block for q in replica) == list(range(p.tp_group * R, (p.tp_group + 1) * R))
        assert plan.replica_blocks(r) == [plan.placement(q).replica_index for q in replica]
        assert sorted(plan.replica_blocks(r)) == list(range(R))
        if D > 1:
            dp = plan.dp_group(r)
            assert dp[p.dp_rank] == r and plan.dp_groups[p.dp_group] == dp
            assert sorted(plan.placement(q).tp_group for q in dp) == list(range(D))
            assert {plan.placement(q).tp_rank for q in dp} == {p.tp_rank}
        else:
            assert p.dp_group is None and p.dp_rank is None and plan.dp_group(r) is None
    spanning = [i for i, b in enumerate(plan.ogroup_tp_groups) if len({hosts[r] for r in b}) > 1]
    assert plan.cross_host_blocks == spanning


LAYOUTS = [
    (nhosts, tp, ogroup_tp, dp, interleaved)
    for nhosts, tp, ogroup_tp, dp, interleaved in itertools.product([1, 2, 4], [8, 16, 32], [1, 2, 4, 8], [1, 2], [False, True])
    if not (nhosts == 1 and interleaved)
]


@pytest.mark.parametrize("nhosts,tp,ogroup_tp,dp,interleaved", LAYOUTS)
def test_valid_layouts(nhosts, tp, ogroup_tp, dp, interleaved):
    world = tp * dp
    hosts = hosts_for(world, nhosts, interleaved)
    plan, warned = make_plan(world, tp, ogroup_tp, hosts=hosts)
    check_invariants(plan, hosts)
    per_host = world // nhosts
    if per_host % ogroup_tp == 0:
        assert not warned and plan.cross_host_blocks == []
        for b in plan.ogroup_tp_groups:  # consecutive ranks of one host
            host_ranks = [r for r in range(world) if hosts[r] == hosts[b[0]]]
            i = host_ranks.index(b[0])
            assert b == host_ranks[i : i + ogroup_tp]
    else:  # a host is smaller than a block: every block spans the fewest hosts it can, with a warning
        assert len(warned) == 1 and "spans hosts" in str(warned[0].message)
        assert plan.cross_host_blocks == list(range(len(plan.ogroup_tp_groups)))
        assert all(len({hosts[r] for r in b}) == ogroup_tp // per_host for b in plan.ogroup_tp_groups)
    if not interleaved:  # contiguous hosts: Megatron's contiguous layout
        assert plan.rank_order == list(range(world))
        assert plan.tp_groups == [list(range(d * tp, (d + 1) * tp)) for d in range(dp)]
        assert plan.ogroup_tp_groups == [list(range(k * ogroup_tp, (k + 1) * ogroup_tp)) for k in range(world // ogroup_tp)]
        if dp > 1:
            assert plan.dp_groups == [list(range(i, world, tp)) for i in range(tp)]


def test_default_is_one_host_contiguous():
    plan, warned = make_plan(16, 16, 8)
    check_invariants(plan, ["host0"] * 16)
    assert not warned
    assert plan.ogroup_tp_groups == [list(range(8)), list(range(8, 16))]
    assert plan.ogroup_replica_groups == [[j, j + 8] for j in range(8)]
    assert [plan.placement(r).ogroups for r in (0, 7, 8, 15)] == [range(0, 1), range(7, 8), range(0, 1), range(7, 8)]


def test_interleaved_two_hosts_give_single_host_blocks():
    hosts = ["A", "B"] * 8
    plan, warned = make_plan(16, 16, 8, hosts=hosts)
    check_invariants(plan, hosts)
    assert not warned
    assert plan.ogroup_tp_groups == [list(range(0, 16, 2)), list(range(1, 16, 2))]
    assert plan.ogroup_replica_groups == [[2 * j, 2 * j + 1] for j in range(8)]


def test_interleaved_hosts_keep_each_tp_group_on_one_host():
    hosts = ["A", "B"] * 16
    plan, warned = make_plan(32, 16, 8, hosts=hosts)
    check_invariants(plan, hosts)
    assert not warned
    assert plan.tp_groups == [list(range(0, 32, 2)), list(range(1, 32, 2))]
    assert plan.dp_groups == [[2 * i, 2 * i + 1] for i in range(16)]


def test_hosts_as_dict_and_host_order():
    hosts = {r: ("y" if r < 4 else "x") for r in range(8)}
    plan, _ = make_plan(8, 8, 4, hosts=hosts)
    check_invariants(plan, [hosts[r] for r in range(8)])
    assert plan.ogroup_tp_groups == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_uneven_hosts_warn_and_keep_whole_blocks_in_hosts():
    hosts = [0] * 6 + [1] * 10
    plan, warned = make_plan(16, 8, 4, hosts=hosts)
    check_invariants(plan, hosts)
    assert plan.cross_host_blocks == [1] and plan.ogroup_tp_groups[1] == [4, 5, 6, 7]
    assert len(warned) == 1
    text = str(warned[0].message)
    assert "block 1 (ranks [4, 5, 6, 7]) spans hosts ['0', '1']" in text and "ogroup_tp=4" in text and "0: 6, 1: 10" in text


def test_packing_beats_cutting_in_rank_order():
    hosts = ["a", "a", "b", "b", "b", "b", "c", "c"]  # cut in rank order, both blocks would span hosts
    plan, warned = make_plan(8, 8, 4, hosts=hosts)
    check_invariants(plan, hosts)
    assert plan.ogroup_tp_groups == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert plan.cross_host_blocks == [0] and len(warned) == 1


def test_irregular_layout_replica_blocks_map_gather_order():
    hosts = ["A", "B", "B", "C", "C", "A"]
    plan, warned = make_plan(6, 6, 2, hosts=hosts, o_groups=4)
    check_invariants(plan, hosts)
    assert not warned
    assert plan.ogroup_tp_groups == [[0, 5], [1, 2], [3, 4]]
    assert plan.replica_group(5) == [2, 4, 5] and plan.replica_blocks(5) == [1, 2, 0]


def test_random_host_layouts():
    rng = random.Random(7)
    for _ in range(300):
        tp, ogroup_tp = rng.choice([(4, 1), (4, 2), (8, 2), (8, 4), (16, 8), (12, 4), (6, 2)])
        world = tp * rng.choice([1, 2, 3])
        hosts = [rng.randrange(rng.choice([1, 2, 3, 5])) for _ in range(world)]
        plan, warned = make_plan(world, tp, ogroup_tp, hosts=hosts)
        check_invariants(plan, hosts)
        counts = [hosts.count(h) for h in set(hosts)]
        if all(c % ogroup_tp == 0 for c in counts):
            assert not warned and plan.cross_host_blocks == []
        assert bool(warned) == bool(plan.cross_host_blocks)
        assert len(plan.cross_host_blocks) <= sum(c % ogroup_tp != 0 for c in counts)


def test_v4_pro_and_raised_cap():
    plan, _ = make_plan(32, 32, 8, o_groups=16)
    assert plan.owned_ogroups(9) == range(2, 4) and plan.owned_heads(9, 128) == range(16, 32)
    assert plan.wb_columns(9, 1024) == slice(2048, 4096)
    wide, _ = make_plan(32, 32, 16, o_groups=16, max_ogroup_tp=16)
    check_invariants(wide, ["host0"] * 32)
    assert wide.owned_ogroups(17) == range(1, 2)


def test_token_shares():
    plan, _ = make_plan(16, 16, 4)
    assert plan.token_shares(13) == [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 13)]
    assert plan.token_shares(0) == [slice(0, 0)] * 4
    assert plan.token_shares(2) == [slice(0, 1), slice(1, 2), slice(2, 2), slice(2, 2)]
    assert plan.token_shares(8) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]


def test_describe_names_blocks_and_hosts():
    plan, _ = make_plan(16, 16, 8, hosts=["A", "B"] * 8)
    text = plan.describe()
    assert "ogroup_tp 8 (2 block(s) per TP group)" in text and "[0, 2, 4, 6, 8, 10, 12, 14] on ['A']" in text


def expect(match: str, *args, **kwargs) -> None:
    with pytest.raises(flagcx.InvalidArgument, match=match) as info:
        plan_tp_groups(*args, **kwargs)
    assert str(info.value).startswith("flagcx plan_tp_groups: argument '")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["world_size", "tp", "ogroup_tp", "o_groups", "max_ogroup_tp"])
@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8", None])
def test_non_positive_ints(name, bad):
    args = dict(world_size=16, tp=16, ogroup_tp=8, o_groups=8, max_ogroup_tp=8)
    args[name] = bad
    expect(rf"argument '{name}': .* is not a positive integer; pass {name} as an int >= 1", **args)


def test_invalid_layouts():
    expect(r"'tp': world_size=12 is not a multiple of tp=8; use a tp that divides the world size", 12, 8, 4)
    expect(r"'ogroup_tp': tp=16 is not a multiple of ogroup_tp=3; use an ogroup_tp that divides tp", 16, 16, 3)
    expect(r"'ogroup_tp': 16 exceeds max_ogroup_tp=8 .*; use ogroup_tp <= 8 \(the other layers keep tp=16\), or raise max_ogroup_tp", 16, 16, 16)
    expect(r"'ogroup_tp': o_groups=8 is not divisible by ogroup_tp=16: each rank must own whole o-groups", 32, 32, 16, max_ogroup_tp=16)
    expect(r"'ogroup_tp': o_groups=12 is not divisible by ogroup_tp=8: .*; use an ogroup_tp that divides o_groups=12", 16, 16, 8, o_groups=12)
    expect(r"'ogroup_tp': o_groups=8 is not divisible by ogroup_tp=6", 12, 12, 6)


def test_invalid_hosts():
    expect(r"'hosts': has 15 entries but world_size is 16; give one host id per rank", 16, 16, 8, hosts=["a"] * 15)
    expect(r"'hosts': lacks rank\(s\) \[15\]; map every rank 0\.\.15 to its host id", 16, 16, 8, hosts={r: "a" for r in range(15)})
    expect(r"'hosts': has key\(s\) \[16\] outside \[0, 16\)", 16, 16, 8, hosts={r: "a" for r in range(17)})
    expect(r"'hosts': lacks rank\(s\) \[0\] and has key\(s\) \['0'\] outside", 2, 2, 1, hosts={"0": "a", 1: "a"})
    expect(r"'hosts': is a str; pass a list of host ids indexed by rank", 2, 2, 1, hosts="ab")
    expect(r"'hosts': rank 1 has host id \['b'\]; use a string or int host id", 2, 2, 1, hosts=["a", ["b"]])
    expect(r"'hosts': rank 0 has host id None", 2, 2, 1, hosts=[None, "a"])


def test_invalid_helper_arguments():
    plan, _ = make_plan(16, 16, 8)
    with pytest.raises(flagcx.InvalidArgument, match=r"argument 'rank': 16 is not a rank of this plan; pass a rank in \[0, 16\)"):
        plan.placement(16)
    with pytest.raises(flagcx.InvalidArgument, match=r"argument 'heads': 60 is not a multiple of o_groups=8"):
        plan.owned_heads(0, 60)
