"""The collectives: element counts, buffer layouts and bus-bandwidth factors (nccl-tests conventions).

For a swept size S bytes and element size e, ``count = S // e``. Collectives whose
buffers hold one block per rank (allgather, reducescatter, gather, scatter, alltoall)
use a per-rank block of ``c = count // n`` elements: the row prints ``c`` as count and
``c * n * e`` as size, exactly like nccl-tests. The printed size is also the S of
``algbw = S / time``, and ``busbw = algbw * factor(n)``:

    allreduce                                         2(n-1)/n
    allgather, reducescatter, alltoall, gather, scatter   (n-1)/n   (S = total array)
    broadcast, reduce, sendrecv                        1

gather and scatter follow nccl-tests' gather.cu / scatter.cu: S is the whole gathered
(scattered) array and the factor (n-1)/n, because the root's link carries the n-1
blocks that are not its own.

In-place layouts are NCCL's: allgather / gather send from ``recv[rank*c:(rank+1)*c]``,
reducescatter / scatter receive into ``send[rank*c:(rank+1)*c]``, the other
collectives use one buffer for both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def _allreduce_factor(n: int) -> float:
    return 2.0 * (n - 1) / n


def _partial_factor(n: int) -> float:
    return (n - 1) / n


def _unit_factor(n: int) -> float:
    return 1.0


@dataclass(frozen=True)
class Collective:
    """One benchmarked collective."""

    name: str
    """CLI name (allreduce, allgather, ...)."""
    program: str
    """nccl-tests program name, printed in the preamble (all_reduce_perf, ...)."""
    reduces: bool
    """Takes a reduce op (-o); the others print redop "none"."""
    rooted: bool
    """Takes a root (-r); the others print root -1."""
    blocked: bool
    """Buffers hold one block of count // n elements per rank."""
    factor: Callable[[int], float]
    """busbw / algbw for n ranks."""
    send_blocks: int
    """Send buffer size in blocks (1, or n when it is 'n')."""
    recv_blocks: int

    def counts(self, size: int, elem_size: int, nranks: int) -> tuple[int, int]:
        """(printed count, elements that make the printed size) for a swept size in bytes."""
        count = size // elem_size
        if self.blocked:
            block = count // nranks
            return block, block * nranks
        return count, count

    def busbw(self, algbw: float, nranks: int) -> float:
        return algbw * self.factor(nranks)


N = -1
"""Marker for 'one block per rank' in send_blocks / recv_blocks."""

COLLECTIVES: dict[str, Collective] = {
    c.name: c
    for c in (
        Collective("allreduce", "all_reduce_perf", True, False, False, _allreduce_factor, 1, 1),
        Collective("allgather", "all_gather_perf", False, False, True, _partial_factor, 1, N),
        Collective("reducescatter", "reduce_scatter_perf", True, False, True, _partial_factor, N, 1),
        Collective("broadcast", "broadcast_perf", False, True, False, _unit_factor, 1, 1),
        Collective("reduce", "reduce_perf", True, True, False, _unit_factor, 1, 1),
        Collective("gather", "gather_perf", False, True, True, _partial_factor, 1, N),
        Collective("scatter", "scatter_perf", False, True, True, _partial_factor, N, 1),
        Collective("alltoall", "alltoall_perf", False, False, True, _partial_factor, N, N),
        Collective("sendrecv", "sendrecv_perf", False, False, False, _unit_factor, 1, 1),
    )
}


@dataclass
class Buffers:
    """The send and recv tensors of one (size, mode); in-place modes alias them (see the module docstring)."""

    send: torch.Tensor
    recv: torch.Tensor
    block: int
    """Elements per rank block (the printed count)."""
    inplace: bool


def allocate(coll: Collective, block: int, rank: int, nranks: int, dtype: torch.dtype, device: torch.device, inplace: bool) -> Buffers:
    """Allocate the buffers of one (size, mode) with the nccl-tests layout."""
    send_n = block * (nranks if coll.send_blocks == N else 1)
    recv_n = block * (nranks if coll.recv_blocks == N else 1)
    if not inplace:
        send = torch.zeros(send_n, dtype=dtype, device=device)
        recv = torch.zeros(recv_n, dtype=dtype, device=device)
    elif send_n == recv_n:
        send = recv = torch.zeros(recv_n, dtype=dtype, device=device)
    elif recv_n > send_n:
        recv = torch.zeros(recv_n, dtype=dtype, device=device)
        send = recv[rank * block : (rank + 1) * block]
    else:
        send = torch.zeros(send_n, dtype=dtype, device=device)
        recv = send[rank * block : (rank + 1) * block]
    return Buffers(send, recv, block, inplace)
