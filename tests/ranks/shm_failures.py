"""Failure scenarios of the shm transport: the program of one rank, started 4 times by tests/test_shm.py.

Phase 1: rank 3 stays alive but never enters an all_reduce: ranks 0-2 get FlagcxTimeout naming it.
Phase 2: rank 3 SIGKILLs itself while ranks 0-2 are inside all_reduces: they get RemoteError naming it.
Phase 3: among ranks 0-2, rank 2 is SIGKILLed before a collective starts: ranks 0-1 get RemoteError
naming it. After each error the communicator refuses further calls and ``destroy`` still works.
Each rank writes what it saw to $SHM_TEST_DIR/rank<r>.json (victims: victim<r>.json) for the parent.
"""

from __future__ import annotations

import json
import os
import signal
import time

import torch
import torch.distributed as dist

from flagcx import Communicator
from flagcx.bootstrap import store_from_env

from .fault_rank import outcome

STUCK_TIMEOUT = 3.0
KILL_TIMEOUT = 10.0


def _save(path: str, report: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)


def _die(out_dir: str, rank: int) -> None:
    _save(os.path.join(out_dir, f"victim{rank}.json"), {"killed_at": time.time()})
    os.kill(os.getpid(), signal.SIGKILL)


def _loop(comm: Communicator, x: torch.Tensor) -> None:
    for _ in range(100_000):
        comm.all_reduce(x)


def main() -> None:
    rank = int(os.environ["RANK"])
    out_dir = os.environ["SHM_TEST_DIR"]
    path = os.path.join(out_dir, f"rank{rank}.json")
    report: dict = {"segments": []}

    hello = Communicator.from_env(timeout=60, name="hello")  # every rank has imported torch
    hello.barrier()
    stuck = Communicator.from_env(timeout=STUCK_TIMEOUT, name="stuck")
    hello.destroy()
    report["segments"].append(stuck._adapters["cpu"].segment_name)
    if rank == 3:
        time.sleep(STUCK_TIMEOUT + 1.5)
    else:
        report["stuck"] = outcome(lambda: stuck.all_reduce(torch.ones(1000)))
        report["stuck_after"] = outcome(lambda: stuck.all_reduce(torch.ones(10)))
    stuck.destroy()

    comm = Communicator.from_env(timeout=KILL_TIMEOUT, name="kill")
    report["segments"].append(comm._adapters["cpu"].segment_name)
    x = torch.ones(1 << 20)
    if rank == 3:
        for _ in range(3):
            comm.all_reduce(x)
        _die(out_dir, rank)
    report["kill"] = outcome(lambda: _loop(comm, x))
    report["kill_after"] = outcome(comm.barrier)
    report["kill_destroy"] = outcome(comm.destroy)
    _save(path, report)

    store = dist.PrefixStore("phase3/", store_from_env(KILL_TIMEOUT))
    before = Communicator(store, rank, 3, timeout=KILL_TIMEOUT, name="kill-before")
    report["segments"].append(before._adapters["cpu"].segment_name)
    if rank == 2:
        _die(out_dir, rank)
    time.sleep(0.3)
    report["before"] = outcome(lambda: before.all_reduce(torch.ones(1000)))
    report["before_destroy"] = outcome(before.destroy)
    _save(path, report)


if __name__ == "__main__":
    main()
