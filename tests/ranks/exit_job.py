"""One rank of a short job that ends with a real interpreter exit, for the clean-exit test.

Inits a flagcx world (torchrun environment), builds a Gloo subgroup, runs traffic on
both, destroys the world and returns: the interpreter then finalises as after any
user's script, and the exit status tells whether that was clean.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=... python -m tests.ranks.exit_job
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import flagcx  # noqa: F401  (registers the backend)

ROUNDS = 100
"""all_reduce pairs (flagcx world, gloo subgroup) per job."""


def main() -> None:
    dist.init_process_group("flagcx")
    sub = dist.new_group(backend="gloo")
    for _ in range(ROUNDS):
        dist.all_reduce(torch.ones(100), group=sub)
        dist.all_reduce(torch.ones(100))
    dist.all_reduce(torch.ones(100), group=sub)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
