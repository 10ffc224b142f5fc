"""The text report, in nccl-tests' exact layout (printf formats of nccl-tests src/util.cu).

Pure functions from results to lines, so the layout is unit-testable character by
character. flagcx-bench additions keep nccl-tests' columns where they are: a load-average
comment in the preamble, the '# Backend:' title above each table, two spread columns
appended after the in-place block (``(p90 - min) / median`` of the per-call times, in %),
a '# warning:' comment under a row whose spread says its median is not to be trusted,
and, with --compare, a ratio table after the last one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from .results import NOISY, Row, Run, Timing

if TYPE_CHECKING:
    from .bound import MemoryBandwidth

_MODE_NA = "  %7s  %6s  %6s  %6s" % ("N/A", "N/A", "N/A", "N/A")
_SPREAD = "  %6s  %6s"


def fmt_num(value: float, width: int) -> str:
    """nccl-tests getFloatStr: %.2f, falling back to %.1f, %.0f, then an exponent to fit ``width``."""
    power = 0
    step = 1
    while value >= step:
        power += 1
        step *= 10
    if power < width - 2:
        return "%*.2f" % (width, value)
    if power < width - 1:
        return "%*.1f" % (width, value)
    if power < width + 1:
        return "%*.0f" % (width, value)
    if width >= 7:
        return "%*.1e" % (width, value)
    return "%*.0e" % (width, value)


def preamble(
    program: str,
    version_line: str,
    min_bytes: int,
    max_bytes: int,
    step_factor: int,
    step_bytes: int,
    warmup: int,
    iters: int,
    check: int,
    graph: int,
    device_lines: Sequence[str],
    load: Optional[tuple[float, float, float]] = None,
    cpus: int = 0,
    local_ranks: int = 1,
) -> list[str]:
    """The lines before the first table (nccl-tests writeDeviceReport, then the host's load average)."""
    step, kind = (step_factor, "factor") if step_factor > 1 else (step_bytes, "bytes")
    lines = [
        version_line,
        f"# Collective test starting: {program}",
        f"# nThread 1 nGpus 1 minBytes {min_bytes} maxBytes {max_bytes} step: {step}({kind}) "
        f"warmup iters: {warmup} iters: {iters} agg iters: 1 validation: {check} graph: {graph} unalign: 0",
        "#",
        "# Using devices",
        *device_lines,
    ]
    if load is not None:
        lines.append(load_line(load, cpus, local_ranks))
    return lines


def load_line(load: tuple[float, float, float], cpus: int, local_ranks: int = 1) -> str:
    """Rank 0 host's load average when the table starts (the ranks themselves are idle then) and any oversubscription."""
    line = "# Load average %.2f %.2f %.2f (1, 5, 15 min) on %d cpus" % (*load, cpus)
    if cpus and local_ranks > cpus:
        line += f", {local_ranks} ranks on this host (oversubscribed: small sizes time the scheduler)"
    if cpus and load[0] >= 0.5 * cpus:
        line += "  (busy: timings may be noisy)"
    return line


def device_line(rank: int, pid: int, hostname: str, device: int, bus: str, name: str) -> str:
    """One '# Using devices' line (nccl-tests format; CPU ranks print device -1 [cpu])."""
    return "#  Rank %2d Group %2d Pid %6d on %10s device %2d [%s] %s" % (rank, 0, pid, hostname, device, bus, name)


def header() -> list[str]:
    """The out-of-place / in-place column header (nccl-tests writeResultHeader, default mode)."""
    blank = ("", "", "", "", "")
    cols = "# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %6s  %7s  %6s  %6s  %6s  %6s  %6s"
    return [
        "#",
        "# %10s  %12s  %8s  %6s  %6s           out-of-place                       in-place           spread (%%)" % blank,
        cols % ("size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong", "time", "algbw", "busbw", "#wrong", "oop", "ip"),
        cols % ("(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)", "", "", ""),
    ]


def _mode(t: Optional[Timing]) -> str:
    if t is None:
        return _MODE_NA
    head = "  %7s  %6s  %6s" % (fmt_num(t.time_us, 7), fmt_num(t.algbw, 6), fmt_num(t.busbw, 6))
    if t.wrong is None:
        return head + "    N/A"
    return head + "  %6g" % t.wrong


def _spread(t: Optional[Timing]) -> str:
    return "N/A" if t is None else "%.0f" % (100 * t.spread)


def row_line(row: Row) -> str:
    """One result line (nccl-tests writeBenchmarkLinePreamble + two writeBenchmarkLineBody), then the spreads."""
    start = "%12d  %12d  %8s  %6s  %6s" % (row.size, row.count, row.type, row.redop, "%6d" % row.root)
    if row.unsupported is not None:
        return f"{start}  not supported: {row.unsupported}"
    return start + _mode(row.out_of_place) + _mode(row.in_place) + _SPREAD % (_spread(row.out_of_place), _spread(row.in_place))


def noise_warning(row: Row) -> list[str]:
    """A comment under a row whose per-call times spread too far for its median to be trusted."""
    noisy = [(name, t) for name, t in (("out-of-place", row.out_of_place), ("in-place", row.in_place)) if t is not None and t.noisy]
    if not noisy:
        return []
    parts = [f"{name} calls took {t.min_us:.3g} to {t.p90_us:.3g} us (min to p90)" for name, t in noisy]
    return [f"# warning: {row.size} B: {'; '.join(parts)}: spread over {100 * NOISY:.0f}% of the median, do not trust it (busy machine? more -n?)"]


def backend_title(description: str) -> list[str]:
    return ["#", f"# Backend: {description}"]


def footer(run: Run) -> list[str]:
    """'# Out of bounds values' and '# Avg bus bandwidth' (nccl-tests writeResultFooter)."""
    errors = run.out_of_bounds()
    lines = [
        "# %-20s : %d %s" % ("Out of bounds values", errors, "FAILED" if errors else "OK"),
        "# %-20s : %g %s" % ("Avg bus bandwidth", run.avg_busbw(), ""),
    ]
    noisy = sum(1 for r in run.rows if any(t.noisy for t in r.timings()))
    if noisy:
        lines.append("# %-20s : %d of %d rows (spread over %.0f%%)" % ("Noisy rows", noisy, len(run.rows), 100 * NOISY))
    return lines


def conclusion(program: str) -> list[str]:
    return ["#", f"# Collective test concluded: {program}"]


def membw_line(bw: MemoryBandwidth) -> str:
    """The memory bandwidth measured before the sweep (see flagcx.bench.bound)."""
    return (
        "# Memory bandwidth per rank, %d rank(s) at once on %d MiB buffers: copy %.2f GB/s, add %.2f GB/s; "
        "copy with every core busy (%d threads per rank) %.2f GB/s (bytes read + written)"
        % (bw.ranks, bw.buffer_bytes >> 20, bw.copy_gbps, bw.add_gbps, bw.threads, bw.all_core_copy_gbps)
    )


def bound_table(runs: Sequence[Run], bw: MemoryBandwidth, min_bytes: int) -> list[str]:
    """Per size >= min_bytes: the memory-bandwidth bounds and every backend's time over them (both modes)."""
    cols = "# %10s  %8s  %6s  %10s  %10s  %8s  %8s  %8s  %8s  %8s"
    lines = [
        "#",
        "# Time over the memory-bandwidth bound: 4 x size bytes per rank at the copy bandwidth above, one thread per rank",
        "# (bound) and with every core busy (all-core); 1.0 = at the bound",
        cols % ("size", "type", "redop", "bound(us)", "all-core", "backend", "oop", "ip", "oop/all", "ip/all"),
    ]
    for run in runs:
        for row in run.rows:
            if row.size < min_bytes or row.unsupported is not None:
                continue
            bound, full = bw.allreduce_bound_us(row.size), bw.all_core_bound_us(row.size)
            modes = (row.out_of_place, row.in_place)
            cells = ["%8.2f" % (t.time_us / b) if t is not None else "%8s" % "N/A" for b in (bound, full) for t in modes]
            lines.append("%12d  %8s  %6s  %10.1f  %10.1f  %8s  " % (row.size, row.type, row.redop, bound, full, run.backend) + "  ".join(cells))
    return lines


def _ratio(num: Optional[float], den: Optional[float], width: int) -> str:
    if num is None or den is None or den <= 0 or num <= 0:
        return "%*s" % (width, "N/A")
    return "%*.3g" % (width, num / den)


def ratio_table(runs: Sequence[Run]) -> list[str]:
    """Per size, time and busbw of every backend relative to the first one (both modes)."""
    base = runs[0]
    index = {(r.type, r.redop, r.root, r.size): r for r in base.rows}
    cols = "# %10s  %8s  %6s  %6s  %8s  %8s  %9s  %8s  %9s"
    lines = [
        "#",
        f"# Ratios vs {base.backend} (time: backend / {base.backend}, > 1 is slower; busbw: backend / {base.backend}, > 1 is faster)",
        cols % ("size", "type", "redop", "root", "backend", "oop-time", "oop-busbw", "ip-time", "ip-busbw"),
    ]
    for run in runs[1:]:
        for row in run.rows:
            ref = index.get((row.type, row.redop, row.root, row.size))
            cells = []
            for mode in ("out_of_place", "in_place"):
                mine: Optional[Timing] = getattr(row, mode)
                theirs: Optional[Timing] = getattr(ref, mode) if ref is not None else None
                cells.append(_ratio(mine.time_us if mine else None, theirs.time_us if theirs else None, 8))
                cells.append(_ratio(mine.busbw if mine else None, theirs.busbw if theirs else None, 9))
            lines.append("%12d  %8s  %6s  %6d  %8s  " % (row.size, row.type, row.redop, row.root, run.backend) + "  ".join(cells))
    return lines
