"""Create the torch process groups of a nested TP plan in the running job.

:func:`init_tp_groups` learns every rank's host (``host_identity()``, exchanged with
``all_gather_object`` over the default group), plans the layout with
:func:`flagcx.topology.tp_plan.plan_tp_groups` and calls ``dist.new_group`` for every group
of every kind, on every rank, in the same order (torch requires it), keeping the ones
this rank belongs to. torch.distributed is imported inside the function so that
``flagcx.topology`` stays importable as pure planning code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Union

from ..errors import FlagcxError
from .detect import host_identity
from .tp_plan import HostsSpec, RankPlacement, TPPlan, plan_tp_groups


@dataclass(frozen=True)
class TPGroups:
    """This rank's process groups of a :class:`TPPlan`."""

    plan: TPPlan
    rank: int
    tp: Any
    """World-TP group (all tp ranks of this model copy)."""
    ogroup_tp: Any
    """o-group TP group: this rank's block; all-reduce the wo_b partial output here."""
    ogroup_replica: Any
    """Ranks at this rank's position in every block of its TP group; all-gather the tokens here."""
    dp: Optional[Any]
    """Data-parallel group (same TP rank in every TP group); None when world_size == tp."""

    @property
    def placement(self) -> RankPlacement:
        return self.plan.placement(self.rank)


def _gather_hosts(dist: Any, world: int) -> list[str]:
    hosts: list[Optional[str]] = [None] * world
    dist.all_gather_object(hosts, host_identity())
    return [str(h) for h in hosts]


def init_tp_groups(
    tp: int,
    ogroup_tp: int,
    *,
    o_groups: int = 8,
    hosts: HostsSpec = None,
    backend: Optional[str] = "flagcx",
    max_ogroup_tp: int = 8,
    timeout: Union[None, timedelta] = None,
) -> TPGroups:
    """Plan and create the world-TP, o-group TP, replica (and DP) groups; call on every rank.

    ``hosts`` (rank -> host id) overrides detection (by default every rank's
    ``host_identity()``, i.e. FLAGCX_HOST_ID or hostname + boot id). ``backend`` and
    ``timeout`` go to ``dist.new_group`` (backend None: the default group's backend).
    CUDA jobs whose default group is NCCL must have called ``torch.cuda.set_device``
    first (the host exchange is an object collective on the default group).
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise FlagcxError("init_tp_groups: torch.distributed is not initialized; call dist.init_process_group(...) on every rank first")
    world = dist.get_world_size()
    rank = dist.get_rank()
    if hosts is None:
        hosts = _gather_hosts(dist, world)
    plan = plan_tp_groups(world, tp, ogroup_tp, hosts=hosts, o_groups=o_groups, max_ogroup_tp=max_ogroup_tp)

    def create(groups: list[list[int]], desc: str) -> Any:
        mine = None
        for i, ranks in enumerate(groups):
            pg = dist.new_group(ranks, timeout=timeout, backend=backend, group_desc=f"{desc}_{i}")
            if rank in ranks:
                mine = pg
        return mine

    tp_pg = create(plan.tp_groups, "tp")
    ogroup_pg = create(plan.ogroup_tp_groups, "ogroup_tp")
    replica_pg = create(plan.ogroup_replica_groups, "ogroup_replica")
    dp_pg = create(plan.dp_groups, "dp") if plan.dp_groups else None
    return TPGroups(plan=plan, rank=rank, tp=tp_pg, ogroup_tp=ogroup_pg, ogroup_replica=replica_pg, dp=dp_pg)
