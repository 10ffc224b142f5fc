"""--json, --csv and --plot outputs (written by rank 0 after the sweep).

JSON follows nccl-tests' ``-J`` document (config, devices, results[] with
out_of_place / in_place objects, out_of_bounds, average_bus_bandwidth) for the first
backend at top level, plus ``runs`` with every (collective, backend) and flagcx's own
fields (backend, date, host, versions, commit). CSV has one row per backend, size and
mode. The plot is busbw vs size on a log-x axis, one line per backend.
"""

from __future__ import annotations

import csv
import math
import re
from typing import Any, Optional, Sequence

from .results import Row, Run, Timing

CSV_FIELDS = (
    "collective",
    "backend",
    "size",
    "count",
    "type",
    "redop",
    "root",
    "mode",
    "time_us",
    "algbw_gbps",
    "busbw_gbps",
    "wrong",
    "status",
)


def _mode_dict(t: Optional[Timing]) -> Optional[dict[str, Any]]:
    if t is None:
        return None
    return {"time": t.time_us, "alg_bw": t.algbw, "bus_bw": t.busbw, "nwrong": t.wrong, "times_us": t.times_us}


def _result_dict(row: Row, iterations: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "size": row.size,
        "count": row.count,
        "type": row.type,
        "redop": row.redop,
        "root": row.root,
        "out_of_place": _mode_dict(row.out_of_place),
        "in_place": _mode_dict(row.in_place),
        "actual_iterations": iterations,
    }
    if row.unsupported is not None:
        out["unsupported"] = row.unsupported
    return out


def run_dict(run: Run) -> dict[str, Any]:
    errors = run.out_of_bounds()
    return {
        "collective": run.collective,
        "program": run.program,
        "backend": run.backend,
        "backend_description": run.description,
        "nranks": run.nranks,
        "results": [_result_dict(r, run.iterations) for r in run.rows],
        "out_of_bounds": {"count": errors, "okay": errors == 0},
        "average_bus_bandwidth": {"bandwidth": run.avg_busbw(), "okay": "unchecked"},
    }


_DEVICE = re.compile(r"#  Rank\s+(-?\d+) Group\s+(-?\d+) Pid\s+(\d+) on\s+(\S+) device\s+(-?\d+) \[([^\]]*)\] (.*)$")


def device_dict(line: str) -> dict[str, Any]:
    """A '# Using devices' line as nccl-tests' JSON device record."""
    m = _DEVICE.match(line)
    if not m:
        return {"line": line}
    rank, group, pid, host, device, bus, info = m.groups()
    return {
        "rank": int(rank),
        "group": int(group),
        "pid": int(pid),
        "hostname": host,
        "device": int(device),
        "device_hex": bus,
        "device_info": info,
    }


def json_document(
    runs: Sequence[Run],
    config: dict[str, Any],
    device_lines: Sequence[str],
    info: dict[str, Optional[str]],
    host: str,
    argv: Sequence[str],
    start_time: str,
    end_time: str,
) -> dict[str, Any]:
    """The whole --json document."""
    doc: dict[str, Any] = {
        "version": 1,
        "tool": "flagcx-bench",
        "start_time": start_time,
        "end_time": end_time,
        "date": start_time.split(" ")[0],
        "host": host,
        "args": list(argv),
        "flagcx_version": info.get("flagcx"),
        "flagcx_commit": info.get("flagcx_commit"),
        "torch_version": info.get("torch"),
        "nccl_version": info.get("nccl"),
        "mpi_version": info.get("mpi"),
        "config": config,
        "devices": [device_dict(line) for line in device_lines],
    }
    runs_json = [run_dict(r) for r in runs]
    if runs_json:
        doc.update(runs_json[0])
    doc["runs"] = runs_json
    return doc


def csv_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One dict per backend, size and mode (unsupported combinations: one row, mode empty)."""
    out = []
    for run in runs:
        for row in run.rows:
            base = {
                "collective": run.collective,
                "backend": run.backend,
                "size": row.size,
                "count": row.count,
                "type": row.type,
                "redop": row.redop,
                "root": row.root,
            }
            if row.unsupported is not None:
                out.append({**base, "mode": "", "status": f"not supported: {row.unsupported}"})
                continue
            for mode, t in (("out-of-place", row.out_of_place), ("in-place", row.in_place)):
                if t is None:
                    out.append({**base, "mode": mode, "status": "n/a"})
                else:
                    wrong = "" if t.wrong is None else t.wrong
                    out.append(
                        {**base, "mode": mode, "time_us": t.time_us, "algbw_gbps": t.algbw, "busbw_gbps": t.busbw, "wrong": wrong, "status": "ok"}
                    )
    return out


def write_csv(path: str, runs: Sequence[Run]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, restval="")
        writer.writeheader()
        writer.writerows(csv_rows(runs))


def _series(run: Run) -> dict[tuple[str, str, int], list[tuple[int, float]]]:
    series: dict[tuple[str, str, int], list[tuple[int, float]]] = {}
    for row in run.rows:
        t = row.out_of_place or row.in_place
        if t is None or row.size <= 0:
            continue
        series.setdefault((row.type, row.redop, row.root), []).append((row.size, t.busbw))
    return series


def write_plot(path: str, runs: Sequence[Run], title: str) -> None:
    """busbw (out-of-place, else in-place) vs size, log-x, one line per backend; one panel per collective."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or pip install 'flagcx[plot]')") from exc
    colls = list(dict.fromkeys(r.collective for r in runs))
    ncols = min(3, len(colls))
    nrows = math.ceil(len(colls) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4 * nrows), squeeze=False)
    for ax, coll in zip(axes.flat, colls):
        for run in (r for r in runs if r.collective == coll):
            series = _series(run)
            for (dtype, redop, root), points in series.items():
                label = run.backend
                if len(series) > 1:
                    label += f" {dtype}/{redop}" + (f"/root {root}" if root >= 0 else "")
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("bus bandwidth (GB/s)")
        ax.set_title(coll)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(colls) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
