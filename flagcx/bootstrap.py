"""Rendezvous through a torch Store: all-gathers of small records, and the job's rank/size.

Every rank-to-rank exchange at init (topology records, shm segment names, NCCL unique
ids) goes through :func:`store_allgather` / :func:`store_broadcast`. The launch
environment is read from torchrun, mpiexec (MPICH / Open MPI) or ``flagcx.launch``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from .errors import FlagcxError, FlagcxTimeout


def _missing(store, keys: list[str]) -> list[int]:
    missing = []
    for i, key in enumerate(keys):
        try:
            if not store.check([key]):
                missing.append(i)
        except Exception:
            missing.append(i)
    return missing


def store_wait(store, keys: list[str], timeout: float, what: str, ranks: Optional[list[int]] = None) -> None:
    """Wait until every key exists, or raise FlagcxTimeout naming the ranks that never wrote theirs."""
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except Exception as exc:
        text = str(exc).lower()
        if "timeout" in text or "timed out" in text or "wait timeout" in text:
            late = _missing(store, keys)
            who = [ranks[i] if ranks else i for i in late]
            raise FlagcxTimeout(
                f"{what}: rank(s) {who} did not arrive within {timeout:g} s "
                "(a rank crashed, was not started, or is blocked in another call)"
            ) from exc
        raise FlagcxError(f"{what}: the store failed ({exc}); is the store server (rank 0 / the launcher) still running?") from exc


def store_allgather(store, key: str, rank: int, size: int, value: bytes, timeout: float, what: str) -> list[bytes]:
    """Every rank contributes ``value``; every rank gets the list in rank order."""
    try:
        store.set(f"{key}/{rank}", value)
    except Exception as exc:
        raise FlagcxError(f"{what}: cannot write to the store ({exc})") from exc
    keys = [f"{key}/{r}" for r in range(size)]
    store_wait(store, keys, timeout, what)
    return [bytes(v) for v in store.multi_get(keys)]


def store_broadcast(store, key: str, rank: int, root: int, value: Optional[bytes], timeout: float, what: str) -> bytes:
    """Root publishes ``value``; every rank returns it."""
    if rank == root:
        assert value is not None
        store.set(key, value)
        return value
    store_wait(store, [key], timeout, what, ranks=[root])
    return bytes(store.get(key))


@dataclass(frozen=True)
class LaunchEnv:
    """Rank layout of the running job as its launcher described it."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    launcher: str


def _int_env(*names: str) -> Optional[int]:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def detect_launch_env() -> Optional[LaunchEnv]:
    """Rank and size from mpiexec (Open MPI OMPI_*, MPICH/PMIx PMI_*) or torchrun / flagcx.launch (RANK...).

    MPI variables are checked first: ``prepare_env`` copies them into RANK/WORLD_SIZE,
    and the launcher must still read as mpiexec afterwards.
    """
    rank = _int_env("OMPI_COMM_WORLD_RANK")
    if rank is not None:
        size = _int_env("OMPI_COMM_WORLD_SIZE")
        return LaunchEnv(
            rank,
            size or 1,
            _int_env("OMPI_COMM_WORLD_LOCAL_RANK") or 0,
            _int_env("OMPI_COMM_WORLD_LOCAL_SIZE") or 1,
            "mpiexec",
        )
    rank = _int_env("PMI_RANK", "PMIX_RANK")
    if rank is not None:
        size = _int_env("PMI_SIZE", "PMIX_SIZE") or 1
        return LaunchEnv(rank, size, _int_env("MPI_LOCALRANKID") or 0, _int_env("MPI_LOCALNRANKS") or size, "mpiexec")
    rank = _int_env("RANK")
    size = _int_env("WORLD_SIZE")
    if rank is not None and size is not None:
        local_rank = _int_env("LOCAL_RANK")
        local_size = _int_env("LOCAL_WORLD_SIZE")
        launcher = "flagcx" if os.environ.get("FLAGCX_LAUNCHER") else "torchrun"
        return LaunchEnv(rank, size, rank if local_rank is None else local_rank, size if local_size is None else local_size, launcher)
    return None


def prepare_env() -> LaunchEnv:
    """Make ``init_process_group(backend="flagcx")`` (env://) work under any supported launcher.

    Under mpiexec, RANK/WORLD_SIZE/LOCAL_RANK are copied from the MPI environment and,
    when MASTER_ADDR/MASTER_PORT are unset, rank 0 picks a free port and shares it
    through MPI (needs mpi4py: ``pip install flagcx[mpi]``).
    """
    env = detect_launch_env()
    if env is None:
        raise FlagcxError(
            "no launcher environment found: start the job with torchrun, mpiexec or "
            "'python -m flagcx.launch --nproc N', or set RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT"
        )
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(env.local_size))
    if env.launcher == "mpiexec" and not os.environ.get("MASTER_PORT"):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise FlagcxError("under mpiexec set MASTER_ADDR/MASTER_PORT, or install mpi4py (pip install flagcx[mpi])") from exc
        import socket

        addr = port = None
        if env.rank == 0:
            addr = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
        addr, port = MPI.COMM_WORLD.bcast((addr, port), root=0)
        os.environ["MASTER_ADDR"] = os.environ.get("MASTER_ADDR") or addr
        os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    return env


def store_from_env(timeout: float) -> "dist.Store":
    """A TCPStore client/server from MASTER_ADDR/MASTER_PORT (rank 0 serves unless a launcher does)."""
    env = prepare_env()
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        env.size,
        is_master=(env.rank == 0 and not agent),
        timeout=timedelta(seconds=timeout),
        wait_for_workers=False,
    )
