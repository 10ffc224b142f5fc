"""Communication per layer of DeepSeek-V4's output projection: nested TP vs one world-TP all-reduce.

nested: all-reduce of the block's share of y (ceil(N/R) x hidden) over the o-group TP block,
        then all-gather of the shares over the replica group (every rank gets N x hidden);
naive:  all-reduce of the whole y (N x hidden) over the world-TP group.
Times are per-iteration maxima over the ranks, medians over the iterations, in microseconds
(CUDA: the stream is synchronized after every op). Writes JSON and a markdown table.

    python benchmarks/v4_comm_bench.py --nproc 8 --tp 8 --ogroup-tp 4
    python benchmarks/v4_comm_bench.py --nproc 16 --tp 16 --ogroup-tp 8 --hosts 2
    python benchmarks/v4_comm_bench.py --nproc 2 --device cuda --tp 2 --ogroup-tp 1
    torchrun --nproc-per-node 8 benchmarks/v4_comm_bench.py --tp 8 --ogroup-tp 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, help="spawn this many local ranks (leave out under torchrun / flagcx.launch)")
    p.add_argument("--tp", type=int, help="world TP size (default: the world size)")
    p.add_argument("--ogroup-tp", type=int, default=8)
    p.add_argument("--o-groups", type=int, default=8)
    p.add_argument("--tokens", default="1,32,256", help="comma-separated token counts per step")
    p.add_argument("--hidden", default="1024,4096", help="comma-separated hidden sizes (4096 in V4-Flash)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", default="flagcx")
    p.add_argument("--hosts", type=int, default=0, help="with --nproc: simulate this many hosts (contiguous FLAGCX_HOST_ID ranges)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", help="JSON path (default benchmarks/results/v4_comm_<device>_w<world>_tp<tp>_otp<ogroup_tp>.json); .md beside it")
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} ({os.cpu_count()} cores)"


def _adapter(pg, device: torch.device) -> str:
    comm = getattr(pg, "comm", None)
    return comm.adapter_name(device.type) if comm is not None else dist.get_backend(pg)


def bench_rank(rank: int, size: int, args: argparse.Namespace) -> dict | None:
    """Run every case on this rank; rank 0 returns the results."""
    from flagcx.topology import init_tp_groups

    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    dist.init_process_group(backend=args.backend)
    try:
        groups = init_tp_groups(args.tp or size, args.ogroup_tp, o_groups=args.o_groups, backend=args.backend)
        plan = groups.plan
        dtype = getattr(torch, args.dtype)
        cases = []
        for hidden in _ints(args.hidden):
            for tokens in _ints(args.tokens):
                rows = max(s.stop - s.start for s in plan.token_shares(tokens))
                full = torch.randn(tokens, hidden, device=device).to(dtype)
                part = torch.randn(rows, hidden, device=device).to(dtype)
                gathered = [torch.empty_like(part) for _ in range(plan.replicas)]
                times = torch.zeros(args.iters, 3, dtype=torch.float64)
                for it in range(args.warmup + args.iters):
                    dist.barrier()
                    t0 = time.perf_counter()
                    dist.all_reduce(full, group=groups.tp)
                    _sync(device)
                    t1 = time.perf_counter()
                    dist.barrier()
                    t2 = time.perf_counter()
                    dist.all_reduce(part, group=groups.ogroup_tp)
                    _sync(device)
                    t3 = time.perf_counter()
                    dist.all_gather(gathered, part, group=groups.ogroup_replica)
                    _sync(device)
                    t4 = time.perf_counter()
                    if it >= args.warmup:
                        times[it - args.warmup] = torch.tensor([t1 - t0, t3 - t2, t4 - t3], dtype=torch.float64)
                worst = times.to(device)
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                worst = worst.cpu() * 1e6
                naive = statistics.median(worst[:, 0].tolist())
                ar = statistics.median(worst[:, 1].tolist())
                ag = statistics.median(worst[:, 2].tolist())
                total = statistics.median((worst[:, 1] + worst[:, 2]).tolist())
                elt = full.element_size()
                cases.append(
                    {
                        "tokens": tokens,
                        "hidden": hidden,
                        "naive_bytes": tokens * hidden * elt,
                        "nested_ar_bytes": rows * hidden * elt,
                        "nested_ag_out_bytes": rows * plan.replicas * hidden * elt,
                        "naive_allreduce_us": naive,
                        "nested_allreduce_us": ar,
                        "nested_allgather_us": ag,
                        "nested_total_us": total,
                        "nested_over_naive": total / naive if naive else None,
                    }
                )
        if rank != 0:
            return None
        return {
            "benchmark": "v4_comm_bench",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": _commit(),
            "device": _device_name(device),
            "torch": torch.__version__,
            "backend": args.backend,
            "adapter": _adapter(groups.tp, device),
            "world_size": size,
            "tp": plan.tp,
            "ogroup_tp": plan.ogroup_tp,
            "replicas": plan.replicas,
            "hosts": sorted({str(h) for h in plan.hosts}),
            "dtype": args.dtype,
            "warmup": args.warmup,
            "iters": args.iters,
            "stat": "median over iterations of the max over ranks, microseconds",
            "cases": cases,
        }
    finally:
        dist.destroy_process_group()


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def markdown(result: dict) -> str:
    head = (
        f"# V4 o-projection communication: nested (o-group TP {result['ogroup_tp']} all-reduce + replica all-gather) "
        f"vs world-TP {result['tp']} all-reduce\n\n"
        f"{result['date']}, commit {result['commit']}, {result['device']}, torch {result['torch']}, backend {result['backend']} "
        f"({result['adapter']}), world {result['world_size']}, hosts {len(result['hosts'])}, {result['dtype']}, "
        f"{result['stat']} ({result['iters']} iterations after {result['warmup']} warm-up).\n\n"
        "| tokens | hidden | naive all-reduce (us) | nested all-reduce (us) | nested all-gather (us) | nested total (us) | nested / naive |\n"
        "|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {c['tokens']} | {c['hidden']} | {c['naive_allreduce_us']:.1f} | {c['nested_allreduce_us']:.1f} | "
        f"{c['nested_allgather_us']:.1f} | {c['nested_total_us']:.1f} | " + (f"{c['nested_over_naive']:.2f} |" if c["nested_over_naive"] is not None else "- |")
        for c in result["cases"]
    ]
    return head + "\n".join(rows) + "\n"


def write(result: dict, args: argparse.Namespace) -> Path:
    out = (
        Path(args.out)
        if args.out
        else ROOT / "benchmarks" / "results" / (f"v4_comm_{args.device}_w{result['world_size']}_tp{result['tp']}_otp{result['ogroup_tp']}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.nproc:
        from flagcx.launch import spawn

        def env(rank: int) -> dict[str, str]:
            extra = {"OMP_NUM_THREADS": "1"}
            if args.hosts:
                extra["FLAGCX_HOST_ID"] = f"sim-host-{rank * args.hosts // args.nproc}"
            return extra

        result = spawn(bench_rank, args.nproc, (args,), env=env)[0]
    else:
        result = bench_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        if result is None:
            return 0
    path = write(result, args)
    print(markdown(result))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
