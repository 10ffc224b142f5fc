"""Deterministic inputs and exact references for validation (-c), in bounded memory.

Rank r's input element i is a small integer computed from (i, r, rep), chosen per
dtype, reduce op and rank count so that every input and every result is exactly
representable (float sums of small integers are exact in any order). The values are
periodic in i with a short period P (at most about a thousand elements), so every
rank's inputs and every reduced result are tables of P int64 values: any rank computes
any other rank's input or the reference result in O(ranks x P) work. Filling a buffer
and comparing a result are one pass each over the buffer in chunks of ``CHUNK``
elements, with temporaries of one chunk, so validating a 1 GiB buffer needs a few MiB
besides the buffer itself. #wrong counts the elements that differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .colls import Buffers, Collective

_EXACT = {
    torch.int8: 127,
    torch.uint8: 255,
    torch.float16: 2048,
    torch.bfloat16: 256,
    torch.float32: 1 << 24,
}
"""Largest integer below which every integer is exact in the dtype (default: huge)."""

CPU = torch.device("cpu")

CHUNK = 1 << 20
"""Elements per pass of fill and compare (a few MiB of temporaries whatever the buffer size)."""


def _limit(dtype: torch.dtype) -> int:
    return _EXACT.get(dtype, 1 << 30)


class Pattern:
    """Input values and reduced results for one (dtype, op, rank count)."""

    def __init__(self, dtype: torch.dtype, op: str, nranks: int) -> None:
        self.dtype = dtype
        self.op = op
        self.n = nranks
        limit = _limit(dtype)
        if op == "sum":
            self.top = min(100, limit // nranks)
        elif op == "avg":
            self.top = min(100, limit // (nranks * nranks))
        else:
            self.top = min(1000, limit)
        self.twos = min(nranks, int(math.log2(limit)))
        """prod: at most this many ranks contribute a 2 to an element (the rest give 1)."""
        self.period = math.lcm(self.twos + 1, nranks) if op == "prod" else self.top + 1
        """Every rank's values repeat with this period in the element index."""

    def table(self, rank: int, rep: int, device: torch.device = CPU) -> torch.Tensor:
        """int64 inputs of ``rank`` for elements [0, period)."""
        idx = torch.arange(self.period, dtype=torch.int64, device=device)
        if self.op == "prod":
            # Element i gets a 2 from exactly k_i ranks, k_i in [0, twos]: the product is 2**k_i.
            k = (idx + rep) % (self.twos + 1)
            return torch.where((idx + rank) % self.n < k, 2, 1)
        v = (idx * 7 + rank * 13 + idx * rank + rep * 5) % (self.top + 1)
        return v * self.n if self.op == "avg" else v

    def reduced_table(self, rep: int, device: torch.device = CPU) -> torch.Tensor:
        """int64 reduction over all ranks of elements [0, period)."""
        out: Optional[torch.Tensor] = None
        for r in range(self.n):
            v = self.table(r, rep, device)
            if self.op == "avg":
                v = v // self.n
            if out is None:
                out = v
            elif self.op in ("sum", "avg"):
                out = out + v
            elif self.op == "prod":
                out = out * v
            elif self.op == "max":
                out = torch.maximum(out, v)
            else:
                out = torch.minimum(out, v)
        assert out is not None
        return out

    def values(self, rank: int, start: int, numel: int, rep: int, device: torch.device = CPU) -> torch.Tensor:
        """int64 inputs of ``rank`` for elements [start, start + numel) (small ranges: tests and tools)."""
        return _unroll(self.table(rank, rep, device), start, numel)

    def reduced(self, start: int, numel: int, rep: int, device: torch.device = CPU) -> torch.Tensor:
        """int64 reduction over all ranks of elements [start, start + numel) (small ranges)."""
        return _unroll(self.reduced_table(rep, device), start, numel)


def _unroll(table: torch.Tensor, start: int, numel: int) -> torch.Tensor:
    idx = torch.arange(start, start + numel, dtype=torch.int64, device=table.device) % table.numel()
    return table[idx]


@dataclass(frozen=True)
class Segment:
    """Output elements [at, at + numel) must equal ``table`` read periodically from element ``start``."""

    table: torch.Tensor
    start: int
    numel: int
    at: int


@dataclass(frozen=True)
class Reference:
    """The exact result one rank must hold, as periodic segments (never materialised in full)."""

    segments: tuple[Segment, ...]

    @classmethod
    def exact(cls, values: torch.Tensor) -> Reference:
        """A reference given element by element (one segment whose period is its length)."""
        values = values.reshape(-1)
        return cls((Segment(values, 0, values.numel(), 0),))

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.segments)

    def materialize(self) -> torch.Tensor:
        """The whole reference as int64 (small results: tests and debugging)."""
        parts = [_unroll(s.table, s.start, s.numel) for s in self.segments]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def _tile(table: torch.Tensor, dtype: torch.dtype, length: int) -> torch.Tensor:
    """``table`` in ``dtype`` repeated to at least ``length`` + one period, for slicing at any phase."""
    period = table.numel()
    return table.to(dtype).repeat(-(-(length + period) // period))


def _write(out: torch.Tensor, table: torch.Tensor, start: int) -> None:
    """out[j] = table[(start + j) % period], one chunk at a time."""
    numel = out.numel()
    if not numel:
        return
    tile = _tile(table, out.dtype, min(numel, CHUNK))
    period = table.numel()
    for j in range(0, numel, CHUNK):
        c = min(CHUNK, numel - j)
        off = (start + j) % period
        out[j : j + c].copy_(tile[off : off + c])


def fill(bufs: Buffers, pattern: Pattern, rank: int, rep: int) -> None:
    """Zero the output, then write this rank's inputs into the send buffer (which may alias it)."""
    bufs.recv.zero_()
    _write(bufs.send, pattern.table(rank, rep, bufs.send.device), 0)


def expected(coll: Collective, pattern: Pattern, rank: int, root: int, block: int, rep: int, device: torch.device = CPU) -> Optional[Reference]:
    """The result this rank must hold, or None when its output is not defined (non-root reduce/gather)."""
    n = pattern.n
    name = coll.name

    def ref(*parts: tuple[torch.Tensor, int, int]) -> Reference:
        segs, at = [], 0
        for table, start, numel in parts:
            segs.append(Segment(table, start, numel, at))
            at += numel
        return Reference(tuple(segs))

    def inputs(q: int) -> torch.Tensor:
        return pattern.table(q, rep, device)

    if name in ("allreduce", "reduce"):
        if name == "reduce" and rank != root:
            return None
        return ref((pattern.reduced_table(rep, device), 0, block))
    if name == "reducescatter":
        return ref((pattern.reduced_table(rep, device), rank * block, block))
    if name in ("allgather", "gather"):
        if name == "gather" and rank != root:
            return None
        return ref(*[(inputs(q), 0, block) for q in range(n)])
    if name == "broadcast":
        return ref((inputs(root), 0, block))
    if name == "scatter":
        return ref((inputs(root), rank * block, block))
    if name == "alltoall":
        return ref(*[(inputs(q), rank * block, block) for q in range(n)])
    if name == "sendrecv":
        return ref((inputs((rank - 1) % n), 0, block))
    raise ValueError(f"unknown collective {name}")


def count_wrong(result: torch.Tensor, want: Optional[Reference]) -> int:
    """Elements of ``result`` that differ from the reference (0 when there is none), compared in result's dtype chunk by chunk.

    The reference values are exact in the dtype (see the module docstring), so comparing
    in the dtype is exact; a NaN never equals and counts as wrong.
    """
    if want is None:
        return 0
    got = result.detach().reshape(-1)
    if got.numel() != want.numel:
        return max(got.numel(), want.numel)
    wrong = torch.zeros((), dtype=torch.int64, device=got.device)
    for seg in want.segments:
        if not seg.numel:
            continue
        table = seg.table.to(got.device)
        tile = _tile(table, got.dtype, min(seg.numel, CHUNK))
        period = table.numel()
        for j in range(0, seg.numel, CHUNK):
            c = min(CHUNK, seg.numel - j)
            off = (seg.start + j) % period
            wrong += (got[seg.at + j : seg.at + j + c] != tile[off : off + c]).sum()
    return int(wrong.item())
