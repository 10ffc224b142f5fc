"""Heterogeneous allreduce bandwidth against the host staging bound, measured in the same run.

GPU mode (``--gpus G --cpus C``): G ranks drive one GPU each (an NCCL cluster) and C
ranks see no GPU (CUDA_VISIBLE_DEVICES="", a CPU cluster); every rank all-reduces a
float32 buffer on its home device through the heterogeneous runner. CPU mode
(``--nproc N --clusters K``): N CPU ranks labelled into K clusters (rank r in cluster
r % K), a simulation of the same plans on one host.

Columns (per message size S bytes, n ranks; times are the slowest rank's mean per op):
- hetero: ``Communicator.all_reduce`` as users get it: the plan the runner chose for the
  size (the faster of hierarchical and flat, timed on its first 6 calls, which the
  default warm-up covers); algbw = S / t, busbw = algbw * 2(n-1)/n (nccl-tests);
- flat: one allreduce over the host transport of all ranks (GPU ranks copy the whole
  buffer to pinned memory and back), i.e. a host runner without hierarchy;
- staging bound (GPU mode): 1 / (1/d2h + 1/h2d) with d2h / h2d the pinned copy
  bandwidths of an S-byte buffer measured on the GPU ranks at the same time, the speed
  at which data can go to the host and come back; ratio = hetero busbw / bound;
- host bound: every rank copies an S-byte host buffer at once (up to 64 MiB; bytes read
  + written, the slowest rank's median), and a host allreduce of S bytes moves at least
  4 S per rank (:mod:`flagcx.bench.bound`): host bound = 4 S / copy bandwidth;
- slowest-stage bound: the largest of S / d2h, S / h2d and the host bound (the stages
  overlap chunk by chunk, so the slowest one bounds the whole); hetero / bound = the
  hierarchical time over it (1.0 = at the bound).

    python benchmarks/hetero_bench.py --gpus 2 --cpus 2 --out benchmarks/results/hetero_gpu
    python benchmarks/hetero_bench.py --nproc 4 --clusters 2 --max 16M --out /tmp/hetero_cpu
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent


def _bytes(text: str) -> int:
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=0, help="GPU ranks (one GPU each)")
    p.add_argument("--cpus", type=int, default=0, help="CPU-only ranks (GPU mode)")
    p.add_argument("--nproc", type=int, default=0, help="CPU mode: number of CPU ranks")
    p.add_argument("--clusters", type=int, default=2, help="CPU mode: number of simulated clusters")
    p.add_argument("--min", default="1M", help="smallest message (bytes; K/M/G suffix)")
    p.add_argument("--max", default="256M", help="largest message")
    p.add_argument("--factor", type=int, default=2, help="size step factor")
    p.add_argument("--warmup", type=int, default=6, help="untimed calls per size (6 let the runner choose its plan first)")
    p.add_argument("--iters", type=int, default=0, help="timed ops per size (default: about 1 GiB of traffic, 3..20)")
    p.add_argument("--chunk", default="", help="FLAGCX_HETERO_CHUNK for the run (default: the library's)")
    p.add_argument("--lanes", type=int, default=0, help="FLAGCX_HETERO_LANES for the run (default: the library's)")
    p.add_argument("--out", required=True, help="output path without suffix: OUT.json and OUT.md are written")
    ns = p.parse_args(argv)
    if (ns.gpus > 0) == (ns.nproc > 0):
        p.error("give either --gpus G [--cpus C] (GPU mode) or --nproc N (CPU mode)")
    if ns.gpus and ns.gpus + ns.cpus < 2:
        p.error("GPU mode needs at least 2 ranks")
    return ns


def sizes(ns: argparse.Namespace) -> list[int]:
    out, s = [], _bytes(ns.min)
    while s <= _bytes(ns.max):
        out.append(s)
        s *= ns.factor
    return out


def _iters(ns: argparse.Namespace, size: int) -> int:
    return ns.iters or max(3, min(20, (1 << 30) // size))


def _staging(size: int, reps: int = 5) -> tuple[float, float]:
    """(d2h, h2d) pinned copy bandwidth in GB/s for a ``size``-byte buffer on the current GPU."""
    dev = torch.empty(size, dtype=torch.uint8, device="cuda")
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    stream = torch.cuda.Stream()
    results = []
    for src, dst in ((dev, host), (host, dev)):
        times = []
        for _ in range(reps + 1):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                start.record()
                dst.copy_(src, non_blocking=True)
                stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        results.append(size / statistics.median(times[1:]) / 1e9)
    return results[0], results[1]


def _worker(rank: int, size: int, ns: argparse.Namespace) -> Optional[dict]:
    from flagcx import Communicator, ReduceOp
    from flagcx.bench import bound as membound

    is_gpu = ns.gpus > 0 and rank < ns.gpus
    if is_gpu:
        torch.cuda.set_device(0)
    device = torch.device("cuda" if is_gpu else "cpu")
    torch.set_num_threads(1)
    comm = Communicator.from_env(name="hbench")
    hetero = comm._hetero
    assert hetero is not None, "the ranks formed one cluster: nothing heterogeneous to measure"
    world = hetero.lanes.world
    world_host = world.adapter(torch.device("cpu"), "bench")

    def slowest(value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        comm.all_reduce(t, "max")
        return float(t[0])

    def timed(fn, iters: int) -> float:
        for _ in range(ns.warmup):
            fn()
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return slowest((time.perf_counter() - t0) / iters)

    rows = []
    factor = 2 * (size - 1) / size
    for nbytes in sizes(ns):
        n = nbytes // 4
        x = torch.ones(n, device=device)
        y = torch.empty_like(x)
        iters = _iters(ns, nbytes)
        t_het = timed(lambda: comm.all_reduce(x, out=y), iters)
        ok = bool(torch.equal(y, torch.full_like(y, float(size))))
        host = torch.empty(n, pin_memory=True) if is_gpu else None

        def flat() -> None:
            if host is None:
                y.copy_(x)
                world_host.allreduce(y, y, ReduceOp.SUM).wait()
            else:
                host.copy_(x)
                world_host.allreduce(host, host, ReduceOp.SUM).wait()
                y.copy_(host)

        t_flat = timed(flat, iters)
        d2h = h2d = float("inf")
        if ns.gpus:
            comm.barrier()
            if is_gpu:
                d2h, h2d = _staging(nbytes)
            d2h, h2d = -slowest(-d2h), -slowest(-h2d)  # the slowest GPU rank's bandwidth
        comm.barrier()
        copy_bytes = membound.buffer_bytes(nbytes)
        host_copy = 2 * copy_bytes / slowest(membound.local_seconds(copy_bytes, add=False)[0]) / 1e9
        host_bound_us = membound.BYTES_PER_RANK * nbytes / (host_copy * 1e3)
        stage_bound_us = max(host_bound_us, nbytes / (d2h * 1e3), nbytes / (h2d * 1e3))
        row = {
            "bytes": nbytes,
            "iters": iters,
            "correct": slowest(0.0 if ok else 1.0) == 0.0,
            "hetero_us": t_het * 1e6,
            "hetero_algbw": nbytes / t_het / 1e9,
            "hetero_busbw": nbytes / t_het / 1e9 * factor,
            "flat_us": t_flat * 1e6,
            "flat_busbw": nbytes / t_flat / 1e9 * factor,
            "host_copy_gbps": host_copy,
            "host_bound_us": host_bound_us,
            "stage_bound_us": stage_bound_us,
            "vs_stage_bound": t_het * 1e6 / stage_bound_us,
            "plan": hetero.plans.chosen.get(nbytes.bit_length(), hetero.plans.fixed or "undecided"),
        }
        if ns.gpus:
            bound = 1 / (1 / d2h + 1 / h2d)
            row.update(d2h_gbps=d2h, h2d_gbps=h2d, bound_gbps=bound, ratio=row["hetero_busbw"] / bound)
        rows.append(row)
    meta = {
        "ranks": size,
        "gpu_ranks": ns.gpus,
        "clusters": [{"label": c.label, "ranks": list(c.ranks), "device_type": c.device_type} for c in comm.clusters],
        "chunk_bytes": hetero.lanes.chunk,
        "lanes": hetero.lanes.nlanes,
        "peer_transport": hetero.lanes.peer.adapter_name("cpu") if hetero.lanes.peer is not None else None,
        "world_transport": world.adapter_name("cpu"),
        "intra_adapter": hetero.lanes.intra.adapter_name(device) if hetero.lanes.intra is not None else None,
        "gpu": torch.cuda.get_device_name(0) if is_gpu else None,
    }
    comm.destroy()
    return {"meta": meta, "rows": rows} if rank == 0 else None


def _rank_env(ns: argparse.Namespace, rank: int) -> dict:
    env = {"OMP_NUM_THREADS": "1"}
    if ns.chunk:
        env["FLAGCX_HETERO_CHUNK"] = ns.chunk
    if ns.lanes:
        env["FLAGCX_HETERO_LANES"] = str(ns.lanes)
    if ns.gpus:
        gpu = rank < ns.gpus
        env["CUDA_VISIBLE_DEVICES"] = str(rank) if gpu else ""
        env.setdefault("NCCL_NVLS_ENABLE", os.environ.get("NCCL_NVLS_ENABLE", "0"))
    else:
        env["FLAGCX_CLUSTER_ID"] = f"sim{rank % ns.clusters}"
    return env


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    gpu = meta["gpu_ranks"] > 0
    lines = [
        f"# Heterogeneous allreduce ({meta['ranks']} ranks: " + ", ".join(f"{c['label']} {c['ranks']}" for c in meta["clusters"]) + ")",
        "",
        f"float32 sum, out of place; chunk {meta['chunk_bytes'] or 'off'} B, {meta['lanes']} lane(s); intra {meta['intra_adapter']}, "
        f"peer {meta['peer_transport']}, world {meta['world_transport']}; GPU {meta['gpu'] or '-'}; host {meta['host']}; {meta['date']}",
        "",
    ]
    head = "| bytes | iters | plan | hetero us | algbw GB/s | busbw GB/s | flat us | flat busbw | host copy GB/s | stage bound us | hetero / bound |"
    sep = "|---|---|---|---|---|---|---|---|---|---|---|"
    if gpu:
        head += " d2h GB/s | h2d GB/s | bound GB/s | busbw / bound |"
        sep += "---|---|---|---|"
    lines += [head, sep]
    for r in rows:
        line = (
            f"| {r['bytes']} | {r['iters']} | {r['plan']} | {r['hetero_us']:.0f} | {r['hetero_algbw']:.2f} | {r['hetero_busbw']:.2f} | "
            f"{r['flat_us']:.0f} | {r['flat_busbw']:.2f} | {r['host_copy_gbps']:.1f} | {r['stage_bound_us']:.0f} | {r['vs_stage_bound']:.2f} |"
        )
        if gpu:
            line += f" {r['d2h_gbps']:.1f} | {r['h2d_gbps']:.1f} | {r['bound_gbps']:.1f} | {r['ratio']:.0%} |"
        lines.append(line + ("" if r["correct"] else " WRONG RESULT |"))
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = parse(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from flagcx.launch import spawn

    nranks = ns.gpus + ns.cpus if ns.gpus else ns.nproc
    results = spawn(_worker, nranks, (ns,), env=lambda r: _rank_env(ns, r), timeout=3600)
    result = results[0]
    result["meta"].update(host=platform.node(), date=time.strftime("%Y-%m-%d %H:%M:%S"), argv=list(argv or sys.argv[1:]))
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(r["correct"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
