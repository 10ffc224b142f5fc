"""Deterministic inputs and exact references for validation (-c).

Rank r's input element i is a small integer computed from (i, r, rep), chosen per
dtype, reduce op and rank count so that every input and every result is exactly
representable (float sums of small integers are exact in any order). Any rank can so
compute any other rank's input, and the reference result is built locally in int64;
#wrong counts the elements that differ.
"""

from __future__ import annotations

import math
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

    def values(self, rank: int, start: int, numel: int, rep: int, device: torch.device = CPU) -> torch.Tensor:
        """int64 inputs of ``rank`` for elements [start, start + numel), built on ``device``."""
        idx = torch.arange(start, start + numel, dtype=torch.int64, device=device)
        if self.op == "prod":
            # Element i gets a 2 from exactly k_i ranks, k_i in [0, twos]: the product is 2**k_i.
            k = (idx + rep) % (self.twos + 1)
            return torch.where((idx + rank) % self.n < k, 2, 1)
        v = (idx * 7 + rank * 13 + idx * rank + rep * 5) % (self.top + 1)
        return v * self.n if self.op == "avg" else v

    def reduced(self, start: int, numel: int, rep: int, device: torch.device = CPU) -> torch.Tensor:
        """int64 reduction over all ranks of elements [start, start + numel)."""
        out: Optional[torch.Tensor] = None
        for r in range(self.n):
            v = self.values(r, start, numel, rep, device)
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


def fill(bufs: Buffers, pattern: Pattern, rank: int, rep: int) -> None:
    """Zero the output, then write this rank's inputs into the send buffer (which may alias it)."""
    bufs.recv.zero_()
    if bufs.send.numel():
        bufs.send.copy_(pattern.values(rank, 0, bufs.send.numel(), rep, bufs.send.device).to(bufs.send.dtype))


def expected(
    coll: Collective, pattern: Pattern, rank: int, root: int, block: int, rep: int, device: torch.device = CPU
) -> Optional[torch.Tensor]:
    """The int64 result this rank must hold, or None when its output is not defined (non-root reduce/gather)."""
    n = pattern.n
    name = coll.name
    if name in ("allreduce", "reduce"):
        if name == "reduce" and rank != root:
            return None
        return pattern.reduced(0, block, rep, device)
    if name == "reducescatter":
        return pattern.reduced(rank * block, block, rep, device)
    if name in ("allgather", "gather"):
        if name == "gather" and rank != root:
            return None
        return torch.cat([pattern.values(q, 0, block, rep, device) for q in range(n)])
    if name == "broadcast":
        return pattern.values(root, 0, block, rep, device)
    if name == "scatter":
        return pattern.values(root, rank * block, block, rep, device)
    if name == "alltoall":
        return torch.cat([pattern.values(q, rank * block, block, rep, device) for q in range(n)])
    if name == "sendrecv":
        return pattern.values((rank - 1) % n, 0, block, rep, device)
    raise ValueError(f"unknown collective {name}")


def count_wrong(result: torch.Tensor, want: Optional[torch.Tensor]) -> int:
    """Elements of ``result`` that differ from the int64 reference (0 when there is none), compared on want's device."""
    if want is None:
        return 0
    got = result.detach().reshape(-1).to(device=want.device, dtype=torch.float64)
    if got.numel() != want.numel():
        return max(got.numel(), want.numel())
    return int((got != want.to(torch.float64)).sum().item())
