"""all_reduce of sparse COO tensors (what Gloo offers and DDP's sparse gradients need), lowered onto dense all-gathers.

Every rank's coalesced indices and values are all-gathered (uneven nnz), concatenated
and coalesced, then copied into the input in place. The ranks first exchange their
tensors' shape, dtype and nnz, so a mismatch raises on every rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import NotSupported, invalid
from ..types import FLOAT_DTYPES, ReduceOp

META = 20
"""int64 words describing one rank's sparse tensor: nnz, sparse_dim, dtype, ndim and up to 16 sizes."""

DTYPES = sorted(FLOAT_DTYPES | {torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool}, key=str)
"""Value dtypes of sparse all_reduce; a dtype's index is the code the ranks compare."""


def all_reduce_sparse(tensor: torch.Tensor, kind: ReduceOp, rank: int, size: int, all_gather: Callable[..., object]) -> None:
    """SUM ``tensor`` (sparse COO) over the ranks, in place; ``all_gather(out, tensor)`` is the communicator's."""
    name = "all_reduce"
    if kind is not ReduceOp.SUM:
        raise NotSupported(f"sparse COO tensors are reduced with SUM only, not {kind.name}; densify the tensor for other ops", op=name, rank=rank)
    if tensor.dim() > META - 4:
        raise NotSupported(f"sparse tensors of more than {META - 4} dims are not supported", op=name, rank=rank)
    local = tensor.coalesce()
    code = DTYPES.index(tensor.dtype) if tensor.dtype in DTYPES else -1
    meta = torch.zeros(META, dtype=torch.int64, device=tensor.device)
    meta[:4] = torch.tensor([local._nnz(), local.sparse_dim(), code, local.dim()])
    meta[4 : 4 + local.dim()] = torch.tensor(local.shape, dtype=torch.int64)
    every = torch.empty(META * size, dtype=torch.int64, device=tensor.device)
    all_gather(every, meta)
    rows = every.view(size, META).cpu()
    if code < 0 or any(not torch.equal(rows[r, 1:], rows[0, 1:]) for r in range(size)):
        detail = "; ".join(
            f"rank {r}: sparse_dim {int(row[1])}, dtype #{int(row[2])}, shape {tuple(int(x) for x in row[4 : 4 + int(row[3])])}" for r, row in enumerate(rows)
        )
        raise invalid(
            name,
            rank,
            "tensor",
            f"sparse tensors differ between ranks or have an unsupported dtype ({detail})",
            "pass sparse tensors of one shape and dtype on every rank",
        )
    counts = [int(n) for n in rows[:, 0]]
    indices = local._indices().t().contiguous()
    values = local._values().contiguous()
    all_indices = [indices.new_empty((n, indices.shape[1])) for n in counts]
    all_values = [values.new_empty((n, *values.shape[1:])) for n in counts]
    all_gather(all_indices, indices)
    all_gather(all_values, values)
    total = torch.sparse_coo_tensor(torch.cat(all_indices).t(), torch.cat(all_values), local.shape, dtype=tensor.dtype, device=tensor.device)
    tensor.copy_(total.coalesce())
