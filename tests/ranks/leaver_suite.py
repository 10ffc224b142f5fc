"""Ranks that finished their part and leave: a late rank's peers must still complete the collective.

For reduce, gather, broadcast and all_reduce on 3 and 4 ranks, every rank position in turn
arrives late (sleeps before the call) while every other rank destroys its group as soon
as its own call returns, as a program does whose non-roots are done once their data is
posted (and a broadcast root once it has sent). Each receiving rank checks its result
exactly before it leaves. Small (one step) and large (many double-buffered steps) sizes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.distributed as dist

import flagcx  # noqa: F401  (registers the backend)

from ..helpers.matrix import Check

LATE = 0.3
"""Seconds the late rank sleeps: long enough for the others to post, return and destroy their group."""
SIZES = (5, 300_001)
OPS = ("reduce", "gather", "broadcast", "all_reduce")


def _case(op: str, root: int, late: int, numel: int) -> None:
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(size)))
    x = torch.arange(numel, dtype=torch.int64) * (rank + 1) + rank
    total = sum(torch.arange(numel, dtype=torch.int64) * (r + 1) + r for r in range(size))
    if rank == late:
        time.sleep(LATE)
    if op == "reduce":
        dist.reduce(x, dst=root, group=group)
        assert rank != root or torch.equal(x, total), f"reduce root {root}: wrong sum"
    elif op == "all_reduce":
        dist.all_reduce(x, group=group)
        assert torch.equal(x, total), "all_reduce: wrong sum"
    elif op == "gather":
        out = [torch.empty_like(x) for _ in range(size)] if rank == root else None
        dist.gather(x, out, dst=root, group=group)
        if rank == root:
            for r, piece in enumerate(out):
                assert torch.equal(piece, torch.arange(numel, dtype=torch.int64) * (r + 1) + r), f"gather root {root}: piece of rank {r}"
    else:
        if rank != root:
            x.zero_()
        dist.broadcast(x, src=root, group=group)
        assert torch.equal(x, torch.arange(numel, dtype=torch.int64) * (root + 1) + root), f"broadcast root {root}: wrong data"
    dist.destroy_process_group(group)


def leavers(rank: int, size: int) -> Iterable[Check]:
    torch.set_num_threads(1)
    dist.init_process_group("flagcx")
    for op in OPS:
        for numel in SIZES:
            for late in range(size):
                root = (late + 1) % size if op != "all_reduce" else 0
                yield f"{op} {numel} root {root} late {late}", lambda o=op, r=root, la=late, n=numel: _case(o, r, la, n)
                dist.barrier()
    yield "destroy", dist.destroy_process_group


STUCK = 2.0
"""FLAGCX_TIMEOUT of the late-rank checks; the late rank arrives after its peers timed out and ended their roll call."""


def _late_rank(adapter: str) -> None:
    """Ranks 0 and 1 time out in an all_reduce that rank 2 enters after the timeout: rank 2 must fail it too."""
    from flagcx import Cause, Communicator, FlagcxError, FlagcxTimeout

    from ..helpers.harness import flagcx_env

    rank = dist.get_rank()
    store = dist.PrefixStore(f"late-{adapter}/", dist.distributed_c10d._get_default_store())
    env = {"FLAGCX_CPU_ADAPTER": adapter, "FLAGCX_TIMEOUT": str(STUCK)}
    if adapter == "hetero":  # ranks 0 and 1 one shm cluster, rank 2 another
        env.update(FLAGCX_CPU_ADAPTER="shm", FLAGCX_CLUSTER_ID="A" if rank < 2 else "B")
    with flagcx_env(**env):
        comm = Communicator(store, rank, 3, name=f"late-{adapter}")
    x = torch.full((1000,), float(rank + 1))
    try:
        if rank == 2:
            time.sleep(2 * STUCK + 1.5)
            try:
                comm.all_reduce(x)
            except FlagcxError as exc:
                assert "rank 0" in str(exc) or "rank 1" in str(exc), f"rank 2's error names neither rank 0 nor rank 1: {exc}"
                assert exc.peers and set(exc.peers) <= {0, 1}, f"rank 2's error blames {exc.peers}: {exc}"
            else:
                raise AssertionError(f"rank 2 completed an all_reduce that ranks 0 and 1 had failed (result {x[0].item()})")
        else:
            try:
                comm.all_reduce(x)
            except FlagcxTimeout as exc:
                assert "rank 2" in str(exc), str(exc)
                assert 2 in exc.peers and exc.cause is Cause.TIMEOUT, f"blames {exc.peers} ({exc.cause}): {exc}"
            else:
                raise AssertionError("ranks 0 and 1 should time out")
    finally:
        comm.abort()


def late(rank: int, size: int) -> Iterable[Check]:
    torch.set_num_threads(1)
    dist.init_process_group("flagcx")
    for adapter in ("shm", "gloo", "hetero"):
        yield f"late rank, {adapter}", lambda a=adapter: _late_rank(a)
        dist.barrier()
    yield "destroy", dist.destroy_process_group
