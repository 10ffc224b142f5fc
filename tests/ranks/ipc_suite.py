"""Rank side of tests/test_ipc_allreduce.py: the peer-mapped allreduce on CUDA, eager and in CUDA graphs.

Every rank uses cuda:0 (CUDA IPC maps buffers between processes on one device too), so
2 and 4 ranks run on the one lent GPU; results are compared bit for bit with a float32
sum in rank order, the order the kernels add in.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

from flagcx.adapters import AdapterContext
from flagcx.adapters.nccl.ipc_allreduce import DTYPES, TWO_SHOT_MAX, open_ipc_allreduce
from flagcx.bootstrap import store_from_env

from ..helpers.matrix import Check
from ..helpers.reference import make


def _expected(xs: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    acc = torch.zeros(xs[0].numel(), dtype=torch.float32)
    for x in xs:
        acc += x.cpu().float()
    return acc.to(dtype)


def _counts(dtype: torch.dtype) -> list[int]:
    """Element counts from 4 bytes to the path's largest size, odd ones among them."""
    esize = torch.empty(0, dtype=dtype).element_size()
    top = TWO_SHOT_MAX // esize
    return sorted({max(1, 4 // esize), 3, 257, 1023, 4097, 65537, top // 4 + 1, top - 3, top})


def ipc_suite(rank: int, size: int) -> Iterable[Check]:
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    timeout = float(os.environ["FLAGCX_TIMEOUT"])
    store = dist.PrefixStore("ipc-test/", store_from_env(timeout))
    ctx = AdapterContext(store=store, rank=rank, size=size, timeout=timeout, device=dev, label="ipc-test", global_ranks=list(range(size)))
    engine = open_ipc_allreduce(ctx, True)

    def mapped() -> None:
        assert engine is not None, "the ranks did not map each other's buffers (see the log)"

    yield "mapped", mapped
    if engine is None:
        return

    def eager(dtype: torch.dtype, plan: str) -> None:
        for n in _counts(dtype):
            xs = [make(f"ipc/{plan}", r, n, dtype, "sum", "cuda") for r in range(size)]
            out = torch.empty_like(xs[rank])
            engine.allreduce(xs[rank], out, plan)
            torch.cuda.synchronize()
            want = _expected(xs, dtype)
            assert torch.equal(out.cpu(), want), f"{plan} {dtype} n={n}: max error {(out.cpu().float() - want.float()).abs().max()}"
            x = xs[rank].clone()
            engine.allreduce(x, x, plan)  # in place
            torch.cuda.synchronize()
            assert torch.equal(x.cpu(), want), f"{plan} {dtype} n={n} in place"

    def graph(dtype: torch.dtype, plan: str) -> None:
        n = 4097 if plan == "one_shot" else 65537
        static = torch.zeros(n, dtype=dtype, device=dev)
        out = torch.empty_like(static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (Triton compiles here)
            engine.allreduce(static, out, plan)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            engine.allreduce(static, out, plan)
        for replay in range(3):
            xs = [make(f"ipc/graph/{plan}/{replay}", r, n, dtype, "sum", "cuda") for r in range(size)]
            static.copy_(xs[rank])
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(out.cpu(), _expected(xs, dtype)), f"graph {plan} {dtype} replay {replay}"

    for dtype in DTYPES:
        for plan in ("one_shot", "two_shot"):
            yield f"eager/{plan}/{dtype}", lambda d=dtype, p=plan: eager(d, p)
            yield f"graph/{plan}/{dtype}", lambda d=dtype, p=plan: graph(d, p)
    yield "close", engine.close
