"""Nested tensor-parallel group plans for DeepSeek-V4's grouped output projection.

Pure planning: from the world size, the world TP size, the o-group TP size and the
host of every rank, :func:`plan_tp_groups` computes every group's rank list and each
rank's place in them. No process, store or torch.distributed is touched here
(:mod:`flagcx.topology.tp_groups` creates the process groups of a plan).

Layout (``order = "tp-dp"``, the TP axis split into ``tp_axes = "otp-orep"``, fastest
axis first as in Megatron's order strings):

- ``dp`` = world_size / tp copies of the model, one world-TP group each;
- each TP group splits into ``R = tp / ogroup_tp`` o-group blocks (``orep``) of
  ``ogroup_tp`` ranks (``otp``); a block runs attention and the grouped output
  projection for its share of the tokens, its ranks own disjoint o-groups;
- the replica group of a rank: the ranks at the same position in every block of its TP
  group (they hold the same o-group weight shards); an all-gather over it brings every
  token back after the block's all-reduce.

Placement: ranks are taken host by host (hosts in order of their first rank, each host's
ranks ascending) and cut into blocks, so a block lies in one host whenever its host has a
multiple of ``ogroup_tp`` ranks, even when hosts interleave in rank order; when that
cannot hold, whole blocks are packed inside hosts first, the rest are made of the
left-over ranks and a :class:`PlacementWarning` names them.

Every rank list in a plan is ascending, which is the group-rank order torch's
``new_group`` gives (it sorts the ranks), so a rank's position in a list is its group
rank. A block's index inside its TP group (its token share, ``replica_index``) is the one
number that is not a group rank; :meth:`TPPlan.replica_blocks` maps one to the other for
gathers (the identity for every regular layout).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

from ..errors import invalid

OP = "plan_tp_groups"

HostsSpec = Union[None, Sequence[Hashable], Mapping[int, Hashable]]
"""Host of every rank: a list indexed by rank, a dict rank -> host id, or None (one host)."""


class PlacementWarning(UserWarning):
    """A group could not be placed as the topology asks (e.g. an o-group block spans hosts)."""


@dataclass(frozen=True)
class RankPlacement:
    """Where one rank sits in a :class:`TPPlan` (every ``*_rank`` is a torch group rank)."""

    rank: int
    host: Hashable
    tp_group: int
    """Index into ``plan.tp_groups``."""
    tp_rank: int
    """Position in the TP group: the shard index for world-TP layers."""
    block: int
    """Index into ``plan.ogroup_tp_groups`` (the o-group TP group)."""
    replica_index: int
    """Index of the block inside its TP group: which share of the tokens it handles."""
    ogroup_rank: int
    """Position in the block: which o-group shard the rank owns."""
    replica_group: int
    """Index into ``plan.ogroup_replica_groups``."""
    replica_rank: int
    """Position in the replica group."""
    dp_group: Optional[int]
    """Index into ``plan.dp_groups`` (None when world_size == tp)."""
    dp_rank: Optional[int]
    ogroups: range
    """The o-groups this rank owns: their heads, their W_a[g] and their columns of W_b."""


@dataclass(frozen=True)
class TPPlan:
    """The nested TP layout of one job (see the module docstring); build it with :func:`plan_tp_groups`."""

    world_size: int
    tp: int
    ogroup_tp: int
    o_groups: int
    hosts: list[Hashable]
    """Host id of every rank."""
    tp_groups: list[list[int]]
    ogroup_tp_groups: list[list[int]]
    """The o-group blocks; blocks ``d*R .. d*R+R-1`` belong to TP group ``d``, in replica-index order."""
    ogroup_replica_groups: list[list[int]]
    """Group ``d*ogroup_tp + j``: the ranks at position ``j`` of the blocks of TP group ``d``."""
    dp_groups: list[list[int]]
    """Group ``i``: the ranks with TP rank ``i`` in every TP group (same world-TP shards); empty when world_size == tp.

    o-group weights are the same on every rank with the same ``ogroup_rank`` (replicas and DP copies alike)."""
    rank_order: list[int]
    """The ranks block after block (logical index ``j + ogroup_tp*b + tp*d`` -> rank); the identity when hosts are contiguous."""
    cross_host_blocks: list[int]
    """Indices of the blocks that span more than one host (empty when the hosts allow it)."""
    placements: list[RankPlacement] = field(repr=False)
    order: str = "tp-dp"
    tp_axes: str = "otp-orep"

    @property
    def replicas(self) -> int:
        """Blocks per TP group (R = tp / ogroup_tp)."""
        return self.tp // self.ogroup_tp

    @property
    def dp(self) -> int:
        """Number of TP groups (world_size / tp)."""
        return self.world_size // self.tp

    @property
    def ogroups_per_rank(self) -> int:
        return self.o_groups // self.ogroup_tp

    def placement(self, rank: int) -> RankPlacement:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.world_size:
            raise invalid("TPPlan.placement", None, "rank", f"{rank!r} is not a rank of this plan", f"pass a rank in [0, {self.world_size})")
        return self.placements[rank]

    def tp_group(self, rank: int) -> list[int]:
        return self.tp_groups[self.placement(rank).tp_group]

    def ogroup_tp_group(self, rank: int) -> list[int]:
        return self.ogroup_tp_groups[self.placement(rank).block]

    def replica_group(self, rank: int) -> list[int]:
        return self.ogroup_replica_groups[self.placement(rank).replica_group]

    def dp_group(self, rank: int) -> Optional[list[int]]:
        p = self.placement(rank)
        return None if p.dp_group is None else self.dp_groups[p.dp_group]

    def owned_ogroups(self, rank: int) -> range:
        return self.placement(rank).ogroups

    def owned_heads(self, rank: int, heads: int) -> range:
        """Attention heads of the rank's o-groups, for a model with ``heads`` heads in ``o_groups`` groups."""
        if heads % self.o_groups:
            raise invalid("TPPlan.owned_heads", rank, "heads", f"{heads} is not a multiple of o_groups={self.o_groups}", "pass the model's head count")
        per = heads // self.o_groups
        g = self.owned_ogroups(rank)
        return range(g.start * per, g.stop * per)

    def wb_columns(self, rank: int, o_lora_rank: int) -> slice:
        """Columns of W_b (hidden x o_groups*o_lora_rank) that multiply the rank's z_g."""
        g = self.owned_ogroups(rank)
        return slice(g.start * o_lora_rank, g.stop * o_lora_rank)

    def token_shares(self, tokens: int) -> list[slice]:
        """The token range of each block of a TP group (chunks of ceil(tokens / R); trailing ones may be short or empty)."""
        chunk = math.ceil(tokens / self.replicas) if tokens else 0
        return [slice(min(b * chunk, tokens), min((b + 1) * chunk, tokens)) for b in range(self.replicas)]

    def replica_blocks(self, rank: int) -> list[int]:
        """For each member of the rank's replica group, in group-rank order, the replica index of its block."""
        return [self.placements[r].replica_index for r in self.replica_group(rank)]

    def describe(self) -> str:
        """A few lines for logs: sizes, groups and hosts."""
        lines = [
            f"world {self.world_size}, tp {self.tp} ({self.dp} TP group(s)), ogroup_tp {self.ogroup_tp} "
            f"({self.replicas} block(s) per TP group), o_groups {self.o_groups}, order {self.order} [{self.tp_axes}]",
            f"tp groups: {self.tp_groups}",
            "o-group blocks: " + ", ".join(f"{b} on {sorted({str(self.hosts[r]) for r in b})}" for b in self.ogroup_tp_groups),
            f"replica groups: {self.ogroup_replica_groups}",
        ]
        if self.dp_groups:
            lines.append(f"dp groups: {self.dp_groups}")
        if self.cross_host_blocks:
            lines.append(f"cross-host blocks: {self.cross_host_blocks}")
        return "\n".join(lines)


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise invalid(OP, None, name, f"{value!r} is not a positive integer", f"pass {name} as an int >= 1")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise invalid(OP, None, name, f"{value!r} is not a positive integer", f"pass {name} as an int >= 1") from None
    if number < 1:
        raise invalid(OP, None, name, f"{number} is not a positive integer", f"pass {name} as an int >= 1")
    return number


def _host_list(hosts: HostsSpec, world_size: int) -> list[Hashable]:
    if hosts is None:
        return ["host0"] * world_size
    if isinstance(hosts, Mapping):
        keys = set(hosts)
        missing = sorted(set(range(world_size)) - keys)
        extra = sorted((k for k in keys if k not in range(world_size)), key=repr)
        if missing or extra:
            problem = (f"lacks rank(s) {missing[:8]}" if missing else "") + (" and " if missing and extra else "")
            problem += f"has key(s) {extra[:8]} outside [0, {world_size})" if extra else ""
            raise invalid(OP, None, "hosts", problem, f"map every rank 0..{world_size - 1} to its host id")
        values = [hosts[r] for r in range(world_size)]
    elif isinstance(hosts, Sequence) and not isinstance(hosts, (str, bytes)):
        if len(hosts) != world_size:
            raise invalid(
                OP,
                None,
                "hosts",
                f"has {len(hosts)} entries but world_size is {world_size}",
                "give one host id per rank (a list indexed by rank or a dict rank -> host)",
            )
        values = list(hosts)
    else:
        raise invalid(OP, None, "hosts", f"is a {type(hosts).__name__}", "pass a list of host ids indexed by rank, a dict rank -> host, or None")
    for r, h in enumerate(values):
        if h is None or not isinstance(h, Hashable):
            raise invalid(OP, None, "hosts", f"rank {r} has host id {h!r}", "use a string or int host id for every rank")
    return values


def _ranks_by_host(hosts: list[Hashable]) -> dict[Hashable, list[int]]:
    by_host: dict[Hashable, list[int]] = {}
    for rank, host in enumerate(hosts):
        by_host.setdefault(host, []).append(rank)
    return by_host


def _hosts_of(block: list[int], hosts: list[Hashable]) -> set[Hashable]:
    return {hosts[r] for r in block}


def _place_blocks(hosts: list[Hashable], t: int) -> list[list[int]]:
    """Cut the ranks into blocks of t, as few as possible spanning hosts; blocks in placement order."""
    by_host = _ranks_by_host(hosts)
    host_major = [r for ranks in by_host.values() for r in ranks]
    simple = [host_major[i : i + t] for i in range(0, len(host_major), t)]
    position = {r: i for i, r in enumerate(host_major)}
    whole: list[list[int]] = []
    rest: list[int] = []
    for ranks in by_host.values():
        n = len(ranks) - len(ranks) % t
        whole.extend(ranks[i : i + t] for i in range(0, n, t))
        rest.extend(ranks[n:])
    packed = whole + [rest[i : i + t] for i in range(0, len(rest), t)]

    def crossing(blocks: list[list[int]]) -> int:
        return sum(len(_hosts_of(b, hosts)) > 1 for b in blocks)

    if crossing(simple) <= crossing(packed):
        return simple
    return sorted(packed, key=lambda b: position[b[0]])


def plan_tp_groups(
    world_size: int,
    tp: int,
    ogroup_tp: int,
    hosts: HostsSpec = None,
    o_groups: int = 8,
    max_ogroup_tp: int = 8,
) -> TPPlan:
    """Plan world-TP, o-group TP, o-group replica and DP groups for ``world_size`` ranks.

    ``hosts`` gives each rank's host (None: all on one host). Raises
    :class:`flagcx.InvalidArgument` for an impossible layout; warns
    (:class:`PlacementWarning`) when an o-group block cannot stay inside one host.
    """
    world_size = _positive("world_size", world_size)
    tp = _positive("tp", tp)
    ogroup_tp = _positive("ogroup_tp", ogroup_tp)
    o_groups = _positive("o_groups", o_groups)
    max_ogroup_tp = _positive("max_ogroup_tp", max_ogroup_tp)
    if world_size % tp:
        raise invalid(
            OP,
            None,
            "tp",
            f"world_size={world_size} is not a multiple of tp={tp}",
            "use a tp that divides the world size (each TP group needs tp ranks) or launch a multiple of tp ranks",
        )
    if tp % ogroup_tp:
        raise invalid(
            OP,
            None,
            "ogroup_tp",
            f"tp={tp} is not a multiple of ogroup_tp={ogroup_tp}",
            "use an ogroup_tp that divides tp (each TP group splits into tp/ogroup_tp o-group blocks)",
        )
    if ogroup_tp > max_ogroup_tp:
        raise invalid(
            OP,
            None,
            "ogroup_tp",
            f"{ogroup_tp} exceeds max_ogroup_tp={max_ogroup_tp} (an o-group block should fit one NVLink island)",
            f"use ogroup_tp <= {max_ogroup_tp} (the other layers keep tp={tp}), or raise max_ogroup_tp if your island is larger",
        )
    if o_groups % ogroup_tp:
        raise invalid(
            OP,
            None,
            "ogroup_tp",
            f"o_groups={o_groups} is not divisible by ogroup_tp={ogroup_tp}: each rank must own whole "
            "o-groups (a split group's heads cannot form its wo_a matmul)",
            f"use an ogroup_tp that divides o_groups={o_groups}",
        )
    host_of = _host_list(hosts, world_size)

    R = tp // ogroup_tp
    D = world_size // tp
    placed = [sorted(b) for b in _place_blocks(host_of, ogroup_tp)]
    blocks = [b for d in range(D) for b in sorted(placed[d * R : (d + 1) * R])]
    cross = [i for i, b in enumerate(blocks) if len(_hosts_of(b, host_of)) > 1]
    if cross:
        by_host = _ranks_by_host(host_of)
        shown = "; ".join(f"block {i} (ranks {blocks[i]}) spans hosts {sorted(map(str, _hosts_of(blocks[i], host_of)))}" for i in cross[:4])
        more = f" and {len(cross) - 4} more" if len(cross) > 4 else ""
        sizes = ", ".join(f"{h}: {len(r)}" for h, r in list(by_host.items())[:8])
        warnings.warn(
            f"flagcx {OP}: {shown}{more}; ranks per host ({sizes}) are not all multiples of ogroup_tp={ogroup_tp}, so these "
            "blocks' all-reduce crosses hosts. Launch a multiple of ogroup_tp ranks per host (or lower ogroup_tp) to keep "
            "every block inside one host.",
            PlacementWarning,
            stacklevel=2,
        )

    tp_members = [sorted(r for b in blocks[d * R : (d + 1) * R] for r in b) for d in range(D)]
    replica_groups = [sorted(blocks[d * R + b][j] for b in range(R)) for d in range(D) for j in range(ogroup_tp)]
    tp_rank = {r: i for g in tp_members for i, r in enumerate(g)}
    dp_groups = [sorted(g[i] for g in tp_members) for i in range(tp)] if D > 1 else []

    per = o_groups // ogroup_tp
    info: dict[int, dict] = {}
    for d in range(D):
        for b in range(R):
            k = d * R + b
            for j, r in enumerate(blocks[k]):
                info[r] = dict(tp_group=d, block=k, replica_index=b, ogroup_rank=j, replica_group=d * ogroup_tp + j)
    for i, g in enumerate(dp_groups):
        for pos, r in enumerate(g):
            info[r].update(dp_group=i, dp_rank=pos)
    placements = [
        RankPlacement(
            rank=r,
            host=host_of[r],
            tp_group=info[r]["tp_group"],
            tp_rank=tp_rank[r],
            block=info[r]["block"],
            replica_index=info[r]["replica_index"],
            ogroup_rank=info[r]["ogroup_rank"],
            replica_group=info[r]["replica_group"],
            replica_rank=replica_groups[info[r]["replica_group"]].index(r),
            dp_group=info[r].get("dp_group"),
            dp_rank=info[r].get("dp_rank"),
            ogroups=range(info[r]["ogroup_rank"] * per, (info[r]["ogroup_rank"] + 1) * per),
        )
        for r in range(world_size)
    ]
    return TPPlan(
        world_size=world_size,
        tp=tp,
        ogroup_tp=ogroup_tp,
        o_groups=o_groups,
        hosts=host_of,
        tp_groups=tp_members,
        ogroup_tp_groups=blocks,
        ogroup_replica_groups=replica_groups,
        dp_groups=dp_groups,
        rank_order=[r for b in blocks for r in b],
        cross_host_blocks=cross,
        placements=placements,
    )
