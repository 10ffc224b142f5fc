"""Run ``flagcx-bench --compare`` several times and report per-size medians across the passes.

A noisy 2-core VM moves single-pass medians by 2x; interleaving whole passes and taking
the median of each backend's per-pass time (out-of-place and in-place separately) gives
numbers that hold. Writes ``PREFIX.json`` (every pass plus the summary) and ``PREFIX.md``
(a table per collective and mode: time per backend with the median over passes of the
per-call spread, (p90 - min) / median in %, and each backend's time over the first backend's).

``--before DIR`` adds an earlier flagcx checkout (its extension built in place: ``python
setup.py build_ext --inplace``) as backend ``flagcx-before``: every pass runs the bench
from it and from this checkout, one after the other, so before and after share the
machine's state; the peers' times pool both runs.

    python benchmarks/compare_passes.py --passes 3 --out benchmarks/results/NAME -- \\
        allreduce -b 4 -e 64M -f 4 -n 200 -w 20 --nproc 2 --compare flagcx,mpi,gloo
    python benchmarks/compare_passes.py --passes 5 --before /tmp/before --out NAME -- \\
        all -b 8 -e 256K -f 8 --nproc 2 --compare flagcx,mpi
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))


def _commit(where: Optional[str] = None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=where or HERE).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _dirty() -> bool:
    try:
        return bool(
            subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True, cwd=HERE).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return False


def run_pass(bench_args: list[str], checkout: Optional[str] = None) -> dict:
    """One bench run; from ``checkout`` (first on PYTHONPATH) with its flagcx rows renamed flagcx-before."""
    env = dict(os.environ)
    if checkout:
        env["PYTHONPATH"] = checkout + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pass.json")
        subprocess.run([sys.executable, "-m", "flagcx.bench", *bench_args, "--json", path], check=True, stdout=subprocess.DEVNULL, env=env, cwd=tmp)
        with open(path) as f:
            data = json.load(f)
    for run in data["runs"]:
        if checkout and run["backend"] == "flagcx":
            run["backend"] = "flagcx-before"
    return slim(data)


def slim(data: dict) -> dict:
    """A pass without its per-call times and the top-level copy of the first run's rows (MBs per pass)."""
    for run in data["runs"]:
        for row in run["results"]:
            for mode in ("out_of_place", "in_place"):
                if isinstance(row.get(mode), dict):
                    row[mode].pop("times_us", None)
    data.pop("results", None)
    return data


def summarize(passes: list[dict]) -> dict:
    """{collective: {mode: {size: {backend: {"time": median time us, "spread": median spread}}}}} over passes."""
    table: dict[str, dict[str, dict[int, dict[str, list[tuple[float, float]]]]]] = {}
    for data in passes:
        for run in data["runs"]:
            by_mode = table.setdefault(run.get("collective", data.get("collective", "?")), {"out_of_place": {}, "in_place": {}})
            for row in run["results"]:
                for mode, rows in by_mode.items():
                    cell = row.get(mode)
                    if isinstance(cell, dict) and isinstance(cell.get("time"), (int, float)):
                        rows.setdefault(row["size"], {}).setdefault(run["backend"], []).append((cell["time"], cell.get("spread", 0.0)))
    return {
        coll: {
            mode: {
                size: {b: {"time": statistics.median(t for t, _ in v), "spread": statistics.median(sp for _, sp in v)} for b, v in by.items()}
                for size, by in sorted(rows.items())
            }
            for mode, rows in modes.items()
        }
        for coll, modes in table.items()
    }


def markdown(summary: dict, backends: list[str], header: str) -> str:
    lines = [header, ""]
    base = backends[0]
    for coll, modes in summary.items():
        for mode, rows in modes.items():
            if not rows:
                continue
            lines += [f"### {coll}, {mode.replace('_', '-')} (median over passes of each pass's median time, us; (spread %))", ""]
            cols = backends + [f"{b}/{base}" for b in backends[1:]]
            lines += ["| size (B) | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
            for size, by in rows.items():
                cells = [f"{by[b]['time']:.4g} ({100 * by[b]['spread']:.0f}%)" if b in by else "n/a" for b in backends]
                cells += [f"{by[b]['time'] / by[base]['time']:.2f}" if b in by and base in by else "n/a" for b in backends[1:]]
                lines.append(f"| {size} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--out", required=True, help="output prefix (writes PREFIX.json and PREFIX.md)")
    parser.add_argument("--from-json", nargs="+", default=None, metavar="PASS.json", help="summarize these --json outputs instead of running passes")
    parser.add_argument("--before", metavar="DIR", help="an earlier checkout (extension built in place) run as flagcx-before in every pass")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="flagcx-bench arguments after --")
    ns = parser.parse_args()
    args = [a for a in ns.bench_args if a != "--"]
    if ns.from_json:
        passes = []
        for path in ns.from_json:
            with open(path) as f:
                passes.append(slim(json.load(f)))
        args = passes[0]["args"]
        ns.passes = len(passes)
    else:
        passes = []
        for _ in range(ns.passes):
            if ns.before:
                passes.append(run_pass(args, ns.before))
            passes.append(run_pass(args))
    seen = list(dict.fromkeys(run["backend"] for data in passes for run in data["runs"]))
    backends = [b for b in ("flagcx", "flagcx-before") if b in seen] + [b for b in seen if not b.startswith("flagcx")]
    summary = summarize(passes)
    meta = {
        "date": passes[0].get("start_time") or datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "commit": _commit() + (" + uncommitted changes" if _dirty() else ""),
        "command": "flagcx-bench " + " ".join(args),
        "passes": ns.passes,
        "ranks": passes[0]["nranks"],
        "versions": {k: passes[0].get(k) for k in ("flagcx_version", "torch_version", "nccl_version", "mpi_version")},
    }
    header = (
        f"## {', '.join(summary)}, {meta['ranks']} ranks: {', '.join(backends)}\n\n"
        f"{meta['date']}, {meta['machine']}, commit {meta['commit']}, {ns.passes} passes of `{meta['command']}`"
        + (f"; flagcx-before: {ns.before} at {_commit(ns.before)}, run in every pass before this checkout" if ns.before else "")
    )
    with open(ns.out + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "passes": passes}, f, separators=(",", ":"))  # compact: many passes
    with open(ns.out + ".md", "w") as f:
        f.write(markdown(summary, backends, header))
    print(markdown(summary, backends, header))


if __name__ == "__main__":
    main()
