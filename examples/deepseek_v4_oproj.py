"""DeepSeek-V4 grouped output projection under nested TP, checked against a one-process reference.

V4-Flash shape (8 o-groups of 8 heads, head_dim 512, o_lora_rank 1024, hidden 4096),
scaled down by flags so that 16 CPU ranks finish in seconds. Per token the attention
output o (heads x head_dim) is cut into o_groups groups o_g;
wo_a: z_g = W_a[g] @ o_g (one matrix per group); wo_b: y = W_b @ concat_g z_g (row-parallel).

World TP 16 cannot shard wo_a (8 groups), so the 16 ranks form o-group blocks of
ogroup_tp 8 ranks (one per host); each block takes its share of the tokens, its ranks
own disjoint o-groups (W_a[g] and the matching columns of W_b, identical in every block),
the partial y is all-reduced over the block and all-gathered over the replica group.

    python -m flagcx.launch --nproc 16 examples/deepseek_v4_oproj.py --hosts 2
    python -m flagcx.launch --nproc 4 examples/deepseek_v4_oproj.py --tp 4 --ogroup-tp 2
    python -m flagcx.launch --nproc 2 examples/deepseek_v4_oproj.py --device cuda --tp 2 --ogroup-tp 1

``--hosts N`` simulates N hosts on one machine by giving each rank FLAGCX_HOST_ID
(contiguous rank ranges, or round robin with ``--interleave``); the plan reads it back
through host detection. Exits non-zero when the result does not match the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import flagcx
from flagcx.topology import TPPlan, init_tp_groups

TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}
"""Max error allowed, relative to max |y|: float32 accumulation order, bf16 rounding of every partial."""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=16, help="world TP size (default 16)")
    p.add_argument("--ogroup-tp", type=int, default=8, help="o-group TP size, <= o_groups (default 8)")
    p.add_argument("--o-groups", type=int, default=8)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=4, help="512 in V4-Flash")
    p.add_argument("--o-lora-rank", type=int, default=16, help="1024 in V4-Flash")
    p.add_argument("--hidden", type=int, default=40, help="4096 in V4-Flash")
    p.add_argument("--tokens", type=int, default=13)
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", default="flagcx", help="torch.distributed backend of every group")
    p.add_argument("--hosts", type=int, default=0, help="simulate this many hosts (sets FLAGCX_HOST_ID per rank)")
    p.add_argument("--interleave", action="store_true", help="with --hosts: rank r on host r %% N instead of contiguous ranges")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--report", help="rank 0 writes the plan and the error here as JSON")
    return p.parse_args(argv)


def full_weights(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole model's o (tokens x heads*head_dim), W_a (G x r x group width) and W_b (hidden x G*r)."""
    g = torch.Generator().manual_seed(args.seed)
    width = args.heads // args.o_groups * args.head_dim
    o = torch.randn(args.tokens, args.heads * args.head_dim, generator=g)
    wa = torch.randn(args.o_groups, args.o_lora_rank, width, generator=g) / width**0.5
    wb = torch.randn(args.hidden, args.o_groups * args.o_lora_rank, generator=g) / (args.o_groups * args.o_lora_rank) ** 0.5
    dtype = getattr(torch, args.dtype)
    return o.to(dtype), wa.to(dtype), wb.to(dtype)


def reference(o: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """y for every token, in float64 from the full weights."""
    o, wa, wb = o.double(), wa.double(), wb.double()
    groups = o.view(o.shape[0], wa.shape[0], wa.shape[2])
    z = torch.einsum("ngk,grk->ngr", groups, wa).reshape(o.shape[0], wa.shape[0] * wa.shape[1])
    return z @ wb.T


def shard(plan: TPPlan, rank: int, wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameter conversion: this rank's W_a[g] for its o-groups and its column slice of W_b (same in every block)."""
    owned = plan.owned_ogroups(rank)
    return wa[owned.start : owned.stop].contiguous(), wb[:, plan.wb_columns(rank, wa.shape[1])].contiguous()


def oproj(args: argparse.Namespace, groups, o: torch.Tensor, wa_local: torch.Tensor, wb_local: torch.Tensor) -> torch.Tensor:
    """Nested-TP forward: this block's tokens, own o-groups -> partial y -> block all-reduce -> replica all-gather."""
    plan, rank = groups.plan, groups.rank
    place = plan.placement(rank)
    shares = plan.token_shares(o.shape[0])
    rows = max(s.stop - s.start for s in shares)
    heads = plan.owned_heads(rank, args.heads)
    mine = o[shares[place.replica_index], heads.start * args.head_dim : heads.stop * args.head_dim]
    z = torch.einsum("ngk,grk->ngr", mine.reshape(mine.shape[0], wa_local.shape[0], wa_local.shape[2]), wa_local)
    partial = torch.zeros(rows, wb_local.shape[0], dtype=o.dtype, device=o.device)
    partial[: mine.shape[0]] = z.reshape(mine.shape[0], wb_local.shape[1]) @ wb_local.T
    dist.all_reduce(partial, group=groups.ogroup_tp)
    gathered = [torch.empty_like(partial) for _ in range(plan.replicas)]
    dist.all_gather(gathered, partial, group=groups.ogroup_replica)
    by_block = dict(zip(plan.replica_blocks(rank), gathered))
    return torch.cat([by_block[b][: s.stop - s.start] for b, s in enumerate(shares)])


def relative_error(y: torch.Tensor, expected: torch.Tensor) -> float:
    """max |y - expected| / max |expected| (inf on a shape mismatch, 0 for no tokens)."""
    if y.shape != expected.shape:
        return float("inf")
    if expected.numel() == 0:
        return 0.0
    return (y - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.hosts:
        host = rank % args.hosts if args.interleave else rank * args.hosts // world
        os.environ["FLAGCX_HOST_ID"] = f"sim-host-{host}"
        flagcx.config.reload()
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    dist.init_process_group(backend=args.backend)
    try:
        groups = init_tp_groups(args.tp, args.ogroup_tp, o_groups=args.o_groups, backend=args.backend)
        plan = groups.plan
        o, wa, wb = full_weights(args)
        expected = reference(o, wa, wb)
        wa_local, wb_local = shard(plan, rank, wa, wb)
        y = oproj(args, groups, o.to(device), wa_local.to(device), wb_local.to(device)).double().cpu()
        err = torch.tensor([relative_error(y, expected)], device=device)
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        worst = err.item()
        tol = TOLERANCE[args.dtype]
        ok = worst <= tol
        if rank == 0:
            print(plan.describe())
            print(
                f"world {world} tp {args.tp} ogroup_tp {args.ogroup_tp} tokens {args.tokens} {args.dtype} on {args.device}: "
                f"max error {worst:.3e} relative (tolerance {tol:g}) {'OK' if ok else 'MISMATCH'}",
                flush=True,
            )
            if args.report:
                with open(args.report, "w") as f:
                    json.dump(
                        {
                            "world_size": world,
                            "tp": plan.tp,
                            "ogroup_tp": plan.ogroup_tp,
                            "o_groups": plan.o_groups,
                            "hosts": [str(h) for h in plan.hosts],
                            "tp_groups": plan.tp_groups,
                            "ogroup_tp_groups": plan.ogroup_tp_groups,
                            "ogroup_replica_groups": plan.ogroup_replica_groups,
                            "cross_host_blocks": plan.cross_host_blocks,
                            "max_rel_error": worst,
                            "tolerance": tol,
                            "dtype": args.dtype,
                            "tokens": args.tokens,
                            "ok": ok,
                            "wall_s": time.perf_counter() - start,
                        },
                        f,
                        indent=1,
                    )
    finally:
        dist.destroy_process_group()
    if not ok:
        print(f"rank {rank}: nested-TP output does not match the reference (max error {worst:.3e} > {tol:g})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
