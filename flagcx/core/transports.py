"""A communicator's transports: one AdapterSet when its ranks form one cluster, else the heterogeneous runner.

The ranks' topology records (exchanged at init, see :func:`.selection.exchange_records`)
form clusters (:func:`flagcx.topology.clusters.form_clusters`). One cluster: an
:class:`~.selection.AdapterSet` carries every op. Several: the
:class:`~flagcx.hetero.HeteroAdapter` carries every op, over AdapterSets of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.distributed as dist

from ..adapters import Adapter, AdapterContext
from ..errors import InvalidArgument
from ..topology.clusters import Cluster, form_clusters
from ..topology.detect import PeerRecord, RankRecord
from .selection import AdapterSet

if TYPE_CHECKING:
    from ..hetero import HeteroAdapter

Transports = Union["HeteroAdapter", AdapterSet]


def open_transports(
    store: dist.Store,
    rank: int,
    size: int,
    records: Sequence[PeerRecord],
    *,
    name: str,
    timeout: float,
    global_ranks: Sequence[int],
    device_adapters: Optional[Mapping[str, Adapter]] = None,
    title: str = "",
) -> tuple[list[RankRecord], list[Cluster], Transports]:
    """(topology, clusters, transports) of the ranks with ``records``; every rank raises alike on a bad cluster layout."""
    topology = [r.topo for r in records]
    try:
        clusters = form_clusters(topology)
    except ValueError as exc:
        raise InvalidArgument(str(exc), op="init", rank=rank) from None
    if len(clusters) > 1:
        ctx = AdapterContext(dist.PrefixStore("hetero/", store), rank, size, timeout, torch.device("cpu"), name, list(global_ranks), title)
        from ..hetero import HeteroAdapter  # loaded only by jobs whose ranks form several clusters

        return topology, clusters, HeteroAdapter(ctx, records, clusters, AdapterSet)
    adapters = AdapterSet(
        dist.PrefixStore("adapters/", store),
        rank,
        size,
        records,
        name=name,
        timeout=timeout,
        global_ranks=global_ranks,
        device_adapters=device_adapters,
        title=title,
    )
    return topology, clusters, adapters
