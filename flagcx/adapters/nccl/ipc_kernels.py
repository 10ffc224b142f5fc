"""Triton kernels of the peer-mapped allreduce (:mod:`.ipc_allreduce`); imported only on CUDA ranks that use it.

Every pointer a kernel dereferences on another rank arrives as an int64 in a device
tensor (the peers' mapped addresses) and is cast to a typed pointer inside the kernel.
``barrier`` is one program: it bumps this rank's call counter (in device memory, so a
replayed CUDA graph counts on), writes the new value into slot ``rank`` of every peer's
signal array with release semantics, then spins until its own array holds that value
from every peer. No host synchronisation anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
"""The Triton element type of each dtype the path reduces."""


@triton.jit
def barrier(sig_ptrs, counter, rank, WORLD: tl.constexpr):
    epoch = tl.load(counter) + 1
    tl.store(counter, epoch)
    for p in tl.static_range(WORLD):
        peer = tl.load(sig_ptrs + p).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(peer + rank, epoch, sem="release", scope="sys")
    mine = tl.load(sig_ptrs + rank).to(tl.pointer_type(tl.int32))
    for p in tl.static_range(WORLD):
        seen = tl.atomic_add(mine + p, 0, sem="acquire", scope="sys")
        while seen < epoch:
            seen = tl.atomic_add(mine + p, 0, sem="acquire", scope="sys")


@triton.jit
def one_shot(data_ptrs, out, n, WORLD: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum over ranks of peer buffer[i] (accumulated in float32, in rank order)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p in tl.static_range(WORLD):
        src = tl.load(data_ptrs + p).to(tl.pointer_type(out.dtype.element_ty))
        acc += tl.load(src + offs, mask=mask, other=0.0, cache_modifier=".cv").to(tl.float32)
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def reduce_shard(data_ptrs, n, start, stop, rank, WORLD: tl.constexpr, BLOCK: tl.constexpr, DTYPE: tl.constexpr):
    """Two-shot, first half: this rank's shard [start, stop) of every peer's buffer, summed into its own buffer."""
    offs = start + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = (offs < stop) & (offs < n)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p in tl.static_range(WORLD):
        src = tl.load(data_ptrs + p).to(tl.pointer_type(DTYPE))
        acc += tl.load(src + offs, mask=mask, other=0.0, cache_modifier=".cv").to(tl.float32)
    own = tl.load(data_ptrs + rank).to(tl.pointer_type(DTYPE))
    tl.store(own + offs, acc.to(DTYPE), mask=mask)


@triton.jit
def gather_shards(data_ptrs, out, n, shard, BLOCK: tl.constexpr):
    """Two-shot, second half: element i comes from the buffer of the rank that owns its shard (i // shard)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    owner = offs // shard
    base = tl.load(data_ptrs + owner, mask=mask, other=0).to(tl.pointer_type(out.dtype.element_ty))
    tl.store(out + offs, tl.load(base + offs, mask=mask, other=0.0, cache_modifier=".cv"), mask=mask)
