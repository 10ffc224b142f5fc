"""The side channel between ranks: barriers, per-iteration maxima, sums and agreement.

A private ProcessGroupGloo on the job's store, used only outside timed regions, so the
backend under test never carries the benchmark's own bookkeeping.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch._C._distributed_c10d as c10d
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroupGloo


class Control:
    """Rank-to-rank bookkeeping for the benchmark (see the module docstring)."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: float) -> None:
        self.rank = rank
        self.size = size
        self._pg: Any = ProcessGroupGloo(dist.PrefixStore("control/", store), rank, size, timedelta(seconds=timeout))

    def _allreduce(self, t: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        if self.size > 1:
            opts = c10d.AllreduceOptions()
            opts.reduceOp = op
            self._pg.allreduce([t], opts).wait()
        return t

    def barrier(self) -> None:
        if self.size > 1:
            self._pg.barrier(c10d.BarrierOptions()).wait()

    def max_each(self, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks (every rank passes the same length)."""
        t = torch.tensor(values, dtype=torch.float64)
        return self._allreduce(t, dist.ReduceOp.MAX).tolist()

    def total(self, value: int) -> int:
        """Sum over ranks."""
        return int(self._allreduce(torch.tensor([value], dtype=torch.int64), dist.ReduceOp.SUM).item())

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank passes True."""
        return self.total(int(flag)) > 0

    def close(self) -> None:
        try:
            self._pg.shutdown()
        except Exception:  # already torn down with the job
            pass
