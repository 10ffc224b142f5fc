"""``python -m flagcx.topology``: print the topology of a job (ranks, hosts, devices, clusters, links).

Run alone it shows this process's view of the machine. Under ``python -m flagcx.launch
--nproc N -m flagcx.topology``, torchrun or mpiexec, every rank takes the GPU of its
local rank (as a job's ranks do), publishes its record through the job's store and
rank 0 prints the whole job. ``--json`` prints one JSON
object instead of the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Optional

import torch

from ..bootstrap import detect_launch_env, store_allgather, store_wait
from .clusters import Cluster, form_clusters
from .detect import RankRecord, local_record

_LEGEND = "X same device, NV# NVLink (# links), PIX/PXB/PHB/NODE/SYS PCIe path (nvidia-smi topo names), HOST a CPU rank, ? unknown"


def gather_records(timeout: float) -> tuple[int, list[RankRecord]]:
    """(this rank, every rank's record): through the launcher's store when there is one, else just this process."""
    env = detect_launch_env()
    if env is not None and torch.cuda.is_available():  # like a job's ranks: one device per local rank
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    mine = local_record()
    if env is None or env.size == 1:
        return 0, [mine]
    import torch.distributed as dist

    from ..bootstrap import store_from_env

    store = dist.PrefixStore("flagcx-topology/", store_from_env(timeout))
    raw = store_allgather(store, "records", env.rank, env.size, json.dumps(mine.to_json()).encode(), timeout, "flagcx.topology")
    records = [RankRecord.from_json(json.loads(r)) for r in raw]
    store.set(f"done/{env.rank}", "1")
    if env.rank == 0:  # rank 0 may host the store: keep it up until everyone has read
        store_wait(store, [f"done/{r}" for r in range(env.size)], timeout, "flagcx.topology")
    return env.rank, records


def link_matrix(records: Sequence[RankRecord]) -> list[list[str]]:
    """Link between every pair of ranks ("NET" across hosts, "" where unknown)."""
    return [[a.link_to(b) for b in records] for a in records]


def _clusters(records: Sequence[RankRecord]) -> tuple[list[Cluster], Optional[str]]:
    try:
        return form_clusters(records), None
    except ValueError as exc:
        return [], str(exc)


def as_json(records: Sequence[RankRecord]) -> dict:
    clusters, error = _clusters(records)
    return {
        "world_size": len(records),
        "mode": "error" if error else ("heterogeneous" if len(clusters) > 1 else "homogeneous"),
        "error": error,
        "ranks": [r.to_json() for r in records],
        "clusters": [{"label": c.label, "ranks": list(c.ranks), "device_type": c.device_type, "hosts": list(c.hosts)} for c in clusters],
        "links": link_matrix(records),
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), *(line(r) for r in rows)]


def as_text(records: Sequence[RankRecord]) -> str:
    clusters, error = _clusters(records)
    hosts = list(dict.fromkeys(r.host for r in records))
    alias = {h: f"h{i}" for i, h in enumerate(hosts)}
    mode = "error" if error else ("heterogeneous" if len(clusters) > 1 else "homogeneous")
    out = [f"flagcx topology: {len(records)} rank(s), {len(hosts)} host(s), {len(clusters)} cluster(s), {mode}"]
    rows = []
    for rank, r in enumerate(records):
        device = r.device_type if r.device_index < 0 else f"{r.device_type}:{r.device_index}"
        rows.append([str(rank), alias[r.host], r.hostname, str(r.local_rank), device, r.vendor, r.pci_bus_id or "-", str(r.numa_node), r.cluster])
    out += _table(["rank", "host", "hostname", "local", "device", "vendor", "pci bus id", "numa", "cluster"], rows)
    out.append("")
    out.append("hosts:")
    out += [f"  {alias[h]} = {h}" for h in hosts]
    out.append("clusters:")
    if error:
        out.append(f"  error: {error}")
    for c in clusters:
        out.append(f"  {c.label}: ranks {list(c.ranks)}, {c.device_type}, hosts {', '.join(alias[h] for h in c.hosts)}")
    out.append(f"links ({_LEGEND}):")
    for h in hosts:
        ranks = [i for i, r in enumerate(records) if r.host == h]
        if all(records[i].device_type == "cpu" for i in ranks):
            out.append(f"  {alias[h]}: CPU ranks only")
            continue
        infos = sorted({records[i].link_info for i in ranks if records[i].device_type != "cpu"})
        out.append(f"  {alias[h]}" + (f" (source: {'; '.join(infos)})" if infos else ""))
        matrix = [[f"r{a}"] + [records[a].link_to(records[b]) or "?" for b in ranks] for a in ranks]
        out += ["    " + line for line in _table([""] + [f"r{b}" for b in ranks], matrix)]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flagcx.topology", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the other ranks (default 120)")
    ns = parser.parse_args(argv)
    rank, records = gather_records(ns.timeout)
    if rank == 0:
        print(json.dumps(as_json(records), indent=1) if ns.json else as_text(records), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
