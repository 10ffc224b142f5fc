"""The shm transport (FLAGCX_CPU_ADAPTER=shm): correctness matrix, shm-specific checks, failures, kernels.

Ranks are real processes on this host. The matrix and the shm checks share one set of
ranks per size (tests/ranks/shm_suite.py); the failure scenarios (tests/ranks/shm_failures.py) run
as plain processes so that ranks can be SIGKILLed without the launcher stopping the
others. After every test no segment of ours may be left in /dev/shm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from flagcx.adapters.shm import SEGMENT_PREFIX, ShmAdapter

from .helpers.harness import assert_passed, run_suite
from .helpers.reference import FLOATS, INTS, make

pytestmark = pytest.mark.skipif(
    ShmAdapter.unavailable_reason(torch.device("cpu")) is not None,
    reason=str(ShmAdapter.unavailable_reason(torch.device("cpu"))),
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leftover_segments(names: list[str] = ()) -> list[str]:
    """Our segments still in /dev/shm: the given names, or any with our prefix that persists for a second."""
    named = [n for n in names if os.path.exists("/dev/shm" + n)]
    seen = {e for e in os.listdir("/dev/shm") if e.startswith(SEGMENT_PREFIX)}
    if seen:  # another test's communicator may be attaching right now: only a persistent entry is a leak
        time.sleep(1.0)
        seen &= {e for e in os.listdir("/dev/shm") if e.startswith(SEGMENT_PREFIX)}
    return named + sorted(seen)


@pytest.mark.parametrize("nproc", [2, 4])
def test_shm_matrix_and_checks(nproc):
    assert_passed(run_suite("tests.ranks.shm_suite:matrix_and_shm", nproc, env={"FLAGCX_CPU_ADAPTER": "shm"}), min_checks=100)
    assert _leftover_segments() == []


def test_shm_failures(tmp_path):
    """Stuck rank -> FlagcxTimeout; SIGKILLed rank (inside / before a collective) -> RemoteError; no leaks."""
    store = dist.TCPStore("127.0.0.1", 0, 4, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=120))
    env = {k: v for k, v in os.environ.items() if k != "FLAGCX_TIMEOUT"}
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(store.port),
        WORLD_SIZE="4",
        LOCAL_WORLD_SIZE="4",
        TORCHELASTIC_USE_AGENT_STORE="True",
        FLAGCX_CPU_ADAPTER="shm",
        SHM_TEST_DIR=str(tmp_path),
        OMP_NUM_THREADS="1",
    )
    procs = []
    try:
        for r in range(4):
            log = open(tmp_path / f"log{r}.txt", "w")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.ranks.shm_failures"],
                    env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.1)  # reaps victims promptly, like a launcher would
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        del store
    logs = {r: (tmp_path / f"log{r}.txt").read_text()[-3000:] for r in range(4)}
    codes = [p.returncode for p in procs]
    assert codes == [0, 0, -9, -9], f"exit codes {codes}; logs: {logs}"
    reports = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)}
    killed3 = json.loads((tmp_path / "victim3.json").read_text())["killed_at"]
    killed2 = json.loads((tmp_path / "victim2.json").read_text())["killed_at"]
    for r, rep in reports.items():
        stuck = rep["stuck"]
        assert stuck["error"] == "FlagcxTimeout" and "rank 3" in stuck["text"], (r, stuck)
        assert 2.5 < stuck["elapsed"] < 10, (r, stuck)
        assert "unusable" in rep["stuck_after"]["text"], (r, rep["stuck_after"])
        kill = rep["kill"]
        assert kill["error"] == "RemoteError" and "rank 3" in kill["text"] and "died" in kill["text"], (r, kill)
        assert kill["at"] - killed3 < 5, (r, kill, killed3)
        assert rep["kill_after"]["error"] and "unusable" in rep["kill_after"]["text"], (r, rep["kill_after"])
        assert rep["kill_destroy"]["error"] is None, (r, rep["kill_destroy"])
    for r in (0, 1):
        before = reports[r]["before"]
        assert before["error"] == "RemoteError" and "rank 2" in before["text"] and "died" in before["text"], (r, before)
        assert before["at"] - killed2 < 5, (r, before, killed2)
        assert reports[r]["before_destroy"]["error"] is None
    names = sorted({n for rep in reports.values() for n in rep["segments"]})
    assert len(names) == 3
    assert _leftover_segments(names) == []


def test_unavailable_reason_without_module(monkeypatch):
    from flagcx.adapters import shm

    monkeypatch.setattr(shm, "_shm", None)
    monkeypatch.setattr(shm, "_IMPORT_ERROR", ImportError("No module named 'flagcx._shm'"))
    reason = ShmAdapter.unavailable_reason(torch.device("cpu"))
    assert reason.startswith("flagcx._shm was not built: No module named") and "C compiler" in reason
    assert "CPU tensors only" in ShmAdapter.unavailable_reason(torch.device("meta"))


_DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3, torch.int8: 4, torch.uint8: 5, torch.int32: 6, torch.int64: 7}
_OP = {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}


def _sequential(inputs: list[torch.Tensor], op: str) -> torch.Tensor:
    """The kernels' exact arithmetic: inputs combined in order, in float32 for half types."""
    dtype = inputs[0].dtype
    if dtype.is_floating_point:
        acc_t = torch.float32 if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float64
        acc = inputs[0].to(acc_t)
        for x in inputs[1:]:
            x = x.to(acc_t)
            if op in ("sum", "avg"):
                acc = acc + x
            elif op == "prod":
                acc = acc * x
            elif op == "max":
                acc = torch.where((acc > x) | acc.isnan(), acc, x)
            else:
                acc = torch.where((acc < x) | acc.isnan(), acc, x)
        if op == "avg":
            acc = acc / len(inputs)
        return acc.to(dtype)
    stack = torch.stack([x.to(torch.int64) for x in inputs])
    if op == "sum":
        r = stack.sum(0)
    elif op == "prod":
        r = stack.prod(0)
    else:
        r = stack.max(0).values if op == "max" else stack.min(0).values
    bits = torch.iinfo(dtype).bits
    r = r & ((1 << bits) - 1) if bits < 64 else r  # wrap like two's complement
    if bits < 64 and torch.iinfo(dtype).min < 0:
        r = torch.where(r >= (1 << (bits - 1)), r - (1 << bits), r)
    return r.to(dtype)


@pytest.mark.parametrize("dtype", FLOATS + INTS, ids=str)
def test_reduce_kernels(dtype):
    """The C kernels alone: bit-exact against the same arithmetic in torch, NaN and wrap-around included."""
    from flagcx import _shm

    ffi, lib = _shm.ffi, _shm.lib
    for op in _OP:
        if op == "avg" and not dtype.is_floating_point:
            continue
        for nsrc in (1, 2, 3, 5):
            count = 1037 + nsrc  # several 512-element tiles plus a tail
            inputs = [make(f"kern/{op}", p, count, dtype, op) for p in range(nsrc)]
            if dtype.is_floating_point and op in ("max", "min"):
                inputs[-1][7] = float("nan")
            dst = torch.empty(count, dtype=dtype)
            srcs = ffi.new("uintptr_t[]", [x.data_ptr() for x in inputs])
            assert lib.fxs_reduce_local(dst.data_ptr(), srcs, nsrc, count, _DT[dtype], _OP[op], nsrc) == 0
            expected = _sequential(inputs, op)
            same = dst == expected
            if dtype.is_floating_point:  # NaN payloads differ between torch's own conversions
                same |= dst.isnan() & expected.isnan()
            assert bool(same.all()), f"{dtype} {op} nsrc={nsrc}: {int((~same).sum())} elements differ"
            if op in ("max", "min") and dtype.is_floating_point:
                assert dst[7].isnan()
    dst = torch.empty(5, dtype=dtype)
    srcs = ffi.new("uintptr_t[]", [dst.data_ptr()])
    assert lib.fxs_reduce_local(dst.data_ptr(), srcs, 1, 5, _DT[dtype], 99, 1) != 0  # unknown op
