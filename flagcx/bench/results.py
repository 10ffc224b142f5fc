"""Result records shared by the sweep, the text report and the exporters (plain data, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


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
