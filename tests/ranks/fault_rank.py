"""The program of one rank in tests/test_faults.py: dead, stuck, absent and mis-sized peers, and a dead store.

FAULT_MODE picks the transport: ``gloo`` / ``shm`` (FLAGCX_CPU_ADAPTER) or ``hetero``
(two clusters, FLAGCX_CLUSTER_ID per rank), 7 ranks forked by tests/ranks/fault_launch.py:

- ``during``: ranks 0-3; rank 3 SIGKILLs itself while the others are inside all_reduces;
- ``before``: ranks 0-2 + 4; rank 4 dies after a first all_reduce, the others call the next one;
- ``after``: ranks 0-2 + 5; rank 5 dies as soon as its part of a large all_reduce returns;
- ``stuck``: ranks 0-2; rank 2 stays alive but skips an all_reduce;
- ``absent``: rank 2 was started with a world size one too small, so it never joins;
- ``size``: rank 2 was started with a world size one too large;
- ``storegone``: rank 6 hosts the store of a communicator of ranks 0-2 and dies.

After each error the survivors abort the communicator (resources are compared with a
baseline taken before) and, for the first four, build a new communicator in the same
processes and check an all_reduce. FAULT_MODE ``mpi`` runs under mpiexec with 4 ranks:
``stuck`` (rank 3 skips), ``absent``, ``size``, a new communicator, then rank 3 dies.
Each rank writes its outcomes to $FAULT_DIR/rank<r>.json after every phase.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

import flagcx
from flagcx import Communicator
from flagcx.bootstrap import pid_alive

MODE = os.environ.get("FAULT_MODE", "shm")
TIMEOUT = float(os.environ.get("FAULT_TIMEOUT", "2"))
OUT = os.environ.get("FAULT_DIR", ".")
BIG = 1 << 20
"""Elements of the all_reduces a victim dies in (4 MiB of float32: several transport chunks)."""


def outcome(fn: Callable[[], object]) -> dict:
    """What ``fn`` did: its FlagcxError (type, text) or None, the seconds it took and the wall time it ended."""
    t0 = time.monotonic()
    try:
        fn()
    except flagcx.FlagcxError as exc:
        return {"error": type(exc).__name__, "text": str(exc), "elapsed": time.monotonic() - t0, "at": time.time()}
    return {"error": None, "elapsed": time.monotonic() - t0, "at": time.time()}


def resources() -> dict:
    """File descriptors, OS threads and Python threads of this process."""
    return {
        "fds": sorted(os.listdir("/proc/self/fd")),
        "tasks": len(os.listdir("/proc/self/task")),
        "threads": sorted(t.name for t in threading.enumerate()),
    }


def settled(baseline: dict, limit: float = 5.0) -> dict:
    """resources() once they are back to ``baseline`` (threads may take a moment to end), or after ``limit`` s.

    Garbage is collected first: a communicator and its adapters form reference cycles.
    """
    gc.collect()
    deadline = time.monotonic() + limit
    while True:
        now = resources()
        if now == baseline or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def segments(comm: Optional[Communicator]) -> list[str]:
    """Names of the shm segments of ``comm`` and of its sub-communicators."""
    if comm is None:
        return []
    found = []
    sets = comm._hetero.lanes.sets() if comm._hetero is not None else [comm._adapters]
    for s in sets:
        name = getattr(s.get("cpu"), "segment_name", None)
        if name:
            found.append(name)
    return found


class Rank:
    """One rank's view of the job: the base store, sync points, victims and the report."""

    def __init__(self) -> None:
        if MODE == "mpi":
            from flagcx.bootstrap import prepare_env, store_from_env

            self.rank = prepare_env().rank
            self.store = store_from_env(60)
        else:
            self.rank = int(os.environ["RANK"])
            self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=60))
        self.report: dict = {"segments": [], "resources": {}}
        self.path = os.path.join(OUT, f"rank{self.rank}.json")

    def sync(self, name: str, members: Sequence[int]) -> None:
        self.store.set(f"sync/{name}/{self.rank}", b"1")
        self.store.wait([f"sync/{name}/{r}" for r in members], timedelta(seconds=60))

    def comm(self, phase: str, members: Sequence[int], size: Optional[int] = None, store=None) -> Communicator:
        """This rank's communicator of ``phase`` over ``members`` (``size`` overrides the group size it was 'started' with)."""
        base = dist.PrefixStore(f"{phase}/", store if store is not None else self.store)
        c = Communicator(base, members.index(self.rank), size or len(members), timeout=TIMEOUT, name=phase, global_ranks=list(members))
        self.report["segments"] += segments(c)
        return c

    def save(self) -> None:
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.report, f)
        os.replace(self.path + ".tmp", self.path)

    def die(self, phase: str) -> None:
        with open(os.path.join(OUT, f"victim{self.rank}.json"), "w") as f:
            json.dump({"phase": phase, "pid": os.getpid(), "killed_at": time.time()}, f)
        os.kill(os.getpid(), signal.SIGKILL)

    def wait_dead(self, victim: int) -> None:
        """Until victim's process is gone (it wrote its pid just before SIGKILLing itself)."""
        path = os.path.join(OUT, f"victim{victim}.json")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if os.path.exists(path):
                try:
                    pid = json.load(open(path))["pid"]
                except ValueError:  # being written
                    pid = None
                if pid is not None and not pid_alive(pid):
                    return
            time.sleep(0.02)
        raise AssertionError(f"rank {victim} did not die")


def check_sum(c: Communicator, n: int = 1031) -> None:
    """An all_reduce whose exact result is known: rank r contributes r + 1."""
    x = torch.full((n,), float(c.rank + 1))
    c.all_reduce(x)
    expected = float(c.size * (c.size + 1) // 2)
    assert torch.equal(x, torch.full((n,), expected)), f"all_reduce gave {x[:4].tolist()}..., expected {expected}"


def _loop(c: Communicator, x: torch.Tensor) -> None:
    for _ in range(100_000):
        c.all_reduce(x)


def killed_phase(me: Rank, phase: str, victim: int, baseline: dict) -> None:
    """Ranks 0-2 + victim: the victim dies during / before / after a collective; survivors report, abort, recover."""
    members = [0, 1, 2, victim]
    if me.rank not in members:
        return
    me.sync(f"{phase}-start", members)
    c = me.comm(phase, members)
    check_sum(c)
    x = torch.ones(BIG)
    if me.rank == victim:
        if phase == "during":
            for _ in range(3):
                c.all_reduce(x)
        elif phase == "after":
            c.all_reduce(x)
        me.die(phase)
    rep: dict = {}
    if phase == "during":
        rep["error"] = outcome(lambda: _loop(c, x))
    elif phase == "before":
        me.wait_dead(victim)
        rep["error"] = outcome(lambda: c.all_reduce(x))
    else:  # after: this all_reduce may still finish (correctly) or fail; the next one fails
        first = torch.ones(BIG)
        rep["last"] = outcome(lambda: c.all_reduce(first))
        rep["last_correct"] = rep["last"]["error"] is not None or bool(torch.all(first == 4.0))
        me.wait_dead(victim)
        rep["error"] = outcome(lambda: c.all_reduce(x))
    rep["again"] = outcome(lambda: c.all_reduce(torch.ones(10)))
    rep["abort"] = outcome(c.abort)
    del c
    rep["resources"] = settled(baseline)
    me.sync(f"{phase}-recover", [0, 1, 2])
    c = me.comm(f"{phase}-recover", [0, 1, 2])
    rep["recover"] = outcome(lambda: check_sum(c))
    c.destroy()
    me.report[phase] = rep
    me.save()


def stuck_phase(me: Rank, members: list[int], late: int, baseline: dict) -> None:
    """``late`` stays alive but skips an all_reduce: the others time out naming it; everyone aborts and recovers."""
    me.sync("stuck-start", members)
    c = me.comm("stuck", members)
    check_sum(c)
    rep: dict = {}
    if me.rank == late:
        time.sleep(TIMEOUT + 1.5)
    else:
        rep["error"] = outcome(lambda: c.all_reduce(torch.ones(BIG)))
        rep["again"] = outcome(lambda: c.all_reduce(torch.ones(10)))
    rep["abort"] = outcome(c.abort)
    del c
    rep["resources"] = settled(baseline)
    me.sync("stuck-recover", members)
    c = me.comm("stuck-recover", members)
    rep["recover"] = outcome(lambda: check_sum(c))
    c.destroy()
    me.report["stuck"] = rep
    me.save()


def init_phase(me: Rank, phase: str, members: list[int], odd: int, size: int) -> None:
    """Rank ``odd`` creates its communicator with group size ``size`` (the others with len(members))."""
    me.sync(f"{phase}-start", members)
    me.report[phase] = outcome(lambda: me.comm(phase, members, size if me.rank == odd else None).destroy())
    me.save()
    me.sync(f"{phase}-done", members)


def storegone_phase(me: Rank, host: int, baseline: dict) -> None:
    """Rank ``host`` serves the store of a communicator of ranks 0-2, then dies: the communicator still works,
    a new one on that store fails with a clear error, destroy works."""
    from flagcx.launch import loopback_store

    if me.rank not in (0, 1, 2, host):
        return
    me.sync("storegone-start", [0, 1, 2, host])
    if me.rank == host:
        server = loopback_store(3, timedelta(seconds=60))
        me.store.set("storegone/port", str(server.port).encode())
        me.sync("storegone-ready", [0, 1, 2, host])
        me.die("storegone")
    me.store.wait(["storegone/port"], timedelta(seconds=60))
    port = int(me.store.get("storegone/port"))
    remote = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=TIMEOUT))
    c = me.comm("storegone", [0, 1, 2], store=remote)
    check_sum(c)
    me.sync("storegone-ready", [0, 1, 2, host])
    me.wait_dead(host)
    rep = {
        "old_comm": outcome(lambda: check_sum(c)),  # noqa: F821 (c and remote are deleted below, after these calls)
        "new_comm": outcome(lambda: me.comm("storegone-new", [0, 1, 2], store=remote).destroy()),  # noqa: F821
        "destroy": outcome(c.destroy),
    }
    del c, remote
    rep["resources"] = settled(baseline)
    me.report["storegone"] = rep
    me.save()


def warm_up(me: Rank, members: list[int]) -> dict:
    """One communicator created, used and destroyed first (lazy one-time set-up), then the resource baseline."""
    c = me.comm("warmup", members)
    check_sum(c)
    c.destroy()
    del c
    me.sync("warmup-done", members)
    time.sleep(0.2)
    return resources()


def main() -> None:
    me = Rank()
    if MODE == "mpi":
        everyone = [0, 1, 2, 3]
        baseline = warm_up(me, everyone)
        me.report["baseline"] = baseline
        stuck_phase(me, everyone, 3, baseline)
        init_phase(me, "absent", everyone, 3, 3)
        init_phase(me, "size", everyone, 3, 5)
        c = me.comm("final", everyone)
        me.report["final_ok"] = outcome(lambda: check_sum(c))
        me.save()
        me.sync("final-ready", everyone)
        if me.rank == 3:
            me.die("final")
        time.sleep(60)  # the launcher ends the job when rank 3 dies
        return
    survivors = [0, 1, 2]
    if me.rank in survivors:
        baseline = warm_up(me, survivors)
        me.report["baseline"] = baseline
    else:
        baseline = resources()
    for phase, victim in (("during", 3), ("before", 4), ("after", 5)):
        killed_phase(me, phase, victim, baseline)
    if me.rank in survivors:
        stuck_phase(me, survivors, 2, baseline)
        init_phase(me, "absent", survivors, 2, 2)
        init_phase(me, "size", survivors, 2, 4)
    storegone_phase(me, 6, baseline)


if __name__ == "__main__":
    main()
