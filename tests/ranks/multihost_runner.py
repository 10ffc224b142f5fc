"""Run a test suite in one rank of a multi-host job (torchrun or mpiexec); every rank writes its own outcomes.

    torchrun --nnodes 2 ... -m tests.ranks.multihost_runner tests.ranks.multihost_suite:world /shared/out
    mpiexec -hosts a,b -n 4 python -m tests.ranks.multihost_runner tests.ranks.multihost_suite:world /shared/out

Rank r runs the suite like ``tests.helpers.harness._run_suite`` (every check recorded, the run
goes on after a failure) and writes ``<outdir>/rank-<r>.json``; the test collects the
files (the namespaced hosts share this machine's file system) and hands the list to
``tests.helpers.harness.assert_passed``. No collective is needed to report, so a rank whose
transport broke still reports.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from flagcx.bootstrap import detect_launch_env

from ..helpers.harness import _run_suite


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tests.ranks.multihost_runner <module:suite> <outdir>", file=sys.stderr)
        return 2
    target, outdir = argv
    env = detect_launch_env()
    if env is None:
        print("tests.ranks.multihost_runner: no launcher environment (start it with torchrun or mpiexec)", file=sys.stderr)
        return 2
    outcome = _run_suite(env.rank, env.size, target)
    path = Path(outdir) / f"rank-{env.rank}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(outcome))
    tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
