"""The MPI adapter under a real mpiexec: the correctness matrix (2 and 4 ranks), adapter-level
layouts and half-precision staging, and timeouts (a rank that skips an op) at 3 ranks.

Every rank is a process started by ``mpiexec`` (the PyPI mpich wheel's, beside
``sys.executable``, else the one on PATH) running ``tests.ranks.mpi_runner``; rank 0 writes
every rank's outcomes as JSON and ``tests.helpers.harness.assert_passed`` reports them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import pytest
import torch

from flagcx import CommAborted, Communicator, FlagcxError, FlagcxTimeout, InvalidArgument, ReduceOp

from .helpers.harness import TEST_TIMEOUT, assert_passed
from .helpers.matrix import Check, subgroup_ranks
from .helpers.reference import assert_equal, make

ROOT = Path(__file__).resolve().parents[1]
SHORT_TIMEOUT = 3.0
"""FLAGCX_TIMEOUT of the timeout run: the seconds a rank waits for one that skipped an op."""
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "FLAGCX_LAUNCHER")


def _mpiexec() -> Optional[str]:
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else shutil.which("mpiexec")


def _skip_reason() -> Optional[str]:
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install flagcx[mpi])"
    if _mpiexec() is None:
        return f"no mpiexec beside {sys.executable} or on PATH (pip install mpich)"
    return None


pytestmark = [pytest.mark.mpi, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


def run_mpi(target: str, nproc: int, out: Path, timeout_s: str = TEST_TIMEOUT, limit: float = 600) -> list[dict]:
    """Run suite ``target`` in ``nproc`` mpiexec ranks; per-rank outcomes (the job is killed after ``limit`` s)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update({"FLAGCX_CPU_ADAPTER": "mpi", "FLAGCX_TIMEOUT": timeout_s, "OMP_NUM_THREADS": "1"})
    cmd = [_mpiexec(), "-n", str(nproc), sys.executable, "-m", "tests.ranks.mpi_runner", target, str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.terminate()  # hydra's mpiexec forwards SIGTERM to the ranks and cleans them up
        output, _ = proc.communicate(timeout=30)
        raise AssertionError(f"mpiexec -n {nproc} {target} still ran after {limit:g} s; output tail:\n{output[-4000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and out.exists(), f"mpiexec -n {nproc} {target} exited with {proc.returncode}; output tail:\n{output[-4000:]}"
    outcomes = json.loads(out.read_text())
    assert len(outcomes) == nproc
    return outcomes


@pytest.mark.parametrize("nproc", [2, 4])
def test_mpi_matrix(nproc, tmp_path):
    assert_passed(run_mpi("tests.helpers.matrix:comm_matrix", nproc, tmp_path / "out.json"), min_checks=100)


def test_mpi_adapter_and_timeouts(tmp_path):
    outcomes = run_mpi("tests.test_mpi:adapter_suite", 3, tmp_path / "out.json", timeout_s=str(SHORT_TIMEOUT), limit=300)
    assert_passed(outcomes, min_checks=8)


def test_mpi_root_only_errors_give_no_wrong_data(tmp_path):
    outcomes = run_mpi("tests.test_mpi:root_only_suite", 3, tmp_path / "out.json", timeout_s=str(SHORT_TIMEOUT), limit=300)
    assert_passed(outcomes, min_checks=2)


# ---------------------------------------------------------------------- suite run inside the ranks
def root_only_suite(rank: int, size: int) -> Iterable[Check]:
    """Suite: the root fails a gather or scatter before the transport while its peers are inside it (issue 26, item 1).

    No rank may return wrong data afterwards: the following all_reduce of 1, 10, 100 gives 111
    or an error, and the root's next gather cannot return its peers' stale messages.
    """
    from mpi4py import MPI

    MPI.COMM_WORLD.Barrier()
    yield "gather the root skipped (torch raised on its list)", _skipped_gather
    yield "scatter refused on the root (wrong input size)", _refused_scatter


def _sum_or_error(comm: Communicator) -> Optional[str]:
    """all_reduce of 10**rank: None when it gave the exact sum, the error's class when it raised; wrong data fails."""
    y = torch.full((4,), float(10**comm.rank))
    try:
        comm.all_reduce(y)
    except FlagcxError as exc:
        return type(exc).__name__
    want = float(sum(10**r for r in range(comm.size)))
    assert torch.equal(y, torch.full((4,), want)), f"all_reduce returned {y.tolist()} instead of {want} or an error"
    return None


def _skipped_gather() -> None:
    from mpi4py import MPI

    comm = Communicator.from_env(name="skipped-gather")
    x = torch.full((3,), float(comm.rank + 1))
    if comm.rank != 0:
        comm.gather(x, None, root=0)  # the root never calls it: torch raised on its missing gather_list
    _sum_or_error(comm)
    out = torch.full((3 * comm.size,), -1.0)
    try:
        comm.gather(x + 10, out if comm.rank == 0 else None, root=0)
    except FlagcxTimeout:
        assert comm.rank == 0, "only the root waits in a gather"
    else:
        assert comm.rank != 0, f"the root's gather returned {out.tolist()} (its peers' stale messages) instead of timing out"
    MPI.COMM_WORLD.Barrier()
    comm.abort()


def _refused_scatter() -> None:
    from mpi4py import MPI

    comm = Communicator.from_env(name="refused-scatter")
    out = torch.full((4,), -1.0)
    try:
        comm.scatter(out, torch.ones(4 * comm.size + 1) if comm.rank == 0 else None, root=0)
    except InvalidArgument:
        assert comm.rank == 0, "only the root's input is wrong"
    except FlagcxTimeout:
        assert comm.rank != 0, "the root raised before the transport"
    else:
        raise AssertionError(f"rank {comm.rank}: scatter returned {out.tolist()} though the root refused it")
    assert _sum_or_error(comm) is not None, "after a refused scatter, the all_reduce must fail (the ranks are out of step)"
    MPI.COMM_WORLD.Barrier()
    comm.abort()


def adapter_suite(rank: int, size: int) -> Iterable[Check]:
    """Suite: adapter-level layouts and staging on the world and a reordered subgroup, then timeouts."""
    from mpi4py import MPI

    MPI.COMM_WORLD.Barrier()  # every rank has imported torch: init fits in the short timeout
    comm = Communicator.from_env(name="mpitest")
    sub = comm.split(subgroup_ranks(size), name="mpitest.sub")
    yield "adapter is mpi", lambda: _check_adapter(comm, sub, size)
    for label, g in (("world", comm), ("sub", sub)):
        yield f"{label}/in-place layouts", lambda g=g, label=label: _in_place_layouts(g, label)
        yield f"{label}/half staging rounds once", lambda g=g: _half_staging(g)
        yield f"{label}/recv truncation error", lambda g=g: _truncation(g)
    yield "recv timeout is cancelled, communicator usable", lambda: _recv_timeout(comm)
    yield "skipped collective times out on the others", lambda: _collective_timeout(comm)
    yield "destroy", lambda: (sub.destroy() if sub else None, comm.destroy())


def _check_adapter(comm: Communicator, sub: Optional[Communicator], size: int) -> None:
    assert comm.adapter_name() == "mpi"
    assert comm._adapter(torch.device("cpu"), "test").world_ranks == list(range(size))
    if sub is not None:
        assert sub._adapter(torch.device("cpu"), "test").world_ranks == subgroup_ranks(size)


def _in_place_layouts(g: Optional[Communicator], label: str) -> None:
    """The NCCL in-place layouts of the contract, called on the adapter directly."""
    if g is None:
        return
    ad = g._adapter(torch.device("cpu"), "test")
    r, size, n = g.rank, g.size, 13
    inputs = [make(f"{label}/ipl", q, n * size, torch.int32) for q in range(size)]
    # allgather: the input is this rank's block of the output
    buf = torch.zeros(n * size, dtype=torch.int32)
    buf[r * n : (r + 1) * n] = inputs[r][:n]
    ad.allgather(buf.view(torch.uint8)[r * n * 4 : (r + 1) * n * 4], buf.view(torch.uint8)).wait()
    assert_equal(buf, torch.cat([inputs[q][:n] for q in range(size)]), "allgather in place")
    # reducescatter: the output is this rank's block of the input
    buf = inputs[r].clone()
    ad.reducescatter(buf, buf[r * n : (r + 1) * n], ReduceOp.SUM).wait()
    total = torch.stack([x.to(torch.int64) for x in inputs]).sum(0).to(torch.int32)
    assert_equal(buf[r * n : (r + 1) * n], total[r * n : (r + 1) * n], "reducescatter in place")
    # allreduce and reduce in place, reduce out of place leaves the input alone
    buf = inputs[r].clone()
    ad.allreduce(buf, buf, ReduceOp.MAX).wait()
    assert_equal(buf, torch.stack(inputs).max(0).values, "allreduce in place")
    root = size - 1
    buf, out = inputs[r].clone(), torch.zeros(n * size, dtype=torch.int32)
    ad.reduce(buf, out if r == root else buf, ReduceOp.MIN, root).wait()
    assert_equal(buf, inputs[r], "reduce: input untouched")
    if r == root:
        assert_equal(out, torch.stack(inputs).min(0).values, "reduce out of place")
    # gather / scatter in place on the root (its block already sits in the big buffer)
    for root in range(size):
        big = torch.zeros(n * size, dtype=torch.int32)
        mine = inputs[r][:n].clone()
        if r == root:
            big[root * n : (root + 1) * n] = mine
            mine = big[root * n : (root + 1) * n]
        ad.gather(mine.view(torch.uint8), big.view(torch.uint8) if r == root else None, root).wait()
        if r == root:
            assert_equal(big, torch.cat([inputs[q][:n] for q in range(size)]), f"gather in place root={root}")
        src = inputs[root].clone()
        recv = src[root * n : (root + 1) * n] if r == root else torch.zeros(n, dtype=torch.int32)
        ad.scatter(src.view(torch.uint8) if r == root else None, recv.view(torch.uint8), root).wait()
        assert_equal(recv, inputs[root][r * n : (r + 1) * n], f"scatter in place root={root}")


def _half_staging(g: Optional[Communicator]) -> None:
    """float16/bfloat16 accumulate in float32 and round once: big + 1 + 1 ... keeps every 1.

    ``big`` has an ulp of 2 in the dtype, so rounding after each addition would drop the
    ones; the exact sum big + size - 1 is representable in float32 (the reference).
    """
    if g is None:
        return
    for dtype, big in ((torch.float16, 2048.0), (torch.bfloat16, 256.0)):
        n = 7
        x = torch.full((n * g.size,), big if g.rank == 0 else 1.0, dtype=dtype)
        expected = torch.full((n * g.size,), big + g.size - 1, dtype=torch.float32).to(dtype)
        y = x.clone()
        g.all_reduce(y)
        assert_equal(y, expected, f"{dtype} all_reduce")
        out = torch.empty(n, dtype=dtype)
        g.reduce_scatter(out, x.clone())
        assert_equal(out, expected[:n], f"{dtype} reduce_scatter")
        y = x.clone()
        g.reduce(y, 0)
        assert_equal(y, expected if g.rank == 0 else x, f"{dtype} reduce")


def _truncation(g: Optional[Communicator]) -> None:
    """A message larger than the receive buffer is a clear FlagcxError; the communicator still works."""
    if g is None:
        return
    if g.rank == 0:
        g.send(torch.arange(8, dtype=torch.int32), 1)
    elif g.rank == 1:
        try:
            g.recv(torch.empty(4, dtype=torch.int32), 0)
        except FlagcxError as exc:
            assert "larger than the receive buffer" in str(exc) and "recv" in str(exc), str(exc)
        else:
            raise AssertionError("a truncated recv did not raise")
    y = torch.ones(3)
    g.all_reduce(y)
    assert_equal(y, torch.full((3,), float(g.size)), "all_reduce after a truncated recv")


def _recv_timeout(comm: Communicator) -> None:
    """A recv nobody sends to times out and is cancelled; the communicator stays usable."""
    if comm.rank == 0:
        start = time.monotonic()
        try:
            comm.recv(torch.empty(5), 1)
        except FlagcxTimeout as exc:
            elapsed = time.monotonic() - start
            assert "recv from rank 1" in str(exc) and "mpitest" in str(exc) and "cancelled" in str(exc), str(exc)
        else:
            raise AssertionError("a recv nobody sends to did not time out")
        assert SHORT_TIMEOUT * 0.99 <= elapsed < SHORT_TIMEOUT + 5, f"timed out after {elapsed:.2f} s, timeout {SHORT_TIMEOUT} s"
        handle = comm._adapter(torch.device("cpu"), "test").recv(torch.empty(5).view(torch.uint8), None)
        for _ in range(2):  # an explicit short timeout; the error stays with the handle
            try:
                handle.wait(0.2)
            except FlagcxTimeout as exc:
                assert "recv from any source" in str(exc), str(exc)
            else:
                raise AssertionError("an any-source recv nobody sends to did not time out")
        assert handle.done()
    y = torch.ones(4)
    work = comm.all_reduce(y, async_op=True)
    work.wait(timeout=SHORT_TIMEOUT * 5)  # the others wait here while rank 0 waits for its recv
    assert_equal(y, torch.full((4,), float(comm.size)), "all_reduce after a cancelled recv")


def _collective_timeout(comm: Communicator) -> None:
    """The last rank skips an all_reduce: the others raise FlagcxTimeout within the timeout.

    Then the last rank joins late (told by MPI messages outside flagcx), completing the
    others' abandoned all_reduce (whose buffers the adapter kept alive) while they drive
    MPI progress in a world barrier; their communicator refuses further ops with CommAborted.
    """
    from mpi4py import MPI

    late = comm.size - 1
    x = torch.full((1031,), float(comm.rank + 1))
    if comm.rank != late:
        start = time.monotonic()
        try:
            comm.all_reduce(x)
        except FlagcxTimeout as exc:
            elapsed = time.monotonic() - start
            text = str(exc)
            assert "allreduce on communicator mpitest" in text and f"rank {comm.rank}" in text and "unusable" in text, text
        else:
            raise AssertionError("an all_reduce that a rank skipped did not time out")
        assert SHORT_TIMEOUT * 0.99 <= elapsed < SHORT_TIMEOUT + 5, f"timed out after {elapsed:.2f} s, timeout {SHORT_TIMEOUT} s"
        MPI.COMM_WORLD.send("timed out", dest=late, tag=99)
        try:
            comm.all_reduce(torch.ones(2))
        except CommAborted as exc:
            assert "timed out" in str(exc) and "create a new one" in str(exc), str(exc)
        else:
            raise AssertionError("a communicator whose all_reduce timed out accepted another op")
    else:
        for r in range(comm.size - 1):
            assert MPI.COMM_WORLD.recv(source=r, tag=99) == "timed out"
        comm.all_reduce(x)
        assert_equal(x, torch.full((1031,), float(comm.size * (comm.size + 1) // 2)), "late all_reduce")
    MPI.COMM_WORLD.Barrier()  # the others make MPI progress (for the late all_reduce) until it is done
