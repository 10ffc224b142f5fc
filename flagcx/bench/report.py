"""The text report, in nccl-tests' exact layout (printf formats of nccl-tests src/util.cu).

Pure functions from results to lines, so the layout is unit-testable character by
character. flagcx-bench additions are comment lines: the '# Backend:' title above each
table and, with --compare, a ratio table after the last one.
"""

from __future__ import annotations

from typing import Optional, Sequence

from .results import Row, Run, Timing

_MODE_NA = "  %7s  %6s  %6s  %6s" % ("N/A", "N/A", "N/A", "N/A")


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
) -> list[str]:
    """The lines before the first table (nccl-tests writeDeviceReport)."""
    step, kind = (step_factor, "factor") if step_factor > 1 else (step_bytes, "bytes")
    return [
        version_line,
        f"# Collective test starting: {program}",
        f"# nThread 1 nGpus 1 minBytes {min_bytes} maxBytes {max_bytes} step: {step}({kind}) "
        f"warmup iters: {warmup} iters: {iters} agg iters: 1 validation: {check} graph: {graph} unalign: 0",
        "#",
        "# Using devices",
        *device_lines,
    ]


def device_line(rank: int, pid: int, hostname: str, device: int, bus: str, name: str) -> str:
    """One '# Using devices' line (nccl-tests format; CPU ranks print device -1 [cpu])."""
    return "#  Rank %2d Group %2d Pid %6d on %10s device %2d [%s] %s" % (rank, 0, pid, hostname, device, bus, name)


def header() -> list[str]:
    """The out-of-place / in-place column header (nccl-tests writeResultHeader, default mode)."""
    blank = ("", "", "", "", "")
    cols = "# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %6s  %7s  %6s  %6s  %6s %s"
    return [
        "#",
        "# %10s  %12s  %8s  %6s  %6s           out-of-place                       in-place          " % blank,
        cols % ("size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong", "time", "algbw", "busbw", "#wrong", ""),
        cols % ("(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)", "", ""),
    ]


def _mode(t: Optional[Timing]) -> str:
    if t is None:
        return _MODE_NA
    head = "  %7s  %6s  %6s" % (fmt_num(t.time_us, 7), fmt_num(t.algbw, 6), fmt_num(t.busbw, 6))
    if t.wrong is None:
        return head + "    N/A"
    return head + "  %6g" % t.wrong


def row_line(row: Row) -> str:
    """One result line (nccl-tests writeBenchmarkLinePreamble + two writeBenchmarkLineBody)."""
    start = "%12d  %12d  %8s  %6s  %6s" % (row.size, row.count, row.type, row.redop, "%6d" % row.root)
    if row.unsupported is not None:
        return f"{start}  not supported: {row.unsupported}"
    return start + _mode(row.out_of_place) + _mode(row.in_place)


def backend_title(description: str) -> list[str]:
    return ["#", f"# Backend: {description}"]


def footer(run: Run) -> list[str]:
    """'# Out of bounds values' and '# Avg bus bandwidth' (nccl-tests writeResultFooter)."""
    errors = run.out_of_bounds()
    return [
        "# %-20s : %d %s" % ("Out of bounds values", errors, "FAILED" if errors else "OK"),
        "# %-20s : %g %s" % ("Avg bus bandwidth", run.avg_busbw(), ""),
    ]


def conclusion(program: str) -> list[str]:
    return ["#", f"# Collective test concluded: {program}"]


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
