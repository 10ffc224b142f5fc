"""The launch environment: rank, size and rendezvous address from torchrun, mpiexec (MPICH / Open MPI) or ``flagcx.launch``, and the store built from it."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from ..errors import FlagcxError
from .network import advertised_address


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
        addr = port = None
        if env.rank == 0:
            addr = os.environ.get("MASTER_ADDR") or advertised_address()
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
        addr, port = MPI.COMM_WORLD.bcast((addr, port), root=0)
        os.environ["MASTER_ADDR"] = os.environ.get("MASTER_ADDR") or addr
        os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    return env


_served: dict[tuple[str, int], dist.TCPStore] = {}
"""The store server this process runs (rank 0 when no launcher serves one), reused by every later communicator."""


def store_from_env(timeout: float) -> dist.Store:
    """A TCPStore client/server from MASTER_ADDR/MASTER_PORT (rank 0 serves unless a launcher does).

    Rank 0 starts the server once per address and port; later calls (a second
    ``Communicator.from_env``) get the same server instead of a second bind of the port.
    """
    env = prepare_env()
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    serve = env.rank == 0 and not agent
    if serve and (addr, port) in _served:
        server = _served[(addr, port)]
        server.set_timeout(timedelta(seconds=timeout))
        return server
    store = dist.TCPStore(addr, port, env.size, is_master=serve, timeout=timedelta(seconds=timeout), wait_for_workers=False)
    if serve:
        _served[(addr, port)] = store
    return store


# ---------------------------------------------------------------- network interfaces
