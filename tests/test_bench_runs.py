"""flagcx-bench run for real: the command as a subprocess (2 spawned ranks, or mpiexec for the mpi backend).

Small sizes; each test checks the report, the exit code and the exports.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from flagcx.bench import report
from flagcx.bench.colls import COLLECTIVES
from flagcx.bench.options import DTYPES, OPS

ROW = re.compile(r"^ {0,11}\d+ +\d+ +\S+ +\S+ +-?\d+  ")


def _bench(*args: str, cwd=None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLAGCX_TIMEOUT": "60"}
    return subprocess.run([sys.executable, "-m", "flagcx.bench", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def _tables(stdout: str) -> list[list[str]]:
    """Result rows of each table (a table starts after the header's units line)."""
    tables: list[list[str]] = []
    for line in stdout.splitlines():
        if line == report.header()[3]:
            tables.append([])
        elif ROW.match(line) and tables:
            tables[-1].append(line)
    return tables


def _cells(line: str) -> list[str]:
    return line.split()


def test_real_allreduce_sweep_layout():
    p = _bench("allreduce", "-b", "8", "-e", "64K", "-f", "8", "--nproc", "2")
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert out[0].startswith("# flagcx-bench version ") and "torch=" in out[0]
    assert out[1] == "# Collective test starting: all_reduce_perf"
    assert out[2].startswith("# nThread 1 nGpus 1 minBytes 8 maxBytes 65536 step: 8(factor) warmup iters: 1 iters: 20")
    devices = [line for line in out if line.startswith("#  Rank ")]
    assert [d.split()[2] for d in devices] == ["0", "1"] and all("device -1 [cpu]" in d for d in devices)
    i = out.index(report.header()[1])
    assert out[i - 1 : i + 3] == report.header()
    (rows,) = _tables(p.stdout)
    assert [int(_cells(r)[0]) for r in rows] == [8, 64, 512, 4096, 32768]
    for r in rows:
        c = _cells(r)
        assert c[1:5] == [str(int(c[0]) // 4), "float", "sum", "-1"]
        assert c[8] == "0" and c[12] == "0", r
        assert float(c[5]) > 0 and float(c[9]) > 0
    assert "# Out of bounds values : 0 OK" in out
    avg = [line for line in out if line.startswith("# Avg bus bandwidth    : ")]
    assert len(avg) == 1 and float(avg[0].split(":")[1]) >= 0
    assert out[-1] == "# Collective test concluded: all_reduce_perf"


def test_real_every_dtype_and_op_under_a_launcher():
    """-d all -o all, ranks started by flagcx.launch (torchrun's RANK/WORLD_SIZE env): unsupported combos are rows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLAGCX_TIMEOUT": "60"}
    args = ["allreduce", "-b", "64", "-e", "64", "-n", "2", "-w", "0", "-d", "all", "-o", "all", "--compare", "flagcx,gloo"]
    cmd = [sys.executable, "-m", "flagcx.launch", "--nproc", "2", "-m", "flagcx.bench", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr
    assert len(re.findall(r"^#  Rank ", p.stdout, re.M)) == 2
    flagcx_rows, gloo_rows = _tables(p.stdout)
    for rows, backend in ((flagcx_rows, "flagcx"), (gloo_rows, "gloo")):
        assert len(rows) == len(DTYPES) * len(OPS), backend
        combos = [tuple(_cells(r)[2:4]) for r in rows]
        assert combos == [(d, o) for d in DTYPES for o in OPS]
        for r in rows:
            dtype, op = _cells(r)[2:4]
            unsupported = dtype in ("uint32", "uint64") or (backend == "gloo" and op == "avg" and dtype in ("int8", "uint8", "int32", "int64"))
            if unsupported:
                assert "not supported:" in r, r
            else:
                assert _cells(r)[8] == "0" and _cells(r)[12] == "0", r
    assert "# Ratios vs flagcx" in p.stdout


def test_real_every_collective_two_ranks():
    p = _bench("all", "-b", "1K", "-e", "1K", "-n", "3", "-r", "-1", "--nproc", "2")
    assert p.returncode == 0, p.stderr
    tables = _tables(p.stdout)
    assert len(tables) == len(COLLECTIVES)
    programs = re.findall(r"^# Collective test starting: (\S+)$", p.stdout, re.M)
    assert programs == [c.program for c in COLLECTIVES.values()]
    for (name, coll), rows in zip(COLLECTIVES.items(), tables):
        assert [_cells(r)[4] for r in rows] == (["0", "1"] if coll.rooted else ["-1"]), name
        for row in rows:
            c = _cells(row)
            count = 256 if not coll.blocked else 128
            assert (int(c[0]), int(c[1])) == (1024, count), name
            assert c[3] == ("sum" if coll.reduces else "none"), name
            assert c[8] == "0", name
            if name == "sendrecv":
                assert c[9:13] == ["N/A"] * 4 and c[14] == "N/A"
            else:
                assert c[12] == "0", name
    assert p.stdout.count("# Out of bounds values : 0 OK") == len(COLLECTIVES)


def test_real_compare_with_mpi_and_exports(tmp_path):
    pytest.importorskip("mpi4py")
    j, c, png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    p = _bench(
        "allreduce", "-b", "1K", "-e", "16K", "-f", "4", "-n", "3", "--nproc", "2",
        "--compare", "flagcx,gloo,mpi", "--json", str(j), "--csv", str(c), "--plot", str(png),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "mpi=MPICH" in p.stdout or "mpi=Open MPI" in p.stdout
    tables = _tables(p.stdout)
    assert len(tables) == 3 and all(len(t) == 3 for t in tables)
    assert re.findall(r"^# Backend: (\S+)", p.stdout, re.M) == ["flagcx", "gloo", "mpi"]
    section = p.stdout.split("# Ratios vs flagcx")[1].split("# Collective test concluded")[0]
    ratios = [line.split() for line in section.splitlines()[1:] if line and not line.startswith("#")]
    assert [r[4] for r in ratios] == ["gloo"] * 3 + ["mpi"] * 3
    assert all(float(x) > 0 for r in ratios for x in r[5:]), ratios
    doc = json.loads(j.read_text())
    assert [r["backend"] for r in doc["runs"]] == ["flagcx", "gloo", "mpi"] and doc["backend"] == "flagcx"
    assert [(r["backend"], r["size"]) for r in doc["results"]] == [(b, s) for b in ("flagcx", "gloo", "mpi") for s in (1024, 4096, 16384)]
    assert doc["config"]["nranks"] == 2 and len(doc["devices"]) == 2 and doc["flagcx_version"]
    for run in doc["runs"]:
        assert [r["size"] for r in run["results"]] == [1024, 4096, 16384]
        bws = []
        for r in run["results"]:
            for mode in ("out_of_place", "in_place"):
                m = r[mode]
                assert m["nwrong"] == 0 and m["time"] > 0 and len(m["times_us"]) == 3
                assert m["bus_bw"] == pytest.approx(m["alg_bw"])  # 2 ranks: 2(n-1)/n = 1
                assert m["alg_bw"] == pytest.approx(r["size"] / 1e3 / m["time"])
                bws.append(m["bus_bw"])
        assert run["out_of_bounds"] == {"count": 0, "okay": True}
        assert run["average_bus_bandwidth"]["bandwidth"] == pytest.approx(sum(bws) / len(bws))
    rows = list(csv.DictReader(c.open()))
    assert len(rows) == 3 * 3 * 2
    assert {(r["backend"], r["mode"], r["status"]) for r in rows} == {(b, m, "ok") for b in ("flagcx", "gloo", "mpi") for m in ("out-of-place", "in-place")}
    assert all(math.isfinite(float(r["busbw_gbps"])) and r["wrong"] == "0" for r in rows)
    head = png.read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


PEAK = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def _peak_rss(*args: str) -> int:
    """Largest resident size of any rank of one flagcx-bench run, in bytes (the ranks are the wrapper's grandchildren)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLAGCX_TIMEOUT": "60"}
    out = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-m", "flagcx.bench", *args], capture_output=True, text=True, timeout=240, env=env)
    code, peak = out.stdout.split()
    assert code == "0", out.stderr
    return int(peak)


@pytest.mark.parametrize("coll", ["allreduce", "alltoall"])
def test_real_peak_memory_is_bounded_by_the_buffers(coll):
    """A rank's peak at 64 MiB stays within 3x the buffer above its peak at 1 KiB (12x before validation was chunked)."""
    size = 64 << 20
    base = _peak_rss(coll, "-b", "1K", "-e", "1K", "-n", "2", "--nproc", "2")
    peak = _peak_rss(coll, "-b", "64M", "-e", "64M", "-n", "2", "--nproc", "2")
    assert peak - base <= 3 * size, f"{coll}: peak {peak >> 20} MiB, {(peak - base) / size:.1f}x the buffer above the 1 KiB run's {base >> 20} MiB"


def test_real_memory_bandwidth_bound_is_measured_and_reported(tmp_path):
    j = tmp_path / "r.json"
    p = _bench("allreduce", "-b", "1M", "-e", "2M", "-f", "2", "-n", "3", "--nproc", "2", "--json", str(j))
    assert p.returncode == 0, p.stderr
    (line,) = [x for x in p.stdout.splitlines() if x.startswith("# Memory bandwidth per rank, 2 rank(s) at once on 2 MiB buffers: copy ")]
    copy = float(line.split("copy ")[1].split()[0])
    assert copy > 0.1 and "copy with every core busy (1 threads per rank)" in line, line
    table = p.stdout.split("# Time over the memory-bandwidth bound")[1].splitlines()[3:5]
    assert [r.split()[0] for r in table] == ["1048576", "2097152"]
    doc = json.loads(j.read_text())
    assert doc["memory_bandwidth"]["copy_gbps_per_rank"] == pytest.approx(copy, rel=0.01)
    for r in doc["results"]:
        assert r["bound_us"] == pytest.approx(4 * r["size"] / (doc["memory_bandwidth"]["copy_gbps_per_rank"] * 1e3))
        assert r["all_core_bound_us"] == pytest.approx(4 * r["size"] / (doc["memory_bandwidth"]["all_core_copy_gbps_per_rank"] * 1e3))
        assert r["out_of_place"]["time"] > 0.3 * r["bound_us"], "faster than a third of the memory bound: the model is off"


def test_real_refusals_come_before_any_rank_starts_work():
    """A sweep that cannot fit the host's memory, and --device cuda without a GPU, fail at once with the fix."""
    p = _bench("allreduce", "-b", "8", "-e", "4096G", "--nproc", "1")
    assert p.returncode == 2 and "# Backend" not in p.stdout, p.stdout
    assert re.search(r"-e 4096G with 1 rank\(s\) on this host needs about .* is available; lower -e to", p.stderr), p.stderr
    if torch.cuda.is_available():
        return
    t0 = time.monotonic()
    p = _bench("allreduce", "--device", "cuda", "--nproc", "2")
    assert p.returncode == 2 and "--device cuda: torch" in p.stderr and "use --device cpu" in p.stderr, p.stderr
    assert time.monotonic() - t0 < 8, "spawned ranks before finding there is no GPU"


def test_real_percall_bench_on_the_cpu(tmp_path):
    """benchmarks/percall_bench.py --device cpu: Gloo, the flagcx backend and the Communicator, one process each, every size."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "percall_bench.py"
    out = tmp_path / "percall"
    done = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--passes", "1", "--calls", "50", "--repeats", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    assert sorted(summary) == ["comm", "flagcx", "torch"]
    assert all(len(per_size) == 5 and all(us > 0 for us in per_size.values()) for per_size in summary.values()), summary
    assert "| 262144 |" in out.with_suffix(".md").read_text() and "torch = Gloo" in done.stdout
