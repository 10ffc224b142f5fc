"""A small launcher for fault-injection tests: ranks that may be SIGKILLed without the others being stopped.

``flagcx.launch.spawn`` stops every rank when one fails, and importing torch costs ~3 s
per process. Here one *zygote* process imports torch, flagcx and the rank program once,
then forks the ranks (single-threaded at that point: OMP_NUM_THREADS=1), reaps every
child as soon as it exits (a zombie would still look alive to the peers' liveness
checks) and writes the exit statuses to ``<out>/exits.json`` (negative: killed by that
signal). Each rank runs ``<module>.main()`` with RANK / WORLD_SIZE / LOCAL_RANK set and
its output in ``<out>/log<rank>.txt``. The test process hosts the TCPStore (loopback).

    python -m tests.ranks.fault_launch tests.ranks.fault_rank 7 OUT_DIR
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]


def _child(module, rank: int, size: int, out: Path) -> None:
    log = os.open(out / f"log{rank}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(size)})
    prefix = f"FAULT_ENV_{rank}_"
    for key, value in list(os.environ.items()):
        if key.startswith(prefix):
            os.environ[key[len(prefix) :]] = value
    from flagcx import config

    config.reload()
    code = 0
    try:
        module.main()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def zygote(target: str, size: int, out: Path, limit: float) -> int:
    """Fork ``size`` ranks running ``target.main()``; reap them; write exits.json. Kills leftovers after ``limit`` s."""
    import torch  # noqa: F401  (imported once, before the fork)

    import flagcx  # noqa: F401

    module = importlib.import_module(target)
    pids: dict[int, int] = {}
    for rank in range(size):
        pid = os.fork()
        if pid == 0:
            _child(module, rank, size, out)
        pids[pid] = rank
    exits: dict[int, int] = {}
    deadline = time.monotonic() + limit
    while len(exits) < size:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            exits[pids[pid]] = os.waitstatus_to_exitcode(status)
            continue
        if time.monotonic() > deadline:
            for p, r in pids.items():
                if r not in exits:
                    os.kill(p, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.01)
    (out / "exits.json").write_text(json.dumps({str(r): c for r, c in sorted(exits.items())}))
    return 0


def run_zygote(
    target: str,
    size: int,
    out: Path,
    env: Optional[Callable[[int], Mapping[str, str]]] = None,
    base_env: Optional[Mapping[str, str]] = None,
    limit: float = 120,
) -> tuple[dict[int, int], dict[int, str]]:
    """Run ``target`` in ``size`` forked ranks (the test process hosts the store); (exit codes, log tails) by rank.

    ``env(rank)`` adds per-rank variables: they travel as ``FAULT_ENV_<rank>_<NAME>``
    (the zygote has one environment) and each forked rank moves its own to ``<NAME>``.
    """
    from flagcx.launch import loopback_store

    store = loopback_store(size, timedelta(seconds=limit))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLAGCX_")}
    environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(store.port),
        TORCHELASTIC_USE_AGENT_STORE="True",
        OMP_NUM_THREADS="1",
        FAULT_DIR=str(out),
        **(base_env or {}),
    )
    if env is not None:
        for rank in range(size):
            for key, value in env(rank).items():
                environ[f"FAULT_ENV_{rank}_{key}"] = str(value)
    proc = subprocess.Popen([sys.executable, "-m", "tests.ranks.fault_launch", target, str(size), str(out), str(limit)], cwd=ROOT, env=environ)
    try:
        proc.wait(timeout=limit + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        del store
    logs = {r: (out / f"log{r}.txt").read_text()[-4000:] if (out / f"log{r}.txt").exists() else "" for r in range(size)}
    exits_file = out / "exits.json"
    assert exits_file.exists(), f"the zygote exited with {proc.returncode} and wrote no exits.json; logs: {logs}"
    exits = {int(r): c for r, c in json.loads(exits_file.read_text()).items()}
    return exits, logs


if __name__ == "__main__":
    sys.exit(zygote(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 120))
