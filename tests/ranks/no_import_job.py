"""A rank script that uses backend="flagcx" without importing flagcx (torch's plugin hook imports it)."""

import torch
import torch.distributed as dist

dist.init_process_group("flagcx")
rank, size = dist.get_rank(), dist.get_world_size()
t = torch.full((5,), float(rank + 1))
dist.all_reduce(t)
assert t.tolist() == [size * (size + 1) / 2] * 5, t
print(f"rank {rank}: all_reduce ok", flush=True)
dist.destroy_process_group()
