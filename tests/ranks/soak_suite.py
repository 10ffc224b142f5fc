"""Soak: a long random sequence of collectives, every result checked exactly against tests.helpers.reference.

Every rank draws the same sequence from one seed: op (all_reduce, reduce_scatter,
all_gather, broadcast, reduce, gather, scatter, all_to_all even and uneven, ring
send/recv, barrier), dtype, size (0, 1, odd and larger sizes, none a power of two on
purpose), root, reduce op, the world communicator or a reordered subgroup, and sync or
async (async ops are posted in runs of up to 4 and waited together, then checked).
A wrong result is recorded (op number and description) and the run goes on; a
FlagcxError ends it (the communicator may be unusable). ``run_soak`` spawns the ranks;
``python -m tests.ranks.soak_suite --ops 10000 --out FILE`` also writes a summary file.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Optional

import torch

import flagcx
from flagcx import Communicator, PremulSum

from ..helpers.matrix import subgroup_ranks
from ..helpers.reference import MOVE_DTYPES, PREMUL_FACTOR, REDUCE_DTYPES, REDUCE_OPS, assert_equal, make, reduce_ref, supported

OPS = ["all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_allv", "send_recv", "barrier"]
WEIGHTS = [6, 3, 3, 2, 2, 1, 1, 2, 1, 1, 1]


def _size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.08:
        return 0
    if roll < 0.15:
        return 1
    if roll < 0.70:
        return rng.randrange(2, 300) | 1
    if roll < 0.95:
        return rng.randrange(300, 9000) | 1
    return rng.randrange(9000, 70000) | 1


def _op_arg(op: str):
    return PremulSum(PREMUL_FACTOR) if op == "premul_sum" else op


class Soak:
    """One rank's run: draws op i, runs it, queues its check, and checks when its work is done."""

    def __init__(self, world: Communicator, sub: Optional[Communicator], members: list[int], seed: int) -> None:
        self.world = world
        self.sub = sub
        self.members = members
        self.rng = random.Random(seed)
        self.pending: list[tuple[int, str, object, Callable[[], None]]] = []
        self.mismatches: list[str] = []
        self.checked = 0

    def step(self, i: int) -> None:
        rng = self.rng
        use_sub = rng.random() < 0.3
        op = rng.choices(OPS, WEIGHTS)[0]
        reduction = op in ("all_reduce", "reduce_scatter", "reduce")
        dtype = rng.choice(REDUCE_DTYPES if reduction else MOVE_DTYPES)
        rop = rng.choice([o for o in REDUCE_OPS if supported(dtype, o)])
        n = _size(rng)
        root_pick = rng.random()
        async_op = rng.random() < 0.35
        g = self.sub if use_sub else self.world
        if use_sub and self.sub is None:  # not a member: every member draws the same, nothing to do here
            return
        if not async_op or op in ("send_recv",):
            self.flush()
        root = int(root_pick * g.size)
        tag = f"soak/{i}"
        desc = f"#{i} {op} {'sub' if use_sub else 'world'} {str(dtype).replace('torch.', '')}[{n}] root={root} op={rop} async={async_op}"
        work, check = getattr(self, "_" + op)(g, tag, dtype, n, root, rop, async_op)
        if async_op and work is not None:
            self.pending.append((i, desc, work, check))
            if len(self.pending) >= 4:
                self.flush()
        else:
            self._check(desc, check)

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for _, _, work, _ in pending:
            work.wait()
        for _, desc, _, check in pending:
            self._check(desc, check)

    def _check(self, desc: str, check: Callable[[], None]) -> None:
        self.checked += 1
        try:
            check()
        except AssertionError as exc:
            self.mismatches.append(f"{desc}: {exc}")

    # Each op returns (Work or None, the check to run once it is complete).
    def _all_reduce(self, g, tag, dtype, n, root, rop, async_op):
        inputs = [make(tag, r, n, dtype, rop) for r in range(g.size)]
        x = inputs[g.rank].clone()
        out = torch.empty_like(x) if n % 3 == 1 else None
        work = g.all_reduce(x, _op_arg(rop), out=out, async_op=async_op)
        return work, lambda: assert_equal(out if out is not None else x, reduce_ref(inputs, rop), "all_reduce", True)

    def _reduce_scatter(self, g, tag, dtype, n, root, rop, async_op):
        inputs = [make(tag, r, n * g.size, dtype, rop) for r in range(g.size)]
        out = torch.empty(n, dtype=dtype)
        work = g.reduce_scatter(out, inputs[g.rank].clone(), _op_arg(rop), async_op=async_op)
        return work, lambda: assert_equal(out, reduce_ref(inputs, rop)[g.rank * n : (g.rank + 1) * n], "reduce_scatter", True)

    def _reduce(self, g, tag, dtype, n, root, rop, async_op):
        inputs = [make(tag, r, n, dtype, rop) for r in range(g.size)]
        x = inputs[g.rank].clone()
        work = g.reduce(x, root, _op_arg(rop), async_op=async_op)

        def check() -> None:
            if g.rank == root:
                assert_equal(x, reduce_ref(inputs, rop), "reduce", True)
            else:
                assert_equal(x, inputs[g.rank], "reduce: a non-root input changed")

        return work, check

    def _all_gather(self, g, tag, dtype, n, root, rop, async_op):
        inputs = [make(tag, r, n, dtype) for r in range(g.size)]
        if root % 2:
            outs = [torch.empty(n, dtype=dtype) for _ in range(g.size)]
            work = g.all_gather(outs, inputs[g.rank], async_op=async_op)
            return work, lambda: assert_equal(torch.cat(outs), torch.cat(inputs), "all_gather list")
        out = torch.empty(n * g.size, dtype=dtype)
        work = g.all_gather(out, inputs[g.rank], async_op=async_op)
        return work, lambda: assert_equal(out, torch.cat(inputs), "all_gather")

    def _broadcast(self, g, tag, dtype, n, root, rop, async_op):
        src = make(tag, root, n, dtype)
        x = src.clone() if g.rank == root else torch.zeros(n, dtype=dtype)
        work = g.broadcast(x, root, async_op=async_op)
        return work, lambda: assert_equal(x, src, "broadcast")

    def _gather(self, g, tag, dtype, n, root, rop, async_op):
        inputs = [make(tag, r, n, dtype) for r in range(g.size)]
        out = torch.empty(n * g.size, dtype=dtype) if g.rank == root else None
        work = g.gather(inputs[g.rank], out, root, async_op=async_op)
        return work, lambda: assert_equal(out, torch.cat(inputs), "gather") if out is not None else None

    def _scatter(self, g, tag, dtype, n, root, rop, async_op):
        full = make(tag, root, n * g.size, dtype)
        out = torch.empty(n, dtype=dtype)
        work = g.scatter(out, full if g.rank == root else None, root, async_op=async_op)
        return work, lambda: assert_equal(out, full[g.rank * n : (g.rank + 1) * n], "scatter")

    def _all_to_all(self, g, tag, dtype, n, root, rop, async_op):
        inputs = [make(tag, r, n * g.size, dtype) for r in range(g.size)]
        out = torch.empty(n * g.size, dtype=dtype)
        work = g.all_to_all(out, inputs[g.rank], async_op=async_op)
        expected = torch.cat([inputs[r][g.rank * n : (g.rank + 1) * n] for r in range(g.size)])
        return work, lambda: assert_equal(out, expected, "all_to_all")

    def _all_to_allv(self, g, tag, dtype, n, root, rop, async_op):
        def rows(s: int, d: int) -> int:
            return (n * (s + 1) + 3 * d) % 7

        ins = [make(tag, s, 2 * sum(rows(s, d) for d in range(g.size)), dtype).view(-1, 2) for s in range(g.size)]
        in_splits = [rows(g.rank, d) for d in range(g.size)]
        out_splits = [rows(s, g.rank) for s in range(g.size)]
        out = torch.empty(sum(out_splits), 2, dtype=dtype)
        work = g.all_to_all(out, ins[g.rank], out_splits, in_splits, async_op=async_op)
        parts = []
        for s in range(g.size):
            start = sum(rows(s, d) for d in range(g.rank))
            parts.append(ins[s][start : start + rows(s, g.rank)])
        return work, lambda: assert_equal(out, torch.cat(parts), "all_to_all uneven")

    def _send_recv(self, g, tag, dtype, n, root, rop, async_op):
        nxt, prv = (g.rank + 1) % g.size, (g.rank - 1) % g.size
        got = torch.empty(n, dtype=dtype)
        with g.group() as done:
            g.send(make(tag, g.rank, n, dtype), nxt)
            g.recv(got, prv)
        done[0].wait()
        return None, lambda: assert_equal(got, make(tag, prv, n, dtype), "ring send/recv")

    def _barrier(self, g, tag, dtype, n, root, rop, async_op):
        return g.barrier(async_op=async_op), lambda: None


def soak(rank: int, size: int, nops: int, seed: int) -> dict:
    """One rank of a soak run (spawned by flagcx.launch.spawn): counts, mismatches, error, wall time."""
    world = Communicator.from_env(name="soak")
    members = subgroup_ranks(size)
    sub = world.split(members, name="soak.sub")
    run = Soak(world, sub, members, seed)
    error = None
    t0 = time.monotonic()
    done = 0
    try:
        for i in range(nops):
            run.step(i)
            done = i + 1
        run.flush()
    except flagcx.FlagcxError as exc:
        error = f"op #{done}: {type(exc).__name__}: {exc}"
    wall = time.monotonic() - t0
    adapter = world.adapter_name()
    if sub is not None:
        sub.destroy()
    world.destroy()
    return {"ops": done, "checked": run.checked, "mismatches": run.mismatches, "error": error, "wall": wall, "adapter": adapter}


def run_soak(nops: int, nproc: int = 4, seed: int = 2026, env: Optional[Callable[[int], dict]] = None) -> dict:
    """Spawn ``nproc`` ranks running ``nops`` random ops (``env(rank)``: extra variables); a summary over all ranks."""
    from flagcx.launch import spawn

    base = {"FLAGCX_TIMEOUT": "120", "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    per_rank = spawn(soak, nproc, (nops, seed), env=lambda r: {**base, **(env(r) if env else {})}, timeout=max(600.0, nops * 0.5))
    return {
        "ops": nops,
        "ranks": nproc,
        "seed": seed,
        "adapter": per_rank[0]["adapter"],
        "executed": [r["ops"] for r in per_rank],
        "checked": [r["checked"] for r in per_rank],
        "mismatches": [m for r, res in enumerate(per_rank) for m in (f"rank {r}: {x}" for x in res["mismatches"])],
        "errors": [f"rank {r}: {res['error']}" for r, res in enumerate(per_rank) if res["error"]],
        "soak_wall": max(r["wall"] for r in per_rank),
        "total_wall": time.monotonic() - t0,
    }


def format_summary(summary: dict, date: str) -> str:
    """The summary as the text stored in benchmarks/results."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    lines = [
        f"flagcx soak run ({summary['ops']} random collectives, every result checked against tests/helpers/reference.py)",
        f"date: {date}",
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}",
        f"commit: {commit} (plus the working tree of that day)",
        f"command: python -m tests.ranks.soak_suite --ops {summary['ops']} --ranks {summary['ranks']} --seed {summary['seed']}",
        f"ranks: {summary['ranks']}, CPU adapter: {summary['adapter']}, seed: {summary['seed']}",
        f"ops drawn: {summary['ops']}; executed per rank: {summary['executed']}; checks per rank: {summary['checked']}",
        f"mismatches: {len(summary['mismatches'])}",
        f"errors: {len(summary['errors'])}",
        f"wall time of the op loop: {summary['soak_wall']:.1f} s (slowest rank); whole run incl. process start: {summary['total_wall']:.1f} s",
    ]
    lines += [f"  {m}" for m in summary["mismatches"][:50]] + [f"  {e}" for e in summary["errors"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.ranks.soak_suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=10000)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    parser.add_argument("--out", help="write the summary to this file too")
    ns = parser.parse_args(argv)
    summary = run_soak(ns.ops, ns.ranks, ns.seed)
    text = format_summary(summary, ns.date)
    print(text, end="")
    if ns.out:
        with open(ns.out, "w") as f:
            f.write(text)
    return 1 if summary["mismatches"] or summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
