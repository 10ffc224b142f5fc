"""The flight recorder (flagcx.flight): dumps torch's analyzer reads, on every CPU transport.

Multi-rank: 4 ranks where rank 3 skips an all_reduce on shm, Gloo, a heterogeneous
communicator and MPI; every rank dumps (the timed-out ones themselves, rank 3 when its
peers ask through the store) and the real ``torchfrtrace`` names rank 3 and the call
(tests/ranks/flight_suite.py). Two ranks: a dump on demand, and one on SIGUSR1 while the
main thread waits inside a transport. In this process, on a one-rank communicator: the
ring keeps the last FLAGCX_TRACE_BUFFER calls, 0 turns it off, a refused call is kept as
scheduled with its error, FLAGCX_TRACE_STACK keeps the caller's frames, bad values are
ConfigErrors.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flagcx import Communicator, ConfigError, InvalidArgument, config, dump_trace
from flagcx.adapters.shm import ShmAdapter
from flagcx.launch import patched_environ

from .helpers.harness import assert_passed, run_suite
from .ranks.flight_suite import analyzer

SHM_OK = ShmAdapter.unavailable_reason(torch.device("cpu")) is None


@pytest.mark.skipif(not SHM_OK, reason="no shm transport here")
def test_every_rank_dumps_and_torchfrtrace_names_the_rank_that_skipped(tmp_path):
    outcomes = run_suite("tests.ranks.flight_suite:skipped", 4, env={"FLAGCX_TEST_FLIGHT_DIR": str(tmp_path)})
    assert_passed(outcomes, min_checks=4)


def test_mpi_every_rank_dumps_and_torchfrtrace_names_the_rank_that_skipped(tmp_path):
    from .test_mpi import _skip_reason, run_mpi

    if _skip_reason() is not None:
        pytest.skip(_skip_reason() or "")
    with patched_environ({"FLAGCX_TEST_FLIGHT_DIR": str(tmp_path)}):
        outcomes = run_mpi("tests.ranks.flight_suite:skipped_mpi", 4, tmp_path / "out.json", timeout_s="2", limit=300)
    assert_passed(outcomes, min_checks=1)


@pytest.mark.skipif(not SHM_OK, reason="no shm transport here")
def test_dump_on_demand_and_on_sigusr1(tmp_path):
    outcomes = run_suite("tests.ranks.flight_suite:features", 2, env={"FLAGCX_TEST_FLIGHT_DIR": str(tmp_path)})
    assert_passed(outcomes, min_checks=3)


# ---------------------------------------------------------------------- one rank, in this process
def _one_rank(tmp_path: Path, name: str, **env: str) -> Communicator:
    with patched_environ({"FLAGCX_CPU_ADAPTER": "gloo", **env}):
        config.reload()
        try:
            return Communicator(dist.FileStore(str(tmp_path / f"{name}.store"), 1), 0, 1, name=name)
        finally:
            config.reload()


def _entries(path: str, group: str) -> list[dict]:
    with open(path, "rb") as f:
        return [e for e in pickle.load(f)["entries"] if e["process_group"][0] == group]


def test_ring_keeps_the_last_calls_and_a_refused_call(tmp_path):
    comm = _one_rank(tmp_path, "ring", FLAGCX_TRACE_BUFFER="5")
    try:
        for i in range(12):
            comm.all_reduce(torch.full((3 + i,), 1.0))
        with pytest.raises(InvalidArgument):
            comm.gather(torch.ones(2), None, root=0)
        kept = _entries(dump_trace(str(tmp_path / "ring_0")), "ring")
        assert [e["collective_seq_id"] for e in kept] == [9, 10, 11, 12, 13]
        assert [e["input_sizes"] for e in kept[:4]] == [[[11]], [[12]], [[13]], [[14]]]
        assert [e["state"] for e in kept] == ["completed"] * 4 + ["scheduled"]
        assert kept[-1]["profiling_name"] == "nccl:gather" and "InvalidArgument" in kept[-1]["error"]
    finally:
        comm.destroy()


def test_trace_buffer_zero_records_nothing(tmp_path):
    comm = _one_rank(tmp_path, "off", FLAGCX_TRACE_BUFFER="0")
    try:
        assert comm.recorder is None
        comm.all_reduce(torch.ones(4))
    finally:
        comm.destroy()
    other = _one_rank(tmp_path, "on")
    try:
        other.all_reduce(torch.ones(4))
        path = dump_trace(str(tmp_path / "on_0"))
        with open(path, "rb") as f:
            assert "off" not in pickle.load(f)["pg_config"]
    finally:
        other.destroy()


def test_trace_stack_keeps_the_callers_frames(tmp_path):
    comm = _one_rank(tmp_path, "stack", FLAGCX_TRACE_STACK="1")
    try:
        comm.all_reduce(torch.ones(4))
        (entry,) = _entries(dump_trace(str(tmp_path / "stack_0")), "stack")
        assert entry["frames"][0]["name"] == "test_trace_stack_keeps_the_callers_frames", entry["frames"][:2]
        assert entry["frames"][0]["filename"] == __file__
    finally:
        comm.destroy()


@pytest.mark.parametrize("name,value", [("FLAGCX_TRACE_BUFFER", "many"), ("FLAGCX_TRACE_BUFFER", "-1"), ("FLAGCX_TRACE_STACK", "yes")])
def test_bad_recorder_settings_are_config_errors(name, value):
    with patched_environ({name: value}):
        with pytest.raises(ConfigError, match=name):
            config.reload()
    config.reload()


def test_analyzer_reads_a_dump_written_here(tmp_path):
    """torchfrtrace -j prints the entries of a one-rank dump (the format round trip, without the matcher)."""
    comm = _one_rank(tmp_path, "solo")
    try:
        comm.all_reduce(torch.ones(6))
        comm.broadcast(torch.ones(2), 0)
        dump_trace(str(tmp_path / "dumps" / "solo_rank_0"))
    finally:
        comm.destroy()
    out = subprocess.run([*analyzer(), str(tmp_path / "dumps"), "-j"], capture_output=True, text=True, timeout=120, check=False)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "all_reduce(input_sizes=[[6]], state=completed)" in text and "broadcast(" in text, text


def test_dump_without_a_recorder_says_so():
    code = "import flagcx\ntry:\n    flagcx.dump_trace()\nexcept flagcx.InvalidArgument as e:\n    print('refused:', e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False, env={**os.environ})
    assert "refused:" in out.stdout and "FLAGCX_TRACE_BUFFER" in out.stdout, out.stdout + out.stderr


def test_sigusr1_dumps_when_the_application_took_the_wakeup_fd(tmp_path):
    """asyncio's loop replaces the wake-up fd: the handler then dumps from the main thread itself."""
    import signal

    comm = _one_rank(tmp_path, "sig")
    read, write = os.pipe()
    os.set_blocking(write, False)
    ours = signal.set_wakeup_fd(write)
    target = str(tmp_path / "sig_dump_rank_")
    try:
        if signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL:
            pytest.skip("the flight recorder's SIGUSR1 handler is not installed in this process")
        comm.all_reduce(torch.ones(3))
        with patched_environ({"TORCH_FR_DUMP_TEMP_FILE": target}):
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(100):  # the handler runs between two bytecodes of this thread
                if os.path.exists(target + "0"):
                    break
                time.sleep(0.01)
        with open(target + "0", "rb") as f:
            assert pickle.load(f)["reason"] == "SIGUSR1"
    finally:
        signal.set_wakeup_fd(ours)
        os.close(read)
        os.close(write)
        comm.destroy()
