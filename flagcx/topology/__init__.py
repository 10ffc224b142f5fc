"""flagcx.topology: detect hosts and devices, and plan topology-aware groups.

Detection and planning are pure data (records are exchanged by the core through the
store); the one exception is :func:`init_tp_groups`, which turns a plan into the
running job's torch process groups.
"""

from .clusters import Cluster, form_clusters
from .detect import RankRecord, host_identity, load_topo_file, local_record
from .tp_groups import TPGroups, init_tp_groups
from .tp_plan import PlacementWarning, RankPlacement, TPPlan, plan_tp_groups

__all__ = [
    "Cluster",
    "PlacementWarning",
    "RankPlacement",
    "RankRecord",
    "TPGroups",
    "TPPlan",
    "form_clusters",
    "host_identity",
    "init_tp_groups",
    "load_topo_file",
    "local_record",
    "plan_tp_groups",
]
