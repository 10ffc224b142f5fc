"""flagcx-bench's pure parts: flags, sizes, busbw factors, validation data, the exact nccl-tests layout, exports.

They are checked against nccl-tests' formulas and printf formats; ``test_bench_runs.py``
runs the command itself.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from flagcx.bench import data, export, report
from flagcx.bench.colls import COLLECTIVES, allocate
from flagcx.bench.options import DTYPES, OPS, parse, parse_size, size_list
from flagcx.bench.results import Row, Run, Timing

# ----------------------------------------------------------------------------- flags and sizes


@pytest.mark.parametrize(
    "text,value",
    [("8", 8), ("0", 0), ("64K", 65536), ("64k", 65536), ("1M", 1 << 20), ("16m", 16 << 20), ("2G", 2 << 30), ("1.5K", 1536), (" 3 ", 3)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "K", "1X", "-8", "1KB2", "1e3"])
def test_parse_size_rejects(text):
    with pytest.raises(Exception, match="invalid size"):
        parse_size(text)


def test_size_list_factor_and_increment():
    assert size_list(8, 65536, 8, 1 << 20) == [8, 64, 512, 4096, 32768]
    assert size_list(8, 16 << 20, 4, 1 << 20)[-1] == 8 << 20
    assert size_list(1024, 4096, 1, 1024) == [1024, 2048, 3072, 4096]
    assert size_list(1000, 4500, 1, 1000) == [1000, 2000, 3000, 4000]
    assert size_list(32 << 20, 32 << 20, 1, 1 << 20) == [32 << 20]
    assert size_list(0, 0, 2, 0) == [0]
    assert size_list(0, 2, 1, 1) == [0, 1, 2]


@pytest.mark.parametrize("args", [(8, 4, 2, 1), (0, 8, 2, 1), (0, 8, 1, 0)])
def test_size_list_rejects(args):
    with pytest.raises(ValueError):
        size_list(*args)


def test_parse_flags():
    o = parse(["allreduce", "-b", "8", "-e", "64K", "-f", "8", "-n", "5", "-w", "2", "-c", "0", "-r", "1"])
    assert (o.collectives, o.sizes, o.iters, o.warmup, o.check, o.root) == (["allreduce"], [8, 64, 512, 4096, 32768], 5, 2, 0, 1)
    assert (o.dtypes, o.ops, o.backends, o.device, o.nproc, o.graph_replays) == (["float"], ["sum"], ["flagcx"], "cpu", None, 0)
    d = parse(["reduce"])
    assert (d.min_bytes, d.max_bytes, d.step_factor, d.step_bytes, d.iters, d.warmup, d.check) == (32 << 20, 32 << 20, 1, 1 << 20, 20, 1, 1)
    a = parse(["all", "-d", "all", "-o", "all", "--compare", "gloo,flagcx,mpi", "--nproc", "3"])
    assert a.collectives == list(COLLECTIVES)
    assert a.dtypes == ["int8", "uint8", "int32", "uint32", "int64", "uint64", "half", "float", "double", "bfloat16"]
    assert a.ops == ["sum", "prod", "max", "min", "avg"]
    assert (a.backends, a.nproc) == (["gloo", "flagcx", "mpi"], 3)
    i = parse(["allgather,scatter", "-b", "1K", "-e", "3K", "-i", "1K", "-d", "half,int8", "-o", "max"])
    assert (i.collectives, i.sizes, i.dtypes, i.ops) == (["allgather", "scatter"], [1024, 2048, 3072], ["half", "int8"], ["max"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["allreduce", "-G", "2"], "needs GPU tensors"),
        (["allreduce", "--backend", "nccl"], "needs GPU tensors"),
        (["allreduce", "--device", "cuda", "--compare", "nccl,gloo"], "use --device cpu"),
        (["allreduce", "-d", "float8"], "unknown datatype"),
        (["allreduce", "-o", "mulsum"], "unknown reduce op"),
        (["allreduce", "--compare", "gloo,gloo"], "twice"),
        (["allreduce", "--compare", "gloo,ucc"], "unknown backend"),
        (["alltoallv"], "unknown collective"),
        (["allreduce", "-b", "1M", "-e", "1K"], "larger than -e"),
        (["allreduce", "-n", "0"], "must be >= 1"),
        (["allreduce", "-r", "-2"], "every root"),
    ],
)
def test_parse_rejects(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- counts and busbw


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 16])
def test_busbw_factors(n):
    expect = {
        "allreduce": 2 * (n - 1) / n,
        "allgather": (n - 1) / n,
        "reducescatter": (n - 1) / n,
        "alltoall": (n - 1) / n,
        "gather": (n - 1) / n,
        "scatter": (n - 1) / n,
        "broadcast": 1.0,
        "reduce": 1.0,
        "sendrecv": 1.0,
    }
    assert set(expect) == set(COLLECTIVES)
    for name, factor in expect.items():
        assert COLLECTIVES[name].busbw(3.0, n) == pytest.approx(3.0 * factor, abs=0, rel=1e-15), name


def test_counts_follow_nccl_tests():
    # (printed count, elements in the printed size) for 1000 bytes of float on 3 ranks.
    for name in ("allreduce", "broadcast", "reduce", "sendrecv"):
        assert COLLECTIVES[name].counts(1000, 4, 3) == (250, 250)
    for name in ("allgather", "reducescatter", "alltoall", "gather", "scatter"):
        assert COLLECTIVES[name].counts(1000, 4, 3) == (83, 249)
    assert COLLECTIVES["allgather"].counts(8, 4, 4) == (0, 0)
    reduces = {n for n, c in COLLECTIVES.items() if c.reduces}
    rooted = {n for n, c in COLLECTIVES.items() if c.rooted}
    assert reduces == {"allreduce", "reducescatter", "reduce"}
    assert rooted == {"broadcast", "reduce", "gather", "scatter"}


def test_inplace_layouts_alias_like_nccl():
    rank, n, block = 2, 4, 5
    ag = allocate(COLLECTIVES["allgather"], block, rank, n, torch.float32, torch.device("cpu"), True)
    assert ag.recv.numel() == n * block and ag.send.data_ptr() == ag.recv.data_ptr() + rank * block * 4
    rs = allocate(COLLECTIVES["reducescatter"], block, rank, n, torch.float32, torch.device("cpu"), True)
    assert rs.send.numel() == n * block and rs.recv.data_ptr() == rs.send.data_ptr() + rank * block * 4
    ar = allocate(COLLECTIVES["alltoall"], block, rank, n, torch.float32, torch.device("cpu"), True)
    assert ar.send is ar.recv and ar.send.numel() == n * block
    oop = allocate(COLLECTIVES["gather"], block, rank, n, torch.int8, torch.device("cpu"), False)
    assert (oop.send.numel(), oop.recv.numel()) == (block, n * block) and oop.send.data_ptr() != oop.recv.data_ptr()


# ----------------------------------------------------------------------------- validation data


def _reduce_in_dtype(values: list[torch.Tensor], op: str, n: int) -> torch.Tensor:
    acc = values[0].clone()
    for v in values[1:]:
        if op in ("sum", "avg"):
            acc = acc + v
        elif op == "prod":
            acc = acc * v
        elif op == "max":
            acc = torch.maximum(acc, v)
        else:
            acc = torch.minimum(acc, v)
    if op == "avg":
        acc = acc / n if acc.dtype.is_floating_point else torch.div(acc, n, rounding_mode="trunc")
    return acc.to(values[0].dtype)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int32", "int64", "half", "float", "double", "bfloat16"])
@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_pattern_results_are_exact_in_the_dtype(dtype, n):
    dt = DTYPES[dtype]
    for op in OPS:
        p = data.Pattern(dt, op, n)
        inputs = [p.values(r, 5, 997, rep=3) for r in range(n)]
        as_dtype = [v.to(dt) for v in inputs]
        assert all(torch.equal(a.to(torch.int64), v) for a, v in zip(as_dtype, inputs)), f"{op}: input not exact"
        got = _reduce_in_dtype(as_dtype, op, n)
        want = p.reduced(5, 997, rep=3)
        assert data.count_wrong(got, data.Reference.exact(want)) == 0, f"{dtype} {op} n={n}"
        assert len(set(want.tolist())) > 1, f"{dtype} {op} n={n}: degenerate data"


def _simulate(name: str, sends: list[torch.Tensor], block: int, root: int, op: str, n: int) -> list[torch.Tensor]:
    """What each rank's output holds after the collective, computed by hand."""
    blocks = lambda t: [t[i * block : (i + 1) * block] for i in range(n)]  # noqa: E731
    if name in ("allreduce", "reduce"):
        return [_reduce_in_dtype(sends, op, n)] * n
    if name == "reducescatter":
        full = _reduce_in_dtype(sends, op, n)
        return blocks(full)
    if name in ("allgather", "gather"):
        return [torch.cat(sends)] * n
    if name == "broadcast":
        return [sends[root]] * n
    if name == "scatter":
        return blocks(sends[root])
    if name == "alltoall":
        return [torch.cat([blocks(sends[q])[r] for q in range(n)]) for r in range(n)]
    if name == "sendrecv":
        return [sends[(r - 1) % n] for r in range(n)]
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(COLLECTIVES))
def test_expected_matches_a_hand_simulation(name):
    coll, n, root, block = COLLECTIVES[name], 3, 1, 7
    op = "sum" if coll.reduces else "none"
    p = data.Pattern(torch.float32, op, n)
    bufs = [allocate(coll, block, r, n, torch.float32, torch.device("cpu"), False) for r in range(n)]
    for r, b in enumerate(bufs):
        data.fill(b, p, r, rep=2)
        assert b.recv.abs().sum() == 0
    outs = _simulate(name, [b.send for b in bufs], block, root, op, n)
    for r in range(n):
        want = data.expected(coll, p, r, root, block, rep=2)
        if want is None:
            assert name in ("reduce", "gather") and r != root
            continue
        assert data.count_wrong(outs[r], want) == 0, f"{name} rank {r}"
        assert torch.equal(want.materialize(), outs[r].to(torch.int64))
        assert data.count_wrong(outs[(r + 1) % n], want) > 0 or name in ("allreduce", "allgather", "broadcast", "reduce", "gather")


def test_count_wrong_counts_elements():
    want = data.Reference.exact(torch.arange(10))
    got = torch.arange(10, dtype=torch.float32)
    assert data.count_wrong(got, want) == 0
    got[3] = 99
    got[7] = float("nan")
    assert data.count_wrong(got, want) == 2
    assert data.count_wrong(got[:4], want) == 10
    assert data.count_wrong(got, None) == 0


def _direct_values(p: data.Pattern, rank: int, idx: torch.Tensor, rep: int) -> torch.Tensor:
    """The input formula evaluated element by element (no period), as the reference for the tables."""
    if p.op == "prod":
        return torch.where((idx + rank) % p.n < (idx + rep) % (p.twos + 1), 2, 1)
    v = (idx * 7 + rank * 13 + idx * rank + rep * 5) % (p.top + 1)
    return v * p.n if p.op == "avg" else v


@pytest.mark.parametrize("op", [*OPS, "none"])
def test_periodic_fill_and_compare_across_chunks(op, monkeypatch):
    """Chunked fill and compare agree with the formula at every phase, across chunk edges, at any start."""
    monkeypatch.setattr(data, "CHUNK", 37)
    n, start, numel = 5, 1234567, 4099
    p = data.Pattern(torch.int8 if op == "none" else torch.float16, op, n)
    idx = torch.arange(start, start + numel)
    for r in range(n):
        assert torch.equal(p.values(r, start, numel, rep=4), _direct_values(p, r, idx, 4))
    coll = COLLECTIVES["allgather" if op == "none" else "reducescatter"]
    bufs = allocate(coll, numel, 2, n, p.dtype, torch.device("cpu"), False)
    data.fill(bufs, p, 2, rep=4)
    assert torch.equal(bufs.send.to(torch.int64), _direct_values(p, 2, torch.arange(bufs.send.numel()), 4))
    want = data.expected(coll, p, 2, 0, numel, rep=4)
    assert want is not None and want.numel == bufs.recv.numel()
    exact = want.materialize()
    got = exact.to(p.dtype)
    assert data.count_wrong(got, want) == 0
    got[::97] += 1
    assert data.count_wrong(got, want) == len(range(0, got.numel(), 97))


# ----------------------------------------------------------------------------- the text layout

HEADER = [
    "#",
    "#                                                              out-of-place                       in-place          ",
    "#       size         count      type   redop    root     time   algbw   busbw  #wrong     time   algbw   busbw  #wrong ",
    "#        (B)    (elements)                               (us)  (GB/s)  (GB/s)             (us)  (GB/s)  (GB/s)         ",
]


def test_header_is_nccl_tests_then_the_spread_columns():
    ours = report.header()
    assert [line[: len(theirs)] for line, theirs in zip(ours, HEADER)] == HEADER
    assert ours[1].endswith("in-place           spread (%)")
    assert ours[2].endswith("#wrong     oop      ip")


def test_row_matches_nccl_tests_printf_then_spreads():
    row = Row(8, 2, "float", "sum", -1, Timing(10.52, 0.0, 0.0, 0, [10.0, 10.52, 11.0]), Timing(10.30, 0.0, 0.0, 0, [10.3, 30.0, 10.3]))
    assert report.row_line(row) == (
        "           8             2     float     sum      -1    10.52    0.00    0.00       0    10.30    0.00    0.00       0      10     191"
    )
    big = Row(134217728, 33554432, "bfloat16", "avg", 3, Timing(1709.3, 78.52, 314.1, 12), Timing(123456.7, 1.087, 0.5, 0))
    assert (
        report.row_line(big)
        == "   134217728      33554432  bfloat16     avg       3  1709.30   78.52  314.10      12   123457    1.09    0.50       0       0       0"
    )
    no_check = Row(64, 16, "int32", "none", 0, Timing(5.0, 0.01, 0.02, None), None)
    line = report.row_line(no_check)
    assert line == "          64            16     int32    none       0     5.00    0.01    0.02    N/A      N/A     N/A     N/A     N/A       0     N/A"
    na = report.row_line(Row(64, 16, "int32", "none", 0, Timing(5.0, 0.01, 0.02, 0), None))
    assert len(na) == len(report.row_line(Row(64, 16, "int32", "none", 0, Timing(5.0, 0.01, 0.02, 0), Timing(5.0, 0.01, 0.02, 0))))
    bad = report.row_line(Row(64, 16, "uint32", "sum", -1, unsupported="gloo has no uint32"))
    assert bad == "          64            16    uint32     sum      -1  not supported: gloo has no uint32"


@pytest.mark.parametrize(
    "value,width,text",
    [
        (0.0, 6, "  0.00"),
        (999.99, 6, "999.99"),
        (1000.0, 6, "1000.0"),
        (12345.0, 6, " 12345"),
        (123456.0, 6, "123456"),
        (1234567.0, 6, " 1e+06"),
        (9999.99, 7, "9999.99"),
        (12345.678, 7, "12345.7"),
        (123456.7, 7, " 123457"),
        (1234567.0, 7, "1234567"),
        (12345678.0, 7, "1.2e+07"),
        (0.004, 7, "   0.00"),
    ],
)
def test_number_fallback_like_getFloatStr(value, width, text):
    assert report.fmt_num(value, width) == text
    assert len(text) == width


def _run(rows, backend="flagcx") -> Run:
    return Run("allreduce", "all_reduce_perf", backend, f"{backend} test", 2, 20, rows)


def test_spread_statistics_and_noise_warning():
    quiet = Timing(10.0, 1.0, 1.0, 0, [10.0, 9.8, 10.1, 10.2, 9.9, 10.0, 10.3, 10.0, 9.9, 10.1])
    assert quiet.min_us == 9.8 and quiet.p90_us == 10.2 and quiet.spread == pytest.approx(0.04) and not quiet.noisy
    busy = Timing(10.0, 1.0, 1.0, 0, [10.0] * 8 + [3400.0, 3400.0])
    assert busy.p90_us == 3400.0 and busy.noisy
    assert report.noise_warning(Row(8, 2, "float", "sum", -1, quiet, quiet)) == []
    (line,) = report.noise_warning(Row(8, 2, "float", "sum", -1, quiet, busy))
    assert line.startswith("# warning: 8 B: in-place calls took 10 to 3.4e+03 us (min to p90)") and "out-of-place" not in line
    run = _run([Row(8, 2, "float", "sum", -1, quiet, busy), Row(16, 4, "float", "sum", -1, quiet, None)])
    assert report.footer(run)[2] == "# Noisy rows           : 1 of 2 rows (spread over 50%)"


def test_load_average_line():
    assert report.load_line((0.25, 0.5, 1.0), 2) == "# Load average 0.25 0.50 1.00 (1, 5, 15 min) on 2 cpus"
    assert report.load_line((3.1, 2.0, 1.0), 2).endswith("on 2 cpus  (busy: timings may be noisy)")
    assert report.load_line((0.0, 0.0, 0.0), 2, 4).endswith("on 2 cpus, 4 ranks on this host (oversubscribed: small sizes time the scheduler)")
    lines = report.preamble("all_reduce_perf", "# v", 8, 64, 8, 1, 1, 20, 1, 0, [], (0.25, 0.5, 1.0), 2)
    assert lines[-1] == report.load_line((0.25, 0.5, 1.0), 2)


def test_version_line_says_unused_for_libraries_the_run_does_not_use():
    from flagcx.bench.sysinfo import version_line, versions

    info = versions(["flagcx"], "cpu")
    assert info["nccl"] is None and info["mpi"] is None
    assert version_line(info).endswith("nccl=unused mpi=unused")
    assert version_line({**info, "mpi": "MPICH 4.3"}).endswith("nccl=unused mpi=MPICH 4.3")


def test_only_e_or_only_b_takes_the_other_default_along():
    o = parse(["all", "-e", "1M"])
    assert (o.min_bytes, o.max_bytes, o.sizes) == (1 << 20, 1 << 20, [1 << 20]) and "-b defaults to 32M" in o.notes[0]
    o = parse(["allreduce", "-b", "64M"])
    assert (o.min_bytes, o.max_bytes) == (64 << 20, 64 << 20) and "-e defaults to 32M" in o.notes[0]
    o = parse(["allreduce", "-e", "64M"])
    assert (o.min_bytes, o.max_bytes, o.notes) == (32 << 20, 64 << 20, [])
    assert parse(["allreduce"]).sizes == [32 << 20]


def test_memory_refusal_names_the_need_and_what_fits(monkeypatch):
    from flagcx.bench import memory

    cpu = torch.device("cpu")
    monkeypatch.setattr(memory, "host_available", lambda: 16 << 30)
    assert memory.problem(1 << 30, 4, cpu) is None  # 4 x (3 GiB + 256 MiB) = 13 GiB
    text = memory.problem(8 << 30, 4, cpu)
    assert text is not None and text.startswith("-e 8G with 4 rank(s) on this host needs about 97G of memory")
    assert "but 16G is available; lower -e to 1G or less, or run fewer ranks per host" in text
    assert memory.problem(8 << 30, 64, cpu).endswith("; run fewer ranks per host")


def test_memory_bandwidth_bound_and_its_table():
    from flagcx.bench.bound import MemoryBandwidth

    bw = MemoryBandwidth(copy_gbps=8.0, add_gbps=12.0, ranks=4, buffer_bytes=64 << 20, all_core_copy_gbps=16.0, threads=4)
    assert bw.allreduce_bound_us(64 << 20) == pytest.approx(4 * (64 << 20) / 8e3)  # 33.6 ms at 8 GB/s
    assert bw.all_core_bound_us(64 << 20) == pytest.approx(bw.allreduce_bound_us(64 << 20) / 2)
    assert bw.as_dict()["copy_gbps_per_rank"] == 8.0 and bw.as_dict()["threads_per_rank_all_core"] == 4
    assert report.membw_line(bw) == (
        "# Memory bandwidth per rank, 4 rank(s) at once on 64 MiB buffers: copy 8.00 GB/s, add 12.00 GB/s; "
        "copy with every core busy (4 threads per rank) 16.00 GB/s (bytes read + written)"
    )
    rows = [
        Row(1 << 19, 1 << 17, "float", "sum", -1, Timing(100.0, 1.0, 1.0, 0), Timing(100.0, 1.0, 1.0, 0)),
        Row(1 << 20, 1 << 18, "float", "sum", -1, Timing(1048.576, 1.0, 1.0, 0), None),
    ]
    lines = report.bound_table([_run(rows)], bw, 1 << 20)
    assert lines[1].startswith("# Time over the memory-bandwidth bound")
    assert lines[4].split() == ["1048576", "float", "sum", "524.3", "262.1", "flagcx", "2.00", "N/A", "4.00", "N/A"]
    assert len(lines) == 5  # the 512 KiB row is below the bound's minimum size


def test_footer_and_average_of_printed_busbw():
    rows = [
        Row(8, 2, "float", "sum", -1, Timing(10, 1.0, 1.0, 0), Timing(10, 2.0, 2.0, 0)),
        Row(16, 4, "float", "sum", -1, Timing(10, 3.0, 3.0, 0), None),
        Row(16, 4, "uint32", "sum", -1, unsupported="nope"),
    ]
    run = _run(rows)
    assert run.avg_busbw() == 2.0
    assert report.footer(run) == ["# Out of bounds values : 0 OK", "# Avg bus bandwidth    : 2 "]  # no noisy rows: no third line
    rows[1].out_of_place.wrong = 5
    assert report.footer(run)[0] == "# Out of bounds values : 1 FAILED"
    assert report.conclusion("all_reduce_perf") == ["#", "# Collective test concluded: all_reduce_perf"]


def test_preamble_and_device_lines():
    dev = report.device_line(3, 4242, "myhost", -1, "cpu", "Xeon (2 cpus)")
    assert dev == "#  Rank  3 Group  0 Pid   4242 on     myhost device -1 [cpu] Xeon (2 cpus)"
    lines = report.preamble("all_reduce_perf", "# flagcx-bench version x", 8, 65536, 8, 1 << 20, 1, 20, 1, 0, [dev])
    assert lines[1] == "# Collective test starting: all_reduce_perf"
    assert lines[2] == (
        "# nThread 1 nGpus 1 minBytes 8 maxBytes 65536 step: 8(factor) warmup iters: 1 iters: 20 agg iters: 1 validation: 1 graph: 0 unalign: 0"
    )
    assert lines[3:] == ["#", "# Using devices", dev]
    step = report.preamble("p", "#", 0, 10, 1, 1024, 1, 20, 0, 0, [])
    assert "step: 1024(bytes)" in step[2]
    assert export.device_dict(dev) == {
        "rank": 3,
        "group": 0,
        "pid": 4242,
        "hostname": "myhost",
        "device": -1,
        "device_hex": "cpu",
        "device_info": "Xeon (2 cpus)",
    }


def test_ratio_table():
    base = _run([Row(8, 2, "float", "sum", -1, Timing(10, 1.0, 2.0, 0), Timing(20, 1.0, 1.0, 0))])
    other = _run([Row(8, 2, "float", "sum", -1, Timing(30, 0.5, 1.0, 0), None)], backend="gloo")
    lines = report.ratio_table([base, other])
    assert lines[1].startswith("# Ratios vs flagcx")
    assert lines[-1].split() == ["8", "float", "sum", "-1", "gloo", "3", "0.5", "N/A", "N/A"]
    tiny = _run([Row(8, 2, "float", "sum", -1, Timing(0.04, 25.0, 50.0, 0), None)], backend="mpi")
    assert report.ratio_table([base, tiny])[-1].split()[5:7] == ["0.004", "25"]


# ----------------------------------------------------------------------------- JSON and CSV


def test_json_document_and_csv_rows(tmp_path):
    rows = [
        Row(8, 2, "float", "sum", -1, Timing(10, 1.0, 1.0, 0, [10, 11]), Timing(12, 2.0, 2.0, 0, [12, 13])),
        Row(16, 4, "float", "sum", -1, Timing(10, 3.0, 3.0, None), None),
        Row(8, 2, "uint32", "sum", -1, unsupported="no uint32"),
    ]
    runs = [_run(rows), _run(rows[:1], backend="gloo")]
    dev = report.device_line(0, 1, "h", -1, "cpu", "x")
    info = {"torch": "2.13", "flagcx": "0.1.0", "flagcx_commit": "abc1234", "nccl": None, "mpi": "MPICH Version: 5"}
    doc = export.json_document(runs, {"iterations": 20}, [dev], info, "h", ["allreduce"], "2026-01-02 03:04:05", "2026-01-02 03:04:06", (0.5, 0.25, 0.125))
    json.dumps(doc)
    assert doc["backends"] == ["flagcx", "gloo"] and doc["load_average"] == [0.5, 0.25, 0.125]
    assert (doc["backend"], doc["flagcx_commit"], doc["host"], doc["date"], doc["mpi_version"]) == ("flagcx", "abc1234", "h", "2026-01-02", "MPICH Version: 5")
    assert doc["devices"][0]["hostname"] == "h" and doc["config"] == {"iterations": 20}
    r0 = doc["results"][0]
    assert (r0["size"], r0["count"], r0["type"], r0["redop"], r0["root"], r0["actual_iterations"]) == (8, 2, "float", "sum", -1, 20)
    assert r0["out_of_place"] == {
        "time": 10,
        "alg_bw": 1.0,
        "bus_bw": 1.0,
        "nwrong": 0,
        "time_min": 10,
        "time_p90": 11,
        "spread": pytest.approx(0.1),
        "times_us": [10, 11],
    }
    assert doc["results"][1]["in_place"] is None and doc["results"][1]["out_of_place"]["nwrong"] is None
    assert doc["results"][2]["unsupported"] == "no uint32"
    assert [(r["backend"], r["collective"], r["size"]) for r in doc["results"]] == [
        ("flagcx", "allreduce", 8),
        ("flagcx", "allreduce", 16),
        ("flagcx", "allreduce", 8),
        ("gloo", "allreduce", 8),
    ]
    assert doc["out_of_bounds"] == {"count": 0, "okay": True}
    assert doc["average_bus_bandwidth"]["bandwidth"] == pytest.approx(1.8)  # every printed busbw of both backends
    assert [r["backend"] for r in doc["runs"]] == ["flagcx", "gloo"]
    path = tmp_path / "r.csv"
    export.write_csv(str(path), runs)
    got = list(csv.DictReader(path.open()))
    assert [(g["backend"], g["size"], g["mode"], g["status"]) for g in got] == [
        ("flagcx", "8", "out-of-place", "ok"),
        ("flagcx", "8", "in-place", "ok"),
        ("flagcx", "16", "out-of-place", "ok"),
        ("flagcx", "16", "in-place", "n/a"),
        ("flagcx", "8", "", "not supported: no uint32"),
        ("gloo", "8", "out-of-place", "ok"),
        ("gloo", "8", "in-place", "ok"),
    ]
    assert float(got[1]["time_us"]) == 12 and float(got[1]["busbw_gbps"]) == 2.0 and got[1]["wrong"] == "0"
    assert (float(got[1]["time_min_us"]), float(got[1]["time_p90_us"])) == (12, 13)
    assert got[2]["wrong"] == ""


def test_plot_has_latency_and_bandwidth_panels_with_byte_ticks():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    assert [export.byte_label(x) for x in (8, 512, 1024, 65536, 1 << 20, 3 << 29)] == ["8 B", "512 B", "1 KiB", "64 KiB", "1 MiB", "1.5 GiB"]
    rows = [Row(s, s // 4, "float", "sum", -1, Timing(1.0 + s / 1e3, s / 1e3, s / 1e3, 0), Timing(0.5 + s / 1e3, 1.0, 1.0, 0)) for s in (8, 1024, 1 << 20)]
    runs = [_run(rows), _run(rows[:2], backend="gloo"), Run("allgather", "all_gather_perf", "flagcx", "x", 2, 20, rows)]
    fig = export.plot_figure(runs, "the title", "2026-12-06 on host, backends: flagcx, gloo")
    try:
        axes = fig.axes
        assert [a.get_title() for a in axes] == ["allreduce: latency", "allreduce: bus bandwidth", "allgather: latency", "allgather: bus bandwidth"]
        lat, bw = axes[0], axes[1]
        assert (lat.get_xscale(), lat.get_yscale(), bw.get_xscale(), bw.get_yscale()) == ("log", "log", "log", "linear")
        fig.canvas.draw()
        assert [t.get_text() for t in lat.get_xticklabels()] == ["8 B", "64 B", "512 B", "4 KiB", "32 KiB", "256 KiB"]
        styles = {(line.get_label(), line.get_linestyle()) for line in lat.lines}
        assert styles == {("flagcx", "-"), ("flagcx in-place", "--"), ("gloo", "-"), ("gloo in-place", "--")}
        assert [line.get_ydata()[0] for line in lat.lines if line.get_label() == "flagcx"] == [1.008]  # time, not bandwidth
        assert fig._suptitle.get_text() == "the title" and any("backends: flagcx, gloo" in t.get_text() for t in fig.texts)
    finally:
        plt.close(fig)


def test_vllm_peer_outside_the_vllm_venv_says_where_to_run_it():
    """--compare ...,vllm where vLLM is not installed: a NotSupported naming the venv, before any rank touches the store."""
    import importlib.util

    from flagcx.bench.backends import make_backend
    from flagcx.errors import NotSupported

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here; bash .ci/vllm runs the backend itself")
    assert parse(["allreduce", "--compare", "flagcx,vllm"]).backends == ["flagcx", "vllm"]
    with pytest.raises(NotSupported, match=r"vLLM venv \(bash \.ci/vllm"):
        make_backend("vllm", None, 0, 1, torch.device("cpu"), 1.0)  # type: ignore[arg-type]
