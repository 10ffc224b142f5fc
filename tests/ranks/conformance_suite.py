"""torch.distributed conformance beyond the op matrix: what torch's own suite and FlagCX users expect.

Run in one set of ranks: FlagCX's torch example call pattern (tests/ranks/flagcx_compat_suite.py),
then, on a fresh ``init_process_group("flagcx")``: sparse COO all_reduce (SUM, uneven nnz,
empty, non-power-of-two shapes, bad input raising on every rank), ``all_gather_coalesced``
(one output list per rank), and ``flagcx.monitored_barrier`` with absent ranks.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import timedelta

import torch
import torch.distributed as dist

import flagcx
from flagcx import FlagcxTimeout, InvalidArgument, NotSupported

from ..helpers.matrix import Check, expect_error
from .flagcx_compat_suite import compat


def _sparse(tag: int, rank: int, shape: tuple[int, ...], nnz: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank ``rank``'s uncoalesced sparse input (duplicate indices included)."""
    g = torch.Generator().manual_seed(tag * 1000 + rank)
    sparse_dim = 1 if len(shape) > 1 and tag % 2 else len(shape)
    idx = torch.stack([torch.randint(0, n, (nnz,), generator=g) for n in shape[:sparse_dim]]) if nnz else torch.empty((sparse_dim, 0), dtype=torch.int64)
    vals = torch.randint(-50, 50, (nnz, *shape[sparse_dim:]), generator=g).to(dtype)
    return torch.sparse_coo_tensor(idx, vals, shape)


def _sparse_sum(size: int, rank: int) -> None:
    cases = [
        ((7,), [3, 0, 5, 1], torch.float32),
        ((5, 3), [4, 2, 0, 6], torch.float64),
        ((9, 4, 2), [0, 0, 0, 0], torch.int64),
        ((13, 6), [1, 11, 2, 7], torch.int32),
    ]
    for tag, (shape, nnzs, dtype) in enumerate(cases):
        inputs = [_sparse(tag, r, shape, nnzs[r % len(nnzs)], dtype) for r in range(size)]
        mine = inputs[rank].clone()
        dist.all_reduce(mine)
        expected = sum(t.to_dense() for t in inputs)
        assert mine.is_sparse, f"case {tag}: the result is no longer sparse"
        assert torch.equal(mine.to_dense(), expected), f"case {tag}: sparse sum differs"
    work = dist.all_reduce(inputs[rank].clone(), async_op=True)
    work.wait()


def _sparse_errors(size: int, rank: int) -> None:
    t = _sparse(0, rank, (6,), 2, torch.float32)
    expect_error(NotSupported, lambda: dist.all_reduce(t.clone(), op=dist.ReduceOp.MAX), "SUM")
    other = _sparse(0, rank, (6 + (rank == size - 1),), 2, torch.float32)  # the last rank's shape differs
    expect_error(InvalidArgument, lambda: dist.all_reduce(other), "differ between ranks", f"rank {size - 1}")
    y = torch.ones(3)
    dist.all_reduce(y)  # the group is still in step
    assert torch.equal(y, torch.full((3,), float(size)))


def _all_gather_coalesced(size: int, rank: int) -> None:
    ins = [torch.full((2, 3), float(rank)), torch.arange(5.0) + rank, torch.empty(0)]
    outs = [[torch.empty_like(t) for t in ins] for _ in range(size)]
    dist.all_gather_coalesced(outs, ins)
    expect_error(InvalidArgument, lambda: dist.all_gather_coalesced([o[:2] for o in outs], ins), "output_tensor_lists[0]", "3 inputs")
    for r in range(size):
        assert torch.equal(outs[r][0], torch.full((2, 3), float(r)))
        assert torch.equal(outs[r][1], torch.arange(5.0) + r)
        assert outs[r][2].numel() == 0


def _monitored(size: int, rank: int) -> None:
    flagcx.monitored_barrier(timeout=timedelta(seconds=5))
    flagcx.monitored_barrier(timeout=timedelta(seconds=5), wait_all_ranks=True)
    absent = size - 1
    start = time.monotonic()
    if rank == 0:
        expect_error(FlagcxTimeout, lambda: flagcx.monitored_barrier(timeout=timedelta(seconds=1)), f"Rank {absent} failed to pass monitoredBarrier in 1000 ms")
        assert time.monotonic() - start < 5, "rank 0 waited far beyond the timeout"
    elif rank != absent:
        expect_error(FlagcxTimeout, lambda: flagcx.monitored_barrier(timeout=timedelta(seconds=1)), f"Rank {rank} successfully reached monitoredBarrier")
    if size > 2:
        if rank == 0:
            expect_error(
                FlagcxTimeout,
                lambda: flagcx.monitored_barrier(timeout=timedelta(seconds=1), wait_all_ranks=True),
                f"Ranks {', '.join(map(str, range(1, size)))} failed",
            )
        sub = dist.new_group([0, 1])
        if rank in (0, 1):
            flagcx.monitored_barrier(sub, timeout=timedelta(seconds=5))
        else:
            flagcx.monitored_barrier(sub, timeout=timedelta(seconds=5))  # not a member: returns at once
    dist.barrier()


def conformance(rank: int, size: int) -> Iterable[Check]:
    yield from compat(rank, size)
    dist.init_process_group("flagcx")
    yield "sparse_all_reduce_sum", lambda: _sparse_sum(size, rank)
    yield "sparse_all_reduce_errors", lambda: _sparse_errors(size, rank)
    yield "all_gather_coalesced", lambda: _all_gather_coalesced(size, rank)
    yield "monitored_barrier", lambda: _monitored(size, rank)
    yield "destroy_world", dist.destroy_process_group
