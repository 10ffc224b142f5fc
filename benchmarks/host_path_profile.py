"""Where the host path's time goes, per operation and size: the shm adapter, flagcx.Communicator and torch.distributed, side by side.

N local CPU ranks (a FileStore; no launcher) run every operation at every size through
three layers, interleaved (pass after pass, op after op, layer after layer):

- ``adapter``: the shm adapter's method and its handle's ``wait()`` (the C call through cffi);
- ``comm``: ``flagcx.Communicator.<op>`` (argument checks, lowering, the Call, the Work);
- ``dist``: ``torch.distributed.<op>`` on a ``"flagcx"`` process group (c10d dispatch on top).

Each call is timed alone (perf_counter_ns); a row keeps the median and p10-p90 of the
calls, the process's context switches per call (voluntary, involuntary: all its threads,
the p2p progress thread included) and its CPU time per call. The difference between two
layers is what that layer costs. ``--profile`` adds a cProfile of the ``comm`` layer per
operation at the smallest size (top frames by own time).

    python benchmarks/host_path_profile.py --nproc 2 --passes 3 --out benchmarks/results/NAME

Writes OUT.json (every pass) and OUT.md (median over passes of each pass's median).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce", "gather", "scatter", "all_to_all", "sendrecv")
LAYERS = ("adapter", "comm", "dist")
SIZES = (8, 2 << 10, 64 << 10, 256 << 10)


def _calls(op: str, size: int, rank: int, n: int, comm, adapter, torch, dist) -> dict[str, Callable[[], None]]:
    """The three layers' call of ``op`` on ``size`` bytes of float32 (blocked ops: size // n bytes per rank, as nccl-tests)."""
    from flagcx.tensors import as_bytes
    from flagcx.types import ReduceOp

    count = max(size // 4, 1)
    block = max(count // n, 1)
    blocked = op in ("all_gather", "reduce_scatter", "gather", "scatter", "all_to_all")
    small, big = (block, block * n) if blocked else (count, count)
    root = 0
    src = torch.randn(big if op in ("reduce_scatter", "scatter", "all_to_all") else small)
    dst = torch.zeros(big if op in ("all_gather", "gather", "all_to_all") else small)
    sb, db = as_bytes(src), as_bytes(dst)
    nxt, prv = (rank + 1) % n, (rank - 1) % n
    S = ReduceOp.SUM
    if op == "all_reduce":
        return {"adapter": lambda: adapter.allreduce(src, dst, S).wait(), "comm": lambda: comm.all_reduce(src, out=dst), "dist": lambda: dist.all_reduce(dst)}
    if op == "all_gather":
        return {
            "adapter": lambda: adapter.allgather(sb, db).wait(),
            "comm": lambda: comm.all_gather(dst, src),
            "dist": lambda: dist.all_gather_into_tensor(dst, src),
        }
    if op == "reduce_scatter":
        return {
            "adapter": lambda: adapter.reducescatter(src, dst, S).wait(),
            "comm": lambda: comm.reduce_scatter(dst, src),
            "dist": lambda: dist.reduce_scatter_tensor(dst, src),
        }
    if op == "broadcast":
        return {"adapter": lambda: adapter.broadcast(db, root).wait(), "comm": lambda: comm.broadcast(dst, root), "dist": lambda: dist.broadcast(dst, root)}
    if op == "reduce":
        return {
            "adapter": lambda: adapter.reduce(src, dst, S, root).wait(),
            "comm": lambda: comm.reduce(src, root, out=dst),
            "dist": lambda: dist.reduce(dst, root),
        }
    if op == "gather":
        mine = rank == root
        parts = list(dst.chunk(n)) if mine else None
        return {
            "adapter": lambda: adapter.gather(sb, db if mine else None, root).wait(),
            "comm": lambda: comm.gather(src, dst if mine else None, root),
            "dist": lambda: dist.gather(src, parts, root),
        }
    if op == "scatter":
        mine = rank == root
        parts = list(src.chunk(n)) if mine else None
        return {
            "adapter": lambda: adapter.scatter(sb if mine else None, db, root).wait(),
            "comm": lambda: comm.scatter(dst, src if mine else None, root),
            "dist": lambda: dist.scatter(dst, parts, root),
        }
    if op == "all_to_all":
        return {"adapter": lambda: adapter.alltoall(sb, db).wait(), "comm": lambda: comm.all_to_all(dst, src), "dist": lambda: dist.all_to_all_single(dst, src)}
    if op == "sendrecv":

        def by_adapter() -> None:
            s, r = adapter.send(sb, nxt), adapter.recv(db, prv)
            s.wait()
            r.wait()

        def by_comm() -> None:
            comm.group_start()
            comm.send(src, nxt)
            comm.recv(dst, prv)
            comm.group_end().wait()

        def by_dist() -> None:
            for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, src, nxt), dist.P2POp(dist.irecv, dst, prv)]):
                w.wait()

        return {"adapter": by_adapter, "comm": by_comm, "dist": by_dist}
    raise ValueError(op)


def _time(call: Callable[[], None], iters: int, warmup: int) -> dict:
    for _ in range(warmup):
        call()
    times = []
    clock = time.perf_counter_ns
    u0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(iters):
        t0 = clock()
        call()
        times.append(clock() - t0)
    u1 = resource.getrusage(resource.RUSAGE_SELF)
    times.sort()
    return {
        "median_us": times[len(times) // 2] / 1e3,
        "p10_us": times[len(times) // 10] / 1e3,
        "p90_us": times[len(times) * 9 // 10] / 1e3,
        "vcsw": (u1.ru_nvcsw - u0.ru_nvcsw) / iters,
        "ivcsw": (u1.ru_nivcsw - u0.ru_nivcsw) / iters,
        "cpu_us": ((u1.ru_utime + u1.ru_stime) - (u0.ru_utime + u0.ru_stime)) / iters * 1e6,
    }


def _rank(rank: int, n: int, path: str, args: argparse.Namespace) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    import flagcx

    torch.set_num_threads(1)
    store = dist.FileStore(path, n)
    comm = flagcx.Communicator(dist.PrefixStore("comm/", store), rank, n, name="profile")
    adapter = comm._adapter(torch.device("cpu"), "profile")
    dist.init_process_group("flagcx", store=dist.PrefixStore("dist/", store), rank=rank, world_size=n)
    rows: list[dict] = []
    profiles: dict[str, str] = {}
    for p in range(args.passes):
        for op in args.ops:
            for size in args.sizes:
                calls = _calls(op, size, rank, n, comm, adapter, torch, dist)
                for layer in LAYERS:
                    comm.barrier()
                    row = _time(calls[layer], args.iters, args.warmup)
                    rows.append({"pass": p, "op": op, "size": size, "layer": layer, **row})
    if args.profile:
        for op in args.ops:
            call = _calls(op, args.sizes[0], rank, n, comm, adapter, torch, dist)["comm"]
            comm.barrier()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.iters):
                call()
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
            profiles[op] = out.getvalue()
    comm.barrier()
    dist.destroy_process_group()
    comm.destroy()
    if rank == 0:
        with open(path + ".out", "w") as f:
            json.dump({"rows": rows, "profiles": profiles}, f)


def _summary(rows: list[dict]) -> dict:
    """(op, size, layer) -> median over passes of each field."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["size"], r["layer"]), []).append(r)
    return {k: {f: statistics.median(x[f] for x in v) for f in ("median_us", "p10_us", "p90_us", "vcsw", "ivcsw", "cpu_us")} for k, v in groups.items()}


def _markdown(meta: dict, summary: dict, ops: list[str], sizes: list[int], profiles: dict[str, str]) -> str:
    lines = [
        f"# Host path per layer, {meta['nproc']} ranks ({meta['date']}, commit {meta['commit']})",
        "",
        f"Device: {meta['device']}. Command: `{meta['command']}`. Rank 0's view; median over {meta['passes']} interleaved passes of "
        f"each pass's median of {meta['iters']} calls timed one by one; p10-p90 of the calls in brackets. csw: context switches per call "
        "of the whole process (voluntary / involuntary); cpu: process CPU time per call.",
        "",
        "| op | bytes | adapter us | comm us | dist us | comm - adapter | dist - comm | adapter csw | comm csw | adapter cpu us |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for op in ops:
        for size in sizes:
            a, c, d = (summary[(op, size, layer)] for layer in LAYERS)
            lines.append(
                f"| {op} | {size} | {a['median_us']:.1f} ({a['p10_us']:.1f}-{a['p90_us']:.1f}) | {c['median_us']:.1f} ({c['p10_us']:.1f}-{c['p90_us']:.1f}) "
                f"| {d['median_us']:.1f} ({d['p10_us']:.1f}-{d['p90_us']:.1f}) | {c['median_us'] - a['median_us']:+.1f} | {d['median_us'] - c['median_us']:+.1f} "
                f"| {a['vcsw']:.2f}/{a['ivcsw']:.2f} | {c['vcsw']:.2f}/{c['ivcsw']:.2f} | {a['cpu_us']:.1f} |"
            )
    for op, text in profiles.items():
        body = "\n".join(line for line in text.splitlines() if line.strip())
        lines += ["", f"## cProfile of comm.{op} at {sizes[0]} bytes (rank 0, own time)", "", "```", body, "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES), help="bytes, comma-separated")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="add a cProfile of the comm layer per op at the smallest size")
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    ap.add_argument("--device", default=platform.node(), help="the machine, as the results name it")
    ap.add_argument("--_rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.ops = [o for o in args.ops.split(",") if o]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if args._rank is not None:
        _rank(args._rank, args.nproc, args._store, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store")
        argv = [a for a in sys.argv[1:]]
        procs = [subprocess.Popen([sys.executable, __file__, *argv, "--_rank", str(r), "--_store", path]) for r in range(args.nproc)]
        codes = [p.wait() for p in procs]
        if any(codes):
            sys.exit(f"a rank failed: exit codes {codes}")
        with open(path + ".out") as f:
            data = json.load(f)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    meta = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "device": args.device,
        "nproc": args.nproc,
        "passes": args.passes,
        "iters": args.iters,
        "command": "python benchmarks/host_path_profile.py " + " ".join(sys.argv[1:]),
        "load": os.getloadavg(),
    }
    summary = _summary(data["rows"])
    md = _markdown(meta, summary, args.ops, args.sizes, data["profiles"])
    print(md)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"meta": meta, **data}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
