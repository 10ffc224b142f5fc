"""FLAGCX_CHECK: every rank compares each call with every other rank's before running it.

A mismatch (another op, dtype, size, root or reduce op, or a skipped call) raises
InvalidArgument on every rank, naming what each rank called, instead of hanging or
computing garbage. The cost is one small all-gather on the host transport per call
(two for all_to_all, whose byte counts are checked pairwise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import InvalidArgument
from ..types import PremulSum, ReduceOp

FINGERPRINT = 160
"""Bytes of one rank's call description."""


def desc(x: object) -> str:
    """``dtype[elements]`` of a tensor, or of a tensor list taken as one buffer (the forms are interchangeable)."""
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')}[{x.numel()}]"
    if isinstance(x, (list, tuple)):
        dtypes = {str(t.dtype).replace("torch.", "") for t in x if isinstance(t, torch.Tensor)}
        return f"{'/'.join(sorted(dtypes)) or '?'}[{sum(t.numel() for t in x if isinstance(t, torch.Tensor))}]"
    return "-" if x is None else type(x).__name__


def kind(x: object) -> str:
    """The dtype of an all_to_all argument (its sizes legitimately differ between ranks)."""
    first = x if isinstance(x, torch.Tensor) else next((t for t in x if isinstance(t, torch.Tensor)), None) if isinstance(x, (list, tuple)) else None
    return str(first.dtype).replace("torch.", "") if first is not None else type(x).__name__


def op_label(op: object) -> str:
    if isinstance(op, ReduceOp):
        return op.value
    if isinstance(op, PremulSum):
        return "premul_sum"
    if isinstance(op, str):
        return op.lower()
    return str(getattr(getattr(op, "op", op), "name", op)).lower()


class CallCheck:
    """The FLAGCX_CHECK exchanges of one communicator (``allgather(op, mine)``: every rank's small CPU tensor, in rank order)."""

    def __init__(self, rank: int, size: int, allgather: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
        self.rank = rank
        self.size = size
        self._allgather = allgather
        self._seq = 0

    def call(self, op: str, *fields: str) -> None:
        """Compare this call's fingerprint (sequence number, op, fields) with every rank's."""
        self._seq += 1
        text = f"#{self._seq} {op}({', '.join(fields)})"
        mine = torch.frombuffer(bytearray(text.encode()[:FINGERPRINT].ljust(FINGERPRINT, b"\0")), dtype=torch.uint8)
        every = self._allgather(op, mine)
        calls = [bytes(every[r * FINGERPRINT : (r + 1) * FINGERPRINT].tolist()).rstrip(b"\0").decode(errors="replace") for r in range(self.size)]
        if any(c != calls[0] for c in calls):
            detail = "; ".join(f"rank {r}: {c}" for r, c in enumerate(calls))
            raise InvalidArgument(
                f"ranks called different collectives ({detail}); every rank must call the same collectives, "
                "with matching dtypes, sizes, roots and reduce ops, in the same order",
                op=op,
                rank=self.rank,
            )

    def counts(self, op: str, send_counts: Sequence[int], recv_counts: Sequence[int]) -> None:
        """all_to_all: what rank i sends to rank j must be what rank j expects from rank i (every pair is checked on every rank)."""
        every = self._allgather(op, torch.tensor(list(send_counts) + list(recv_counts), dtype=torch.int64))
        counts = every.view(self.size, 2, self.size).tolist()
        bad = [
            f"rank {i} sends {counts[i][0][j]} bytes to rank {j}, which expects {counts[j][1][i]}"
            for i in range(self.size)
            for j in range(self.size)
            if counts[i][0][j] != counts[j][1][i]
        ]
        if bad:
            raise InvalidArgument(
                f"all_to_all split sizes do not match between ranks ({'; '.join(bad[:8])}{'; ...' if len(bad) > 8 else ''}); "
                "rank j's output split i must equal rank i's input split j",
                op=op,
                rank=self.rank,
            )
