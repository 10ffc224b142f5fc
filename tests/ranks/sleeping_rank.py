"""A rank that joins a flagcx world, writes its pid to ``<dir>/rank<R>.pid`` and sleeps (for the launcher signal tests)."""

import os
import sys
import time

import torch.distributed as dist

import flagcx  # noqa: F401  (registers the backend)

dist.init_process_group("flagcx")
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.pid"), "w") as f:
    f.write(str(os.getpid()))
time.sleep(120)
