"""--json, --csv and --plot outputs (written by rank 0 after the sweep).

JSON follows nccl-tests' ``-J`` document (config, devices, results[] with
out_of_place / in_place objects, out_of_bounds, average_bus_bandwidth). Its top-level
``results`` hold the rows of every backend and collective of the run, each tagged with
``backend`` and ``collective`` (nccl-tests has one per document; ``backend`` at the top
is the first, the baseline of the ratios, and ``backends`` lists all), and ``runs`` holds the
same per (collective, backend); flagcx's own fields are the date, host, load average at
the start, versions and commit. Every mode object adds the per-call spread: ``time_min``,
``time_p90`` and ``spread`` ((p90 - min) / median). CSV has one row per backend, size
and mode. The plot (:func:`write_plot`) has a latency and a bandwidth panel per collective.
"""

from __future__ import annotations

import csv
import math
import re
import textwrap
from collections.abc import Sequence
from typing import Any, Optional

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
    "time_min_us",
    "time_p90_us",
    "spread",
    "status",
)


def _mode_dict(t: Optional[Timing]) -> Optional[dict[str, Any]]:
    if t is None:
        return None
    return {
        "time": t.time_us,
        "alg_bw": t.algbw,
        "bus_bw": t.busbw,
        "nwrong": t.wrong,
        "time_min": t.min_us,
        "time_p90": t.p90_us,
        "spread": t.spread,
        "times_us": t.times_us,
    }


def _result_dict(row: Row, run: Run) -> dict[str, Any]:
    out: dict[str, Any] = {
        "collective": run.collective,
        "backend": run.backend,
        "size": row.size,
        "count": row.count,
        "type": row.type,
        "redop": row.redop,
        "root": row.root,
        "out_of_place": _mode_dict(row.out_of_place),
        "in_place": _mode_dict(row.in_place),
        "actual_iterations": run.iterations,
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
        "results": [_result_dict(r, run) for r in run.rows],
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
    load: Optional[Sequence[float]] = None,
) -> dict[str, Any]:
    """The whole --json document."""
    doc: dict[str, Any] = {
        "version": 1,
        "tool": "flagcx-bench",
        "start_time": start_time,
        "end_time": end_time,
        "date": start_time.split(" ")[0],
        "host": host,
        "load_average": list(load) if load is not None else None,
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
    errors = sum(r.out_of_bounds() for r in runs)
    busbw = [t.busbw for run in runs for row in run.rows for t in row.timings()]
    if runs_json:  # nccl-tests' per-run keys (collective, backend, nranks...) from the first run, the ratio baseline
        doc.update({k: v for k, v in runs_json[0].items() if k not in ("results", "out_of_bounds", "average_bus_bandwidth")})
    doc.update(
        {
            "backends": list(dict.fromkeys(r.backend for r in runs)),
            "results": [result for run in runs_json for result in run["results"]],
            "out_of_bounds": {"count": errors, "okay": errors == 0},
            "average_bus_bandwidth": {"bandwidth": sum(busbw) / len(busbw) if busbw else 0.0, "okay": "unchecked"},
            "runs": runs_json,
        }
    )
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
                        {
                            **base,
                            "mode": mode,
                            "time_us": t.time_us,
                            "algbw_gbps": t.algbw,
                            "busbw_gbps": t.busbw,
                            "wrong": wrong,
                            "time_min_us": t.min_us,
                            "time_p90_us": t.p90_us,
                            "spread": t.spread,
                            "status": "ok",
                        }
                    )
    return out


def write_csv(path: str, runs: Sequence[Run]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, restval="")
        writer.writeheader()
        writer.writerows(csv_rows(runs))


def _series(run: Run, mode: str) -> dict[tuple[str, str, int], list[tuple[int, Timing]]]:
    series: dict[tuple[str, str, int], list[tuple[int, Timing]]] = {}
    for row in run.rows:
        t = getattr(row, mode)
        if t is None or row.size <= 0:
            continue
        series.setdefault((row.type, row.redop, row.root), []).append((row.size, t))
    return series


def byte_label(nbytes: float) -> str:
    """8 B, 512 B, 1 KiB, 64 KiB, 1 MiB, 1 GiB (axis ticks)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes:g} B"


def _size_axis(ax: Any, sizes: Sequence[int]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    lo, hi = min(sizes), max(sizes)
    exps = range(max(lo.bit_length() - 1, 0), hi.bit_length())
    step = max(1, math.ceil(len(exps) / 8))  # at most about 8 labelled ticks
    ax.xaxis.set_major_locator(FixedLocator([1 << e for e in exps][::step]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: byte_label(x)))
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_xlabel("message size")
    ax.grid(True, which="both", alpha=0.3)


def write_plot(path: str, runs: Sequence[Run], title: str, caption: str) -> None:
    """Write :func:`plot_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = plot_figure(runs, title, caption)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_figure(runs: Sequence[Run], title: str, caption: str) -> Any:
    """Per collective, a latency panel (log-log) and a bus-bandwidth panel; out-of-place solid, in-place dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or pip install 'flagcx[plot]')") from exc
    colls = list(dict.fromkeys(r.collective for r in runs))
    title = "\n".join(textwrap.wrap(title, 100))  # one long line was clipped at both ends
    head = 0.45 + 0.3 * title.count("\n")  # inches above the panels for the title, below them for the caption: fixed,
    foot = 0.4  # not a fraction of the height, which left wide empty bands on a figure of nine collectives
    height = 3.8 * len(colls) + head + foot
    fig, axes = plt.subplots(len(colls), 2, figsize=(12, height), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (lat, bw), coll in zip(axes, colls):
        sizes: list[int] = []
        for i, run in enumerate(r for r in runs if r.collective == coll):
            for mode, style in (("out_of_place", "-"), ("in_place", "--")):
                series = _series(run, mode)
                for j, ((dtype, redop, root), points) in enumerate(series.items()):
                    label = run.backend + (" in-place" if mode == "in_place" else "")
                    if len(series) > 1:
                        label += f" {dtype}/{redop}" + (f"/root {root}" if root >= 0 else "")
                    xs = [p[0] for p in points]
                    sizes += xs
                    color = colors[(i * 3 + j) % len(colors)]
                    lat.plot(xs, [p[1].time_us for p in points], style, marker="o", markersize=3, color=color, label=label)
                    bw.plot(xs, [p[1].busbw for p in points], style, marker="o", markersize=3, color=color, label=label)
        lat.set_yscale("log")
        lat.set_ylabel("time per call (us, median)")
        lat.set_title(f"{coll}: latency")
        bw.set_ylabel("bus bandwidth (GB/s)")
        bw.set_title(f"{coll}: bus bandwidth")
        for ax in (lat, bw):
            if sizes:
                _size_axis(ax, sizes)
        if bw.lines:
            bw.legend(fontsize="small", loc="upper left")
    fig.suptitle(title, fontsize="large")
    fig.text(0.5, 0.1 / height, caption, ha="center", va="bottom", fontsize="small", color="0.3")
    fig.tight_layout(rect=(0, foot / height, 1, 1 - head / height))
    return fig
