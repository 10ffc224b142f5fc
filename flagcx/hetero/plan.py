"""Which heterogeneous allreduce plan serves a size class: measured on its first calls, agreed by every rank."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Optional

log = logging.getLogger("flagcx.hetero")


class PlanChooser:
    """Per size class, which allreduce plan is faster, measured on the first calls of that class.

    The first ``len(ORDER)`` calls of a class run the plans in ``ORDER``: one untimed
    call of each (connections, pinned buffers), then each plan twice, alternating. The
    ranks then agree on the slowest rank's best time of each plan (one 2-element host
    allreduce) and the faster plan serves every later call. Every rank sees the same
    sequence of sizes (collectives are matched), so all pick the same plan at the same call.
    """

    PLANS = ("hierarchical", "flat")
    ORDER = ("hierarchical", "flat", "hierarchical", "flat", "hierarchical", "flat")
    WARMUP = 2
    """The first calls of ORDER are not timed."""

    def __init__(self, fixed: Optional[str]) -> None:
        self.fixed = fixed
        self._samples: dict[int, list[float]] = {}
        self.chosen: dict[int, str] = {}
        """Size class (bit length of the byte count) -> plan, once decided."""
        self.timings: dict[int, tuple[float, float]] = {}
        """Size class -> (hierarchical, flat): the slowest rank's best seconds, as agreed."""

    def plan(self, nbytes: int) -> tuple[str, bool]:
        """(plan for this call, whether to time it)."""
        if self.fixed is not None:
            return self.fixed, False
        cls = nbytes.bit_length()
        if cls in self.chosen:
            return self.chosen[cls], False
        calls = len(self._samples.setdefault(cls, []))
        return self.ORDER[calls], calls >= self.WARMUP

    def record(self, nbytes: int, seconds: Optional[float], agree: Callable[[list[float]], list[float]]) -> None:
        """Count a call of the class (``seconds`` when it was timed); after the last, agree with the other ranks and choose.

        Nothing to count with a fixed plan or a class already decided.
        """
        cls = nbytes.bit_length()
        if self.fixed is not None or cls in self.chosen:
            return
        samples = self._samples[cls]
        samples.append(float("inf") if seconds is None else seconds)
        if len(samples) < len(self.ORDER):
            return
        best = [min(t for t, p in zip(samples[self.WARMUP :], self.ORDER[self.WARMUP :]) if p == plan) for plan in self.PLANS]
        hier, flat = agree(best)
        self.timings[cls] = (hier, flat)
        self.chosen[cls] = "flat" if flat < hier else "hierarchical"
        del self._samples[cls]
        log.info(
            "hetero allreduce, %d-%d bytes: hierarchical %.3g ms, flat %.3g ms: %s", 1 << (cls - 1), (1 << cls) - 1, hier * 1e3, flat * 1e3, self.chosen[cls]
        )
