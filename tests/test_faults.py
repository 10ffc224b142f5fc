"""Fault injection: dead, stuck, absent and mis-sized peers and a dead store never hang, crash or leak.

Real ranks in real processes (tests/ranks/fault_rank.py, forked by tests/ranks/fault_launch.py so
that a SIGKILLed rank does not stop the others): for Gloo, shm and a heterogeneous
communicator (shm + Gloo clusters), ranks are killed during, before and after a
collective; the survivors must raise a FlagcxError naming the dead rank within
timeout + 10 s, refuse further calls, abort cleanly (no fd, OS thread or Python thread
left) and build a working communicator in the same processes. A stuck rank times out
naming it; a rank that never arrives at init, or was started with the wrong world size,
fails init on every rank; a communicator whose store died keeps working and a new one
fails clearly. The MPI adapter runs the stuck / absent / size scenarios under mpiexec,
then a SIGKILL, which the launcher answers by ending the whole job.

The watchdog of stream-ordered adapters is unit-tested here with a fake clock; its NCCL
integration runs on 2 GPUs (marked gpu).
"""

from __future__ import annotations

import contextlib
import gc
import glob
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.distributed as dist

from flagcx import Communicator, FlagcxError, FlagcxTimeout, RemoteError
from flagcx.adapters.shm import ShmAdapter
from flagcx.watchdog import Watchdog

from .helpers.harness import assert_passed, run_suite
from .ranks.fault_launch import ROOT, run_zygote

TIMEOUT = 2.0
"""FLAGCX timeout of the fault runs: how long survivors wait for a stuck or absent rank."""
SLACK = 10.0
"""Seconds beyond the timeout within which every survivor must have raised."""

SHM_OK = ShmAdapter.unavailable_reason(torch.device("cpu")) is None
MODES = {
    "gloo": lambda r: {"FLAGCX_CPU_ADAPTER": "gloo"},
    "shm": lambda r: {"FLAGCX_CPU_ADAPTER": "shm"},
    "hetero": lambda r: {"FLAGCX_CLUSTER_ID": "cl-A" if r in (0, 1) else "cl-B", "FLAGCX_CPU_ADAPTER": "shm" if r in (0, 1) else "gloo"},
}


def _load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def _names(text: str, victim: int, group_rank: int) -> bool:
    """Whether an error text names ``victim`` (its global rank, or its group rank where the two coincide)."""
    return f"global {victim})" in text or f"global rank {victim})" in text or (victim == group_rank and f"rank {victim} " in text)


def _check_killed(mode: str, out: Path, reports: dict[int, dict], phase: str, victim: int) -> None:
    killed = _load(out, f"victim{victim}.json")["killed_at"]
    for r, rep in reports.items():
        p = rep[phase]
        err = p["error"]
        assert err["error"] in ("RemoteError", "FlagcxTimeout", "FlagcxError"), (mode, phase, r, err)
        assert err["at"] - killed < TIMEOUT + SLACK, (mode, phase, r, err, killed)
        assert _names(err["text"], victim, 3), (mode, phase, r, err["text"])  # hetero too: the dead rank, not a peer that aborted
        assert p["again"]["error"] in ("CommAborted", "RemoteError", "FlagcxTimeout"), (mode, phase, r, p["again"])
        assert p["again"]["elapsed"] < 1.0, (mode, phase, r, p["again"])
        assert p["abort"]["error"] is None and p["abort"]["elapsed"] < 2.0, (mode, phase, r, p["abort"])
        assert p["resources"] == rep["baseline"], (mode, phase, r, p["resources"], rep["baseline"])
        assert p["recover"]["error"] is None, (mode, phase, r, p["recover"])
        if phase == "after":
            assert p["last_correct"], (mode, phase, r, p["last"])


@pytest.mark.parametrize(
    "mode",
    [
        "gloo",
        pytest.param("shm", marks=pytest.mark.skipif(not SHM_OK, reason="shm not built")),
        pytest.param("hetero", marks=pytest.mark.skipif(not SHM_OK, reason="shm not built")),
    ],
)
def test_faults(mode, tmp_path):
    exits, logs = run_zygote("tests.ranks.fault_rank", 7, tmp_path, env=MODES[mode], base_env={"FAULT_MODE": mode, "FAULT_TIMEOUT": str(TIMEOUT)}, limit=150)
    assert exits == {0: 0, 1: 0, 2: 0, 3: -9, 4: -9, 5: -9, 6: -9}, f"exit codes {exits}; logs: {logs}"
    reports = {r: _load(tmp_path, f"rank{r}.json") for r in range(3)}
    for phase, victim in (("during", 3), ("before", 4), ("after", 5)):
        _check_killed(mode, tmp_path, reports, phase, victim)
    _check_stuck(mode, reports, late=2, survivors=(0, 1))
    _check_init(mode, reports, odd=2)
    killed = _load(tmp_path, "victim6.json")["killed_at"]
    for r, rep in reports.items():
        gone = rep["storegone"]
        assert gone["old_comm"]["error"] is None, (mode, r, gone)  # collectives do not need the store
        new = gone["new_comm"]
        assert new["error"] == "FlagcxError" and "store" in new["text"], (mode, r, new)
        assert new["at"] - killed < TIMEOUT + SLACK, (mode, r, new, killed)
        assert gone["destroy"]["error"] is None, (mode, r, gone)
        assert gone["resources"] == rep["baseline"], (mode, r, gone["resources"], rep["baseline"])
    names = sorted({n for rep in reports.values() for n in rep["segments"]})
    assert mode == "gloo" or names, "no shm segment was recorded"
    assert [n for n in names if os.path.exists("/dev/shm" + n)] == []


def _check_stuck(mode: str, reports: dict[int, dict], late: int, survivors) -> None:
    for r in survivors:
        p = reports[r]["stuck"]
        err = p["error"]
        assert err["error"] == "FlagcxTimeout", (mode, r, err)
        assert TIMEOUT * 0.95 <= err["elapsed"] < TIMEOUT + SLACK, (mode, r, err)
        assert f"rank {late} " in err["text"] and "alive" in err["text"], (mode, r, err["text"])
        assert p["again"]["error"] in ("CommAborted", "FlagcxTimeout", "RemoteError"), (mode, r, p["again"])
    for r, rep in reports.items():
        p = rep["stuck"]
        assert p["abort"]["error"] is None and p["resources"] == rep["baseline"], (mode, r, p)
        assert p["recover"]["error"] is None, (mode, r, p["recover"])


def _check_init(mode: str, reports: dict[int, dict], odd: int) -> None:
    for r, rep in reports.items():
        absent = rep["absent"]
        if r == odd:
            assert absent["error"] == "InvalidArgument" and "RANK / WORLD_SIZE" in absent["text"], (mode, r, absent)
        else:
            assert absent["error"] == "FlagcxTimeout" and f"[{odd}]" in absent["text"], (mode, r, absent)
            assert TIMEOUT * 0.95 <= absent["elapsed"] < TIMEOUT + SLACK, (mode, r, absent)
        size = rep["size"]
        assert size["error"] == "InvalidArgument" and "different world / group sizes" in size["text"], (mode, r, size)
        assert size["elapsed"] < TIMEOUT, (mode, r, size)  # fails at once, not by timeout


# ---------------------------------------------------------------------- the torch frontend's timeouts
@pytest.mark.skipif(not SHM_OK, reason="shm not built")
def test_torch_frontend_timeouts():
    """timeout= of init_process_group / new_group bounds every wait (FLAGCX_TIMEOUT unset); a new group works after."""
    assert_passed(run_suite("tests.test_faults:torch_timeout_suite", 4, env={"FLAGCX_TIMEOUT": ""}), min_checks=3)


def torch_timeout_suite(rank: int, size: int):
    """Suite: rank 3 skips an all_reduce on the world group (timeout 2 s), rank 0 one on a subgroup (timeout 3 s)."""
    from flagcx.bootstrap import store_from_env

    sync = store_from_env(60)

    def barrier(name: str) -> None:  # outside the groups under test
        sync.set(f"{name}/{rank}", b"1")
        sync.wait([f"{name}/{r}" for r in range(size)], timedelta(seconds=60))

    def world() -> None:
        dist.init_process_group("flagcx", rank=rank, world_size=size, store=dist.PrefixStore("pg1/", sync), timeout=timedelta(seconds=2))
        try:
            if rank == size - 1:
                time.sleep(2 + 1)  # the others time out and name this rank meanwhile
            else:
                _timed_out(lambda: dist.all_reduce(torch.ones(1031)), 2, f"rank {size - 1} ")
        finally:
            dist.destroy_process_group()
            barrier("world-done")

    def subgroup() -> None:
        dist.init_process_group("flagcx", rank=rank, world_size=size, store=dist.PrefixStore("pg2/", sync), timeout=timedelta(seconds=30))
        try:
            sub = dist.new_group([0, 1, 2], timeout=timedelta(seconds=3))
            if rank == 2:
                time.sleep(3 + 1)
            elif rank < 2:
                _timed_out(lambda: dist.all_reduce(torch.ones(13), group=sub, async_op=True).wait(), 3, "rank 2 ")
        finally:
            dist.destroy_process_group()
            barrier("sub-done")

    def fresh() -> None:
        dist.init_process_group("flagcx", rank=rank, world_size=size, store=dist.PrefixStore("pg3/", sync), timeout=timedelta(seconds=30))
        x = torch.full((1031,), float(rank + 1))
        dist.all_reduce(x)
        assert torch.equal(x, torch.full((1031,), float(size * (size + 1) // 2)))
        dist.destroy_process_group()

    yield "world group timeout", world
    yield "subgroup timeout", subgroup
    yield "new process group after the errors", fresh


def _timed_out(call, timeout: float, names: str) -> None:
    start = time.monotonic()
    try:
        call()
    except FlagcxError as exc:
        elapsed = time.monotonic() - start
        assert names in str(exc), str(exc)
        assert timeout * 0.95 <= elapsed < timeout + SLACK, f"raised after {elapsed:.2f} s with timeout {timeout} s"
        return
    raise AssertionError("an all_reduce a rank skipped did not raise")


# ---------------------------------------------------------------------- MPI under mpiexec
def _mpiexec() -> Optional[str]:
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else None


@pytest.mark.mpi
@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or _mpiexec() is None, reason="needs mpi4py and mpiexec")
def test_faults_mpi(tmp_path):
    launch_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "FLAGCX_LAUNCHER")
    env = {k: v for k, v in os.environ.items() if k not in launch_vars and not k.startswith("FLAGCX_")}
    env.update(FAULT_MODE="mpi", FAULT_TIMEOUT=str(TIMEOUT), FAULT_DIR=str(tmp_path), FLAGCX_CPU_ADAPTER="mpi", OMP_NUM_THREADS="1")
    mpich_segments = set(glob.glob("/dev/shm/mpich_shm_*"))
    proc = subprocess.Popen(
        [_mpiexec(), "-n", "4", sys.executable, "-m", "tests.ranks.fault_rank"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # MPICH unlinks its node segment at MPI_Finalize; a job whose rank died by SIGKILL never
        # gets there and leaves /dev/shm/mpich_shm_* behind: remove what this job created.
        for leftover in set(glob.glob("/dev/shm/mpich_shm_*")) - mpich_segments:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    ended = time.time()
    assert (tmp_path / "victim3.json").exists(), f"rank 3 never reached its SIGKILL; mpiexec output:\n{output[-4000:]}"
    killed = _load(tmp_path, "victim3.json")["killed_at"]
    assert proc.returncode != 0 and ended - killed < SLACK, f"mpiexec exited with {proc.returncode} {ended - killed:.1f} s after the SIGKILL"
    reports = {r: _load(tmp_path, f"rank{r}.json") for r in range(4)}
    _check_stuck("mpi", reports, late=3, survivors=(0, 1, 2))
    _check_init("mpi", reports, odd=3)
    for r, rep in reports.items():
        assert rep["final_ok"]["error"] is None, (r, rep["final_ok"])


# ---------------------------------------------------------------------- the watchdog, with a fake clock
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeDevice:
    """A watched adapter: launches with times, an asynchronous error, and what fail() received."""

    def __init__(self, label: str, timeout: float = 10.0, rank: int = 0) -> None:
        self.rank = rank
        self.label = label
        self.timeout = timeout
        self.launches: list[tuple[float, str]] = []
        self.async_error: Optional[FlagcxError] = None
        self.failed: list[FlagcxError] = []

    @property
    def watch_timeout(self) -> float:
        return self.timeout

    @property
    def watch_label(self) -> str:
        return self.label

    def check_async_error(self) -> None:
        if self.async_error is not None:
            raise self.async_error

    def oldest_pending(self):
        return self.launches[0] if self.launches else None

    def peer_report(self) -> str:
        return "peers that did not arrive: rank 1 (pid 7) is alive but did not reach the failed call within 3 s"

    def fail(self, exc: FlagcxError) -> None:
        self.failed.append(exc)


def test_watchdog_times_out_the_oldest_unfinished_op():
    clock = FakeClock()
    dog = Watchdog(clock=clock)
    quiet, late = FakeDevice("quiet"), FakeDevice("late", timeout=10.0, rank=3)
    dog.register(quiet, start=False)
    dog.register(late, start=False)
    assert dog.poll() == []
    late.launches = [(clock.now, "allreduce"), (clock.now + 4, "broadcast")]
    clock.now += 9.9
    assert dog.poll() == [] and not late.failed
    clock.now += 0.2
    failed = dog.poll()
    assert [a for a, _ in failed] == [late] and quiet.failed == []
    exc = late.failed[0]
    assert isinstance(exc, FlagcxTimeout) and exc.op == "allreduce" and exc.rank == 3
    text = str(exc)
    assert "allreduce on late" in text and "10.1 s" in text and "timeout 10 s" in text and "rank 1 (pid 7)" in text and "aborted" in text, text
    clock.now += 100  # a failed adapter is no longer watched
    assert dog.poll() == [] and len(late.failed) == 1 and dog.watched() == [quiet]


def test_watchdog_fails_on_asynchronous_errors_and_forgets_dropped_adapters():
    clock = FakeClock()
    dog = Watchdog(clock=clock)
    broken, fine = FakeDevice("broken"), FakeDevice("fine")
    broken.async_error = RemoteError("NCCL reported a remote error", op="asynchronous NCCL error")
    dog.register(broken, start=False)
    dog.register(fine, start=False)
    assert [e for _, e in dog.poll()] == [broken.async_error] and broken.failed == [broken.async_error]
    assert dog.watched() == [fine]
    ref = weakref.ref(fine)
    del fine
    gc.collect()
    assert ref() is None and dog.watched() == []


def test_watchdog_interval_follows_the_smallest_timeout():
    dog = Watchdog(clock=FakeClock(), max_interval=1.0)
    assert dog.interval() == 1.0
    a = FakeDevice("a", timeout=600)
    b = FakeDevice("b", timeout=2)
    dog.register(a, start=False)
    assert dog.interval() == 1.0
    dog.register(b, start=False)
    assert dog.interval() == pytest.approx(0.2)
    b.timeout = 0.1
    assert dog.interval() == 0.05


def _watchdog_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "flagcx-watchdog"]


def test_watchdog_thread_fails_late_ops_and_ends_when_nothing_is_watched():
    dog = Watchdog(max_interval=0.05)
    dev = FakeDevice("thread", timeout=0.2)
    dev.launches = [(time.monotonic(), "allgather")]
    dog.register(dev)
    assert dog.running
    deadline = time.monotonic() + 5
    while not dev.failed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dev.failed and isinstance(dev.failed[0], FlagcxTimeout)
    while dog.running and time.monotonic() < deadline:  # nothing left to watch: the thread ends
        time.sleep(0.01)
    assert not dog.running and _watchdog_threads() == []
    idle = FakeDevice("idle", timeout=5)
    dog.register(idle)
    assert dog.running
    dog.unregister(idle)  # joins the thread
    assert not dog.running and _watchdog_threads() == []


# ---------------------------------------------------------------------- NCCL watchdog on GPUs
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (runs on the GPU machine)")
def test_nccl_watchdog_aborts_a_stuck_collective():
    assert_passed(run_suite("tests.test_faults:nccl_watchdog_suite", 2, env={"FLAGCX_TIMEOUT": "4", "NCCL_NVLS_ENABLE": "0"}), min_checks=4)


def nccl_watchdog_suite(rank: int, size: int):
    """Suite (2 GPUs): rank 1 skips an all_reduce; rank 0's watchdog aborts it; both recover; graph capture is unharmed."""
    from flagcx import watchdog

    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    comm = Communicator.from_env(name="wd")
    timeout = comm.timeout
    sync = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=120))
    x = torch.ones(1 << 20, device=dev)
    comm.all_reduce(x)
    torch.cuda.synchronize()
    yield "watchdog registered", lambda: _registered(comm, dev)
    yield "stuck all_reduce is aborted by the watchdog", lambda: _stuck_nccl(comm, rank, timeout)
    yield "both ranks done with the stuck communicator", lambda: (sync.set(f"stuck-done/{rank}", b"1"), sync.wait([f"stuck-done/{r}" for r in range(size)]))
    fresh = {}
    yield "new communicator after the abort", lambda: _fresh(fresh, rank, dev)
    yield "graph capture with the watchdog running", lambda: _capture_under_watch(fresh["comm"], dev)
    yield "no watchdog thread after destroy", lambda: _destroyed(fresh["comm"], watchdog)


def _registered(comm: Communicator, dev: torch.device) -> None:
    from flagcx import watchdog

    adapter = comm._adapter(dev, "test")
    assert adapter in watchdog.process_watchdog().watched() and watchdog.process_watchdog().running


def _stuck_nccl(comm: Communicator, rank: int, timeout: float) -> None:
    dev = torch.device("cuda", rank)
    if rank == 1:
        time.sleep(timeout + 8)  # rank 0's watchdog fires meanwhile
        comm.abort()
        return
    x = torch.ones(1 << 20, device=dev)
    start = time.monotonic()
    comm.all_reduce(x)  # enqueued; its peer never arrives
    done = torch.cuda.Event()
    done.record()
    while not done.query() and time.monotonic() - start < timeout + SLACK:
        time.sleep(0.05)
    assert done.query(), f"the stuck all_reduce still ran on the device {time.monotonic() - start:.1f} s later (ncclCommAbort did not end it)"
    try:
        comm.all_reduce(x)
    except FlagcxTimeout as exc:
        elapsed = time.monotonic() - start
        text = str(exc)
        assert "allreduce on wd" in text and "watchdog aborted" in text and "rank 1" in text, text
        assert timeout <= elapsed < timeout + SLACK, elapsed
    else:
        raise AssertionError("a call after the watchdog's abort did not raise its error")
    comm.abort()


def _fresh(holder: dict, rank: int, dev: torch.device) -> None:
    comm = Communicator.from_env(name="wd-fresh")
    x = torch.full((1031,), float(rank + 1), device=dev)
    comm.all_reduce(x)
    assert torch.equal(x.cpu(), torch.full((1031,), 3.0))
    holder["comm"] = comm


def _capture_under_watch(comm: Communicator, dev: torch.device) -> None:
    """Capture and replay an all_reduce while tracked launches are pending and the watchdog polls."""
    big = torch.ones(1 << 24, device=dev)
    x = torch.ones(1031, device=dev)
    stream = torch.cuda.Stream(device=dev)
    for _ in range(5):
        comm.all_reduce(big)  # tracked, in flight while the capture starts
        stream.wait_stream(torch.cuda.current_stream(dev))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            comm.all_reduce(x)
        x.fill_(1.0)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(x.cpu(), torch.full((1031,), 2.0))
        time.sleep(0.2)


def _destroyed(comm: Communicator, watchdog) -> None:
    comm.destroy()
    assert not watchdog.process_watchdog().running and _watchdog_threads() == []
