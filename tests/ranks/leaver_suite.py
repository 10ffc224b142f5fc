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
    from flagcx import Cause, FlagcxError, FlagcxTimeout

    comm = _three(adapter, "late")
    rank = comm.rank
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


def _three(adapter: str, name: str):
    """A 3-rank Communicator over ``adapter`` (``hetero``: ranks 0 and 1 one shm cluster, rank 2 another) with FLAGCX_TIMEOUT=STUCK."""
    from flagcx import Communicator

    from ..helpers.harness import flagcx_env

    rank = dist.get_rank()
    env = {"FLAGCX_CPU_ADAPTER": adapter, "FLAGCX_TIMEOUT": str(STUCK)}
    if adapter == "hetero":
        env.update(FLAGCX_CPU_ADAPTER="shm", FLAGCX_CLUSTER_ID="A" if rank < 2 else "B")
    with flagcx_env(**env):
        return Communicator(dist.PrefixStore(f"{name}-{adapter}/", dist.distributed_c10d._get_default_store()), rank, 3, name=f"{name}-{adapter}")


def _sum_or_error(comm) -> None:
    """all_reduce of 10**rank gives the exact sum or raises: never other data."""
    from flagcx import FlagcxError

    y = torch.full((4,), float(10**comm.rank))
    try:
        comm.all_reduce(y)
    except FlagcxError:
        return
    assert torch.equal(y, torch.full((4,), 111.0)), f"all_reduce returned {y.tolist()} instead of 111 or an error"


def _skipped_gather(adapter: str) -> None:
    """The root skips a gather its peers entered (torch raised on its missing gather_list): no rank returns wrong data after."""
    from flagcx import FlagcxError

    comm = _three(adapter, "skipped-gather")
    x = torch.full((3,), float(comm.rank + 1))
    try:
        if comm.rank != 0:
            comm.gather(x, None, root=0)
        _sum_or_error(comm)
        out = torch.full((9,), -1.0)
        comm.gather(x + 10, out if comm.rank == 0 else None, root=0)
        fresh = torch.cat([torch.full((3,), float(r + 11)) for r in range(3)])
        assert comm.rank != 0 or torch.equal(out, fresh), f"the root's gather returned {out.tolist()}, not its peers' data of this call"
    except FlagcxError:
        pass
    finally:
        comm.abort()


def _refused_scatter(adapter: str) -> None:
    """The root refuses a scatter its peers entered (an input of the wrong size): its peers raise, and the next all_reduce is right or raises."""
    from flagcx import FlagcxError, InvalidArgument

    comm = _three(adapter, "refused-scatter")
    out = torch.full((4,), -1.0)
    try:
        try:
            comm.scatter(out, torch.ones(13) if comm.rank == 0 else None, root=0)
        except FlagcxError as exc:  # the peers: a timeout, or (shm) the mismatch with the root's next call
            assert comm.rank != 0 or isinstance(exc, InvalidArgument), f"the root should refuse its input: {exc}"
        else:
            raise AssertionError(f"rank {comm.rank}: scatter returned {out.tolist()} though the root refused it")
        _sum_or_error(comm)
    finally:
        comm.abort()


def late(rank: int, size: int) -> Iterable[Check]:
    torch.set_num_threads(1)
    dist.init_process_group("flagcx")
    for adapter in ("shm", "gloo", "hetero"):
        yield f"late rank, {adapter}", lambda a=adapter: _late_rank(a)
        dist.barrier()
        yield f"gather the root skipped, {adapter}", lambda a=adapter: _skipped_gather(a)
        dist.barrier()
        yield f"scatter the root refused, {adapter}", lambda a=adapter: _refused_scatter(a)
        dist.barrier()
    yield "destroy", dist.destroy_process_group
