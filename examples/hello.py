"""Hello, flagcx: every rank all-reduces its rank number and prints the sum.

python -m flagcx.launch --nproc 4 examples/hello.py
torchrun --nproc-per-node 4 examples/hello.py
"""

import torch
import torch.distributed as dist

import flagcx  # noqa: F401  (registers backend "flagcx"; under torchrun torch imports it by itself)

dist.init_process_group(backend="flagcx")
rank, size = dist.get_rank(), dist.get_world_size()
x = torch.tensor([float(rank)])
dist.all_reduce(x)
print(f"rank {rank} of {size}: sum of ranks = {x.item():g} (expected {size * (size - 1) / 2:g})")
dist.destroy_process_group()  # always: it releases shared memory and sockets and lets every rank exit cleanly
