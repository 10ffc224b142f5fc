"""Result records shared by the sweep, the text report and the exporters (plain data, no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

NOISY = 0.5
"""A mode whose spread exceeds this is flagged: its median is not to be trusted (see Timing.spread)."""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


@dataclass
class Timing:
    """One mode (out-of-place or in-place) of one row."""

    time_us: float
    """Median over calls of the slowest rank's time, microseconds."""
    algbw: float
    """GB/s (decimal)."""
    busbw: float
    wrong: Optional[int]
    """Wrong elements summed over ranks; None when validation is off (-c 0)."""
    times_us: list[float] = field(default_factory=list)
    """Per call (or per graph replay, per op), the slowest rank's time."""

    @property
    def min_us(self) -> float:
        return min(self.times_us) if self.times_us else self.time_us

    @property
    def p90_us(self) -> float:
        return percentile(self.times_us, 90) if self.times_us else self.time_us

    @property
    def spread(self) -> float:
        """(p90 - min) / median of the per-call times: 0.05 is a quiet machine, > NOISY a number not to trust."""
        return (self.p90_us - self.min_us) / self.time_us if self.time_us > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY


@dataclass
class Row:
    """One line of the table: a size of one (dtype, op, root) combination."""

    size: int
    count: int
    type: str
    redop: str
    root: int
    out_of_place: Optional[Timing] = None
    """None: the backend has no such mode (printed N/A)."""
    in_place: Optional[Timing] = None
    unsupported: Optional[str] = None
    """Why the backend cannot run this combination (then both modes are None)."""

    def timings(self) -> list[Timing]:
        return [t for t in (self.out_of_place, self.in_place) if t is not None]


@dataclass
class Run:
    """Every row of one collective on one backend."""

    collective: str
    program: str
    backend: str
    description: str
    nranks: int
    iterations: int
    """Timed ops per result (-n, times -G replays with CUDA graphs)."""
    rows: list[Row] = field(default_factory=list)

    def out_of_bounds(self) -> int:
        """Results (row modes) with at least one wrong element, as nccl-tests counts them."""
        return sum(1 for r in self.rows for t in r.timings() if t.wrong)

    def avg_busbw(self) -> float:
        """Mean of every printed busbw value (both modes of every row)."""
        values = [t.busbw for r in self.rows for t in r.timings()]
        return sum(values) / len(values) if values else 0.0
