"""The flight recorder on 4 ranks: one rank skips an all_reduce; every rank dumps; torch's own analyzer names it.

For each transport (shm, Gloo, a heterogeneous communicator of two shm clusters, and MPI
under mpiexec), a fresh 4-rank Communicator with FLAGCX_TIMEOUT=STUCK runs four checked
collectives (an int64 all_reduce of 1001 elements, an all_gather of 7 floats, a broadcast
of 13 from rank 2, an in-place float all_reduce), then rank 3 skips the fifth call, an
all_reduce. Ranks 0-2 fail it (FlagcxTimeout on at least one of them), dump, and ask their
peers through the store; rank 3, busy in its own code, dumps when asked. Rank 0 then runs
``torchfrtrace`` (the console script of the torch wheel) on the folder of dumps: it must
report collective 5, an all_reduce, with rank 3 missing. Each dump is read too: rank 3's
last entry is the completed call 4; the others' is call 5, started, with its error.

The harness world is Gloo (no flagcx recorder of its own in the dumps); the MPI suite
synchronises over MPI_COMM_WORLD, and its rank 3 joins the abandoned all_reduce at the end
so that MPI finalizes cleanly (``tests/test_mpi.py`` does the same).
"""

from __future__ import annotations

import gc
import glob
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from flagcx.launch import patched_environ

from ..helpers.matrix import Check

STUCK = 2.0
"""FLAGCX_TIMEOUT of the skipped all_reduce."""
WAIT_FOR_DUMPS = 40.0
"""Seconds rank 3 waits for the four dumps (the peers' timeouts plus the listener's poll)."""
SKIPPED_SEQ = 5


def analyzer() -> list[str]:
    """The command of torch's analyzer: its console script beside this Python, else the module."""
    script = Path(sys.executable).with_name("torchfrtrace")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.flight_recorder.fr_trace"]


def _make_comm(adapter: str, rank: int):
    from flagcx import Communicator

    env = {"FLAGCX_CPU_ADAPTER": adapter, "FLAGCX_TIMEOUT": str(STUCK)}
    if adapter == "hetero":
        env.update(FLAGCX_CPU_ADAPTER="shm", FLAGCX_CLUSTER_ID="A" if rank < 2 else "B")
    if adapter == "mpi":
        with patched_environ(env):
            return Communicator.from_env(name="flight-mpi")
    from ..helpers.harness import flagcx_env

    with flagcx_env(**env):
        store = dist.PrefixStore(f"flight-{adapter}/", dist.distributed_c10d._get_default_store())
        return Communicator(store, rank, 4, name=f"flight-{adapter}")


def _calls(comm) -> None:
    """Four collectives, each checked exactly."""
    rank, size = comm.rank, comm.size
    x = torch.arange(1001, dtype=torch.int64) + rank
    comm.all_reduce(x)
    assert torch.equal(x, torch.arange(1001, dtype=torch.int64) * size + sum(range(size))), "all_reduce"
    out = torch.empty(7 * size)
    comm.all_gather(out, torch.full((7,), float(rank)))
    assert torch.equal(out, torch.arange(size, dtype=torch.float32).repeat_interleave(7)), "all_gather"
    b = torch.arange(13, dtype=torch.float32) if rank == 2 else torch.zeros(13)
    comm.broadcast(b, 2)
    assert torch.equal(b, torch.arange(13, dtype=torch.float32)), "broadcast"
    y = torch.full((3,), 0.5 * (rank + 1))
    comm.all_reduce(y)
    assert torch.equal(y, torch.full((3,), 0.5 * sum(range(1, size + 1)))), "in-place all_reduce"


def _skip(adapter: str, folder: Path, sync: Callable[[], None]) -> None:
    from flagcx import FlagcxError, FlagcxTimeout

    if adapter == "mpi":
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
    else:
        rank = dist.get_rank()
    prefix = str(folder / adapter / "rank_")
    with patched_environ({"TORCH_FR_DUMP_TEMP_FILE": prefix}):
        comm = _make_comm(adapter, rank)
        try:
            _calls(comm)
            if rank == 3:
                deadline = time.monotonic() + WAIT_FOR_DUMPS
                while len(glob.glob(prefix + "*")) < 4 and time.monotonic() < deadline:
                    time.sleep(0.1)
                found = sorted(os.path.basename(p) for p in glob.glob(prefix + "*"))
                assert len(found) == 4, f"rank 3 saw only the dumps {found} after {WAIT_FOR_DUMPS:g} s"
                if adapter == "mpi":  # complete the others' abandoned all_reduce, so that MPI finalizes
                    try:
                        comm.all_reduce(torch.full((3,), 1.0))
                    except FlagcxError:
                        pass
            else:
                try:
                    comm.all_reduce(torch.full((3,), 1.0))
                except FlagcxTimeout:
                    pass
                except FlagcxError:
                    assert adapter == "hetero", "only a heterogeneous communicator may report the skipped rank through another error"
                else:
                    raise AssertionError("the all_reduce rank 3 skipped completed")
            sync()
            _read_dumps(prefix, rank)
            if rank == 0:
                _run_analyzer(folder / adapter)
            sync()
        finally:
            comm.abort()
            del comm
            gc.collect()


def _read_dumps(prefix: str, rank: int) -> None:
    """This rank's dump: torch's keys, the group's ranks, the calls in order, the state of the last one."""
    with open(f"{prefix}{rank}", "rb") as f:
        dump = pickle.load(f)
    assert {"version", "pg_config", "pg_status", "entries"} <= set(dump), sorted(dump)
    (group,) = dump["pg_config"].values()
    assert group["ranks"] == "[0, 1, 2, 3]", group
    ours = [e for e in dump["entries"] if e["process_group"][0] == group["name"]]
    names = [e["profiling_name"] for e in ours]
    assert names[:4] == ["nccl:all_reduce", "nccl:all_gather", "nccl:broadcast", "nccl:all_reduce"], names
    assert [e["collective_seq_id"] for e in ours] == list(range(1, len(ours) + 1)), [e["collective_seq_id"] for e in ours]
    assert ours[0]["input_sizes"] == [[1001]] and ours[0]["input_dtypes"] == ["int64"], ours[0]
    assert ours[1]["input_sizes"] == [[7]] and ours[1]["output_sizes"] == [[28]], ours[1]
    assert all(e["state"] == "completed" for e in ours[:4]), [e["state"] for e in ours]
    if rank == 3:
        assert len(ours) == 4, f"rank 3 recorded {names}"
    else:
        assert len(ours) == SKIPPED_SEQ, f"rank {rank} recorded {names}"
        last = ours[-1]
        assert last["profiling_name"] == "nccl:all_reduce" and last["state"] == "started" and "error" in last, last


def _run_analyzer(folder: Path) -> None:
    out = subprocess.run([*analyzer(), str(folder)], capture_output=True, text=True, timeout=120, check=False)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert f"Not all ranks joining collective, sequence number: {SKIPPED_SEQ}" in text, text
    assert "collective: nccl:all_reduce" in text and "missing ranks: {3}" in text, text


def skipped(rank: int, size: int) -> Iterable[Check]:
    """Suite (4 ranks): shm, Gloo and heterogeneous communicators, one rank skipping an all_reduce."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    folder = Path(os.environ["FLAGCX_TEST_FLIGHT_DIR"])
    for adapter in ("shm", "gloo", "hetero"):
        yield f"skipped all_reduce, {adapter}", lambda a=adapter: _skip(a, folder, dist.barrier)
        dist.barrier()
    yield "destroy", dist.destroy_process_group


def skipped_mpi(rank: int, size: int) -> Iterable[Check]:
    """Suite (4 ranks under mpiexec): the same on the MPI transport."""
    from mpi4py import MPI

    MPI.COMM_WORLD.Barrier()
    folder = Path(os.environ["FLAGCX_TEST_FLIGHT_DIR"])
    yield "skipped all_reduce, mpi", lambda: _skip("mpi", folder, MPI.COMM_WORLD.Barrier)


def _on_demand(folder: Path) -> None:
    """dump_trace() on the world group and a described subgroup, with a send and a recv: torch's fields, in call order."""
    import flagcx

    rank = dist.get_rank()
    pair = dist.new_group([0, 1], group_desc="pair")
    x = torch.arange(5, dtype=torch.float64) + rank
    dist.all_reduce(x)
    dist.all_reduce(x, group=pair)
    if rank == 0:
        dist.send(torch.ones(9, dtype=torch.int32), 1)
    else:
        got = torch.zeros(9, dtype=torch.int32)
        dist.recv(got, 0)
        assert torch.equal(got, torch.ones(9, dtype=torch.int32)), "recv"
    dist.barrier()
    path = flagcx.dump_trace()
    assert path == f"{os.environ['TORCH_FR_DUMP_TEMP_FILE']}{rank}", path
    explicit = flagcx.dump_trace(str(folder / f"explicit-{rank}.pkl"))
    assert explicit == str(folder / f"explicit-{rank}.pkl") and os.path.getsize(explicit) > 0
    with open(path, "rb") as f:
        dump = pickle.load(f)
    descs = {c["desc"]: c for c in dump["pg_config"].values()}
    assert {"default_pg", "pair"} <= set(descs), dump["pg_config"]
    assert descs["pair"]["ranks"] == "[0, 1]", descs["pair"]
    ids = [e["record_id"] for e in dump["entries"]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    world = [e for e in dump["entries"] if e["process_group"][1] == "default_pg"]
    p2p = [e for e in world if e["is_p2p"]]
    want = "nccl:send 0->1" if rank == 0 else "nccl:recv 1<-0"
    assert [e["profiling_name"] for e in p2p] == [want] and p2p[0]["p2p_seq_id"] == 1, p2p
    assert p2p[0]["input_sizes"] == [[9]] and p2p[0]["input_dtypes"] == ["int32"], p2p[0]
    coll = [e for e in world if not e["is_p2p"]]
    assert [e["profiling_name"] for e in coll][-2:] == ["nccl:all_reduce", "nccl:barrier"], [e["profiling_name"] for e in coll]
    assert all(e["state"] == "completed" for e in dump["entries"]), [e["state"] for e in dump["entries"]]
    dist.destroy_process_group(pair)


def _sigusr1(folder: Path) -> None:
    """SIGUSR1 dumps a rank whose main thread waits inside the transport: its all_reduce shows as started."""
    import signal

    rank = dist.get_rank()
    pids = [None, None]
    dist.all_gather_object(pids, os.getpid())
    prefix = str(folder / "signal_rank_")
    with patched_environ({"TORCH_FR_DUMP_TEMP_FILE": prefix}):
        x = torch.ones(17)
        if rank == 1:
            time.sleep(0.5)  # rank 0 is inside the all_reduce by now
            os.kill(pids[0], signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while not os.path.exists(prefix + "0") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert os.path.exists(prefix + "0"), "rank 0 wrote no dump within 10 s of SIGUSR1"
            with open(prefix + "0", "rb") as f:
                dump = pickle.load(f)
            assert dump["reason"] == "SIGUSR1", dump["reason"]
            last = dump["entries"][-1]
            assert last["profiling_name"] == "nccl:all_reduce" and last["state"] == "started", last
        dist.all_reduce(x)
        assert torch.equal(x, torch.full((17,), 2.0)), "all_reduce after the signal"


def features(rank: int, size: int) -> Iterable[Check]:
    """Suite (2 ranks, the torch frontend): dumps on demand, and on SIGUSR1 while a rank waits in the transport."""
    import flagcx  # noqa: F401  (registers the backend)

    torch.set_num_threads(1)
    dist.init_process_group("flagcx")
    folder = Path(os.environ["FLAGCX_TEST_FLIGHT_DIR"])
    yield "dump on demand", lambda: _on_demand(folder)
    yield "dump on SIGUSR1 inside a wait", lambda: _sigusr1(folder)
    yield "destroy", dist.destroy_process_group
