"""Run a test suite in every rank of an mpiexec job; rank 0 writes all ranks' outcomes as JSON.

    mpiexec -n 4 python -m tests.ranks.mpi_runner tests.helpers.matrix:comm_matrix out.json

Each rank runs the suite like ``tests.helpers.harness._run_suite`` (every check recorded, the
run goes on after a failure); rank 0 gathers the per-rank outcome dicts over
MPI_COMM_WORLD and writes them as a JSON list in rank order, the form
``tests.helpers.harness.assert_passed`` takes.
"""

from __future__ import annotations

import json
import sys

from mpi4py import MPI

from ..helpers.harness import _run_suite


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: mpiexec -n N python -m tests.ranks.mpi_runner <module:suite> <out.json>", file=sys.stderr)
        return 2
    target, path = argv
    world = MPI.COMM_WORLD
    outcome = _run_suite(world.Get_rank(), world.Get_size(), target)
    outcomes = world.gather(outcome, root=0)
    if world.Get_rank() == 0:
        with open(path, "w") as f:
            json.dump(outcomes, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
