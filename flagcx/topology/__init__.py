"""flagcx.topology: detect hosts and devices, and plan topology-aware groups.

Detection and planning are pure data (records are exchanged by the core through the
store); the one exception is :func:`init_tp_groups`, which turns a plan into the
running job's torch process groups. The planner (:mod:`.tp_plan`, :mod:`.tp_groups`) loads on
first use.
"""

from importlib import import_module
from typing import Any

from .clusters import Cluster, form_clusters
from .detect import RankRecord, host_identity, load_topo_file, local_record

_PLANNER = {
    "TPGroups": "tp_groups",
    "init_tp_groups": "tp_groups",
    "PlacementWarning": "tp_plan",
    "RankPlacement": "tp_plan",
    "TPPlan": "tp_plan",
    "plan_tp_groups": "tp_plan",
}
"""The nested-TP planner, imported on first use (a job that plans no TP groups never loads it)."""


def __getattr__(name: str) -> Any:
    module = _PLANNER.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{module}", __name__), name)


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
