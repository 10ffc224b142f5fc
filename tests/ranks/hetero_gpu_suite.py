"""GPU suite for heterogeneous mode: CUDA ranks (an NCCL cluster) and CPU-only ranks in one communicator.

Rank r is a CUDA rank when ``HETERO_GPU_RANKS`` lists it (its launcher gives it one GPU
through CUDA_VISIBLE_DEVICES) and a CPU rank otherwise (CUDA_VISIBLE_DEVICES="", so its
home device is cpu). Every rank runs the shared matrix on its own home device; the
tensors of one call differ in device across ranks, which is the point.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from flagcx import Communicator, NotSupported
from flagcx.hetero import HeteroAdapter

from ..helpers.matrix import Check, error_checks, movement_checks, reduction_checks
from ..helpers.reference import FLOATS, INTS, MOVE_DTYPES
from .hetero_suite import plan_checks

REDUCE = FLOATS + INTS + [torch.bool]


def gpu_ranks(size: int) -> list[int]:
    return [int(r) for r in os.environ["HETERO_GPU_RANKS"].split(",")]


def hetero_gpu_matrix(rank: int, size: int) -> Iterable[Check]:
    """Suite: every op x dtype x reduce op with CUDA and CPU ranks mixed (clusters interleaved in rank order)."""
    is_gpu = rank in gpu_ranks(size)
    device = "cuda" if is_gpu else "cpu"
    if is_gpu:
        torch.cuda.set_device(0)
    else:
        assert not torch.cuda.is_available(), "a CPU rank must not see a GPU (CUDA_VISIBLE_DEVICES='')"
    comm = Communicator.from_env(name="hgpu")
    yield "layout", lambda: _layout(comm, is_gpu, size)
    sub = comm.split([size - 1, 0, 1] if size >= 3 else list(range(size)))
    for label, g in (("world", comm), ("sub", sub)):
        yield from reduction_checks(g, label, device=device, dtypes=REDUCE)
        yield from movement_checks(g, label, device=device, dtypes=MOVE_DTYPES)
        yield from error_checks(g, label, device=device)
        yield from plan_checks(g, label, device=device)
    yield "cpu_tensors_on_gpu_ranks", lambda: _cpu_tensors(comm)
    yield "capture_refused", lambda: _capture_refused(comm, is_gpu)
    yield "destroy", lambda: (sub.destroy() if sub else None, comm.destroy())


def _layout(comm: Communicator, is_gpu: bool, size: int) -> None:
    hetero = comm._hetero
    assert isinstance(hetero, HeteroAdapter)
    kinds = {c.device_type: list(c.ranks) for c in comm.clusters}
    assert kinds == {"cuda": gpu_ranks(size), "cpu": [r for r in range(size) if r not in gpu_ranks(size)]}, kinds
    assert hetero.lanes.chunk > 0, "device clusters stage in chunks by default"
    if is_gpu and hetero.lanes.intra is not None:
        assert hetero.lanes.intra.adapter_name("cuda") == "nccl"


def _capture_refused(comm: Communicator, is_gpu: bool) -> None:
    """A heterogeneous op inside a CUDA graph capture raises NotSupported at once (no peer is involved)."""
    if not is_gpu:
        return
    t = torch.ones(1000, device="cuda")
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    try:
        with torch.cuda.graph(graph):
            comm.all_reduce(t)
    except NotSupported as exc:
        assert "cannot be captured in a CUDA graph" in str(exc) and "allreduce" in str(exc), exc
    else:
        raise AssertionError("a heterogeneous all_reduce was captured into a CUDA graph")
    assert not torch.cuda.is_current_stream_capturing()
    assert torch.equal(t, torch.ones_like(t)), "the refused call changed its tensor"


def _cpu_tensors(comm: Communicator) -> None:
    """CPU tensors on every rank (the CUDA ranks too) take the host path of every cluster."""
    x = torch.full((1031,), float(comm.rank + 1))
    comm.all_reduce(x)
    assert torch.equal(x, torch.full((1031,), float(sum(range(1, comm.size + 1)))))
