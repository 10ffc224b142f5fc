"""Host time per eager collective at world size 1: torch's own backend against flagcx, same device, interleaved.

Each variant runs in a fresh process (one rank, one GPU or the CPU, a FileStore), enqueues
``--calls`` calls of ``--op`` (all_reduce, all_gather, reduce_scatter) back to back after a
warm-up and reports the host time per call (the loop's perf_counter time / calls, before
the final synchronize): what an inference engine's Python thread pays per collective. Variants:

- ``torch``: ``torch.distributed`` on a ProcessGroupNCCL group (``--device cpu``: Gloo);
- ``flagcx``: ``torch.distributed`` on a flagcx group (NCCL adapter; on the CPU, shm);
- ``comm``: ``flagcx.Communicator`` directly;
- ``flagcx-nowd`` / ``comm-nowd``: the same with FLAGCX_NCCL_WATCHDOG=0 (CUDA only);
- ``flagcx-notrace`` / ``comm-notrace``: the same with the flight recorder off (FLAGCX_TRACE_BUFFER=0).

    python benchmarks/percall_bench.py --passes 3 --out benchmarks/results/NAME
    python benchmarks/percall_bench.py --device cpu --op reduce_scatter
    python benchmarks/percall_bench.py --profile comm     # cProfile of the flagcx path, top 25

Writes OUT.json and OUT.md (median over passes of each pass's median, per size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("torch", "flagcx", "comm", "flagcx-nowd", "comm-nowd", "flagcx-notrace", "comm-notrace")
SIZES = (8, 512, 8 << 10, 64 << 10, 256 << 10)


def _one(variant: str, op: str, device: str, calls: int, repeats: int, profile: bool) -> dict:
    """Run in the child: time the variant, print one JSON line."""
    import torch
    import torch.distributed as dist

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    if cuda:
        torch.cuda.set_device(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        if variant.startswith("comm"):
            import flagcx

            comm = flagcx.Communicator(store, 0, 1, name="percall")
            calls_of = {"all_reduce": lambda t, o: lambda: comm.all_reduce(t), "all_gather": lambda t, o: lambda: comm.all_gather(o, t)}
            calls_of["reduce_scatter"] = lambda t, o: lambda: comm.reduce_scatter(o, t)
        else:
            if variant.startswith("flagcx"):
                import flagcx  # noqa: F401  (registers the backend)
            peer = "nccl" if cuda else "gloo"
            dist.init_process_group(peer if variant == "torch" else "flagcx", store=store, rank=0, world_size=1)
            # torch 2.13 renamed the *_tensor spellings (*_single) and warns on the old ones
            gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
            scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
            calls_of = {"all_reduce": lambda t, o: lambda: dist.all_reduce(t), "all_gather": lambda t, o: lambda: gather(o, t)}
            calls_of["reduce_scatter"] = lambda t, o: lambda: scatter(o, t)
        result = {}
        for size in SIZES:
            t = torch.ones(size // 4, device=device)
            call = calls_of[op](t, torch.empty_like(t))  # world size 1: the output is the input's size
            for _ in range(50):
                call()
            sync()
            per_call = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(calls):
                    call()
                per_call.append((time.perf_counter() - t0) / calls * 1e6)
                sync()
            result[size] = statistics.median(per_call)
        if profile:
            import cProfile
            import pstats

            call = calls_of[op](torch.ones(2, device=device), torch.empty(2, device=device))
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(20000):
                call()
            prof.disable()
            sync()
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        if variant.startswith("comm"):
            comm.destroy()
        else:
            dist.destroy_process_group()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--op", default="all_reduce", choices=("all_reduce", "all_gather", "reduce_scatter"))
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default=None, help="comma list (default: all; on the CPU torch,flagcx,comm)")
    p.add_argument("--out", default=None)
    p.add_argument("--profile", default=None, choices=VARIANTS, help="print a cProfile of one variant instead")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.child:
        print(json.dumps(_one(ns.child, ns.op, ns.device, ns.calls, ns.repeats, ns.profile is not None)))
        return 0
    default = VARIANTS if ns.device == "cuda" else ("torch", "flagcx", "comm")
    variants = [ns.profile] if ns.profile else (ns.variants.split(",") if ns.variants else list(default))
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(1 if ns.profile else ns.passes):
        for v in variants:
            env = {**os.environ}
            if v.endswith("-nowd"):
                env["FLAGCX_NCCL_WATCHDOG"] = "0"
            if v.endswith("-notrace"):
                env["FLAGCX_TRACE_BUFFER"] = "0"
            cmd = [sys.executable, __file__, "--child", v, "--op", ns.op, "--device", ns.device, "--calls", str(ns.calls), "--repeats", str(ns.repeats)]
            if ns.profile:
                cmd += ["--profile", v]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                return 1
            if ns.profile:
                print(out.stderr)
            runs[v].append({int(k): x for k, x in json.loads(out.stdout.strip().splitlines()[-1]).items()})
    summary = {v: {s: statistics.median(r[s] for r in rs) for s in SIZES} for v, rs in runs.items()}
    import torch

    if ns.device == "cuda":
        where = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}"
    else:
        where = f"CPU ({os.cpu_count()} cpus; torch = Gloo), torch {torch.__version__}"
    lines = [
        f"# Host time per eager {ns.op}, world size 1 ({where}, {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()})",
        "",
        f"median over {len(next(iter(runs.values())))} interleaved passes of each pass's median of {ns.repeats} loops of {ns.calls} calls (us; min-max of the passes in brackets)",
        "",
        "| size (B) | " + " | ".join(variants) + " | " + " | ".join(f"{v}/torch" for v in variants if v != "torch" and "torch" in variants) + " |",
        "|---|" + "---|" * (len(variants) + sum(1 for v in variants if v != "torch" and "torch" in variants)),
    ]
    for s in SIZES:
        cells = [f"{summary[v][s]:.2f} ({min(r[s] for r in runs[v]):.2f}-{max(r[s] for r in runs[v]):.2f})" for v in variants]
        cells += [f"{summary[v][s] / summary['torch'][s]:.2f}" for v in variants if v != "torch" and "torch" in variants]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out + ".md").write_text(text)
        Path(ns.out + ".json").write_text(json.dumps({"passes": runs, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
