"""GPU suites (2+ CUDA devices): the correctness matrix on CUDA tensors through the core and
NCCL, stream/async semantics, CUDA-graph capture, and the torch backend on CUDA (DDP
identical to ProcessGroupNCCL, subgroups through ncclCommSplit)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from flagcx import Communicator

from ..helpers.matrix import Check, error_checks, movement_checks, reduction_checks
from ..helpers.reference import FLOATS, INTS, assert_equal, make, reduce_ref

CUDA_REDUCE_DTYPES = FLOATS + INTS + [torch.bool]
CUDA_MOVE_DTYPES = CUDA_REDUCE_DTYPES + [torch.complex64]


def _device(rank: int) -> torch.device:
    torch.cuda.set_device(rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def gpu_comm_matrix(rank: int, size: int) -> Iterable[Check]:
    """Suite: every op x dtype x reduce op on CUDA tensors, world and an NCCL-split subgroup."""
    dev = _device(rank)
    comm = Communicator.from_env(name="gpu")
    comm.connect(dev)
    yield "adapter_is_nccl", lambda: _expect(comm.adapter_name(dev) == "nccl", comm.adapter_name(dev))
    sub = comm.split(list(reversed(range(size))))
    yield "split_uses_nccl_split", lambda: _expect(sub is not None and "cuda" in sub._adapters, "child has no split NCCL adapter")
    for label, g in (("world", comm), ("sub", sub)):
        yield from reduction_checks(g, label, device="cuda", dtypes=CUDA_REDUCE_DTYPES)
        yield from movement_checks(g, label, device="cuda", dtypes=CUDA_MOVE_DTYPES)
        yield from error_checks(g, label, device="cuda")
    yield "async_side_stream", lambda: _async_streams(comm, dev)
    yield "cuda_graph", lambda: _graph(comm, dev)
    yield "destroy", lambda: (sub.destroy(), comm.destroy())


def _expect(cond: bool, what: str) -> None:
    assert cond, what


def _async_streams(comm: Communicator, dev: torch.device) -> None:
    """Async ops run on a side stream; wait() orders the caller's stream, and the result is right."""
    size, rank = comm.size, comm.rank
    for n in (1, 4099, 1 << 20):
        x = make(f"async/{n}", rank, n, torch.float32, device="cuda")
        y = x * 1  # produced on the current stream just before the op: the side stream must wait for it
        work = comm.all_reduce(y, async_op=True)
        z = torch.empty_like(y)
        work.wait()  # no host block: the current stream waits for the side stream's event
        z.copy_(y)
        torch.cuda.synchronize()
        want = reduce_ref([make(f"async/{n}", r, n, torch.float32) for r in range(size)], "sum")
        assert_equal(z, want, f"async all_reduce n={n}", True)
    # a non-default caller stream
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        t = torch.full((1000,), float(rank + 1), device=dev)
        comm.all_reduce(t)
        got = t.clone()
    s.synchronize()
    assert_equal(got, torch.full((1000,), float(size * (size + 1) // 2)), "all_reduce on a user stream")


def _graph(comm: Communicator, dev: torch.device) -> None:
    """allreduce / allgather / reducescatter captured in one CUDA graph and replayed on new data."""
    size, rank = comm.size, comm.rank
    n = 3001
    x = torch.zeros(n, device=dev)
    ag_out = torch.zeros(n * size, device=dev)
    rs_in = torch.zeros(n * size, device=dev)
    rs_out = torch.zeros(n, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside capture
        for _ in range(2):
            comm.all_reduce(x)
            comm.all_gather(ag_out, x)
            comm.reduce_scatter(rs_out, rs_in)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        comm.all_reduce(x)
        comm.all_gather(ag_out, x)
        comm.reduce_scatter(rs_out, rs_in)
    for it in range(3):
        inputs = [make(f"graph/{it}", r, n, torch.float32) for r in range(size)]
        big = [make(f"graph_rs/{it}", r, n * size, torch.float32) for r in range(size)]
        x.copy_(inputs[rank])
        rs_in.copy_(big[rank])
        graph.replay()
        torch.cuda.synchronize()
        total = reduce_ref(inputs, "sum")
        assert_equal(x, total, f"graph all_reduce replay {it}", True)
        assert_equal(ag_out, torch.cat([total] * size), f"graph all_gather replay {it}", True)
        assert_equal(rs_out, reduce_ref(big, "sum")[rank * n : (rank + 1) * n], f"graph reduce_scatter replay {it}", True)


def gpu_torch(rank: int, size: int) -> Iterable[Check]:
    """Suite: backend "flagcx" with CUDA tensors (eager connect via device_id, NCCL-split subgroups, DDP vs NCCL)."""
    dev = _device(rank)
    dist.init_process_group(os.environ.get("FLAGCX_TEST_BACKEND", "flagcx"), device_id=dev)
    world = dist.group.WORLD
    yield "bound_device", lambda: _expect(world.bound_device_id == dev, f"bound_device_id {world.bound_device_id}")
    yield "ops", lambda: _torch_ops(world, list(range(size)), dev)
    sub = dist.new_group(list(range(size)))
    yield "new_group_split", lambda: _expect("cuda" in sub.comm._adapters, "new_group did not split the NCCL communicator")
    yield "sub_ops", lambda: _torch_ops(sub, list(range(size)), dev)
    yield "cpu_tensors_same_group", lambda: _cpu_in_gpu_group(world, size)
    yield "destroy", dist.destroy_process_group


def gpu_ddp(rank: int, size: int) -> Iterable[Check]:
    """Suite: no bound device (so torch builds a plain NCCL group beside ours): DDP identical to NCCL."""
    dev = _device(rank)
    dist.init_process_group(os.environ.get("FLAGCX_TEST_BACKEND", "flagcx"))
    yield "ops", lambda: _torch_ops(dist.group.WORLD, list(range(size)), dev)
    yield "ddp_vs_nccl", lambda: _ddp_vs_nccl(rank, size, dev)
    yield "cpu_tensors_same_group", lambda: _cpu_in_gpu_group(dist.group.WORLD, size)
    yield "destroy", dist.destroy_process_group


def _torch_ops(pg, ranks: list[int], dev: torch.device) -> None:
    size = len(ranks)
    rank = ranks.index(dist.get_rank())
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int8):
        for name, op in (("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX), ("avg", dist.ReduceOp.AVG)):
            for async_op in (False, True):
                inputs = [make(f"t/{dtype}/{name}", r, 1031, dtype, name, device="cuda") for r in range(size)]
                x = inputs[rank].clone()
                w = dist.all_reduce(x, op=op, group=pg, async_op=async_op)
                if async_op:
                    w.wait()
                torch.cuda.synchronize()
                assert_equal(x, reduce_ref([i.cpu() for i in inputs], name), f"all_reduce {dtype} {name} async={async_op}", True)
    inputs = [make("ag", r, 777, torch.float32, device="cuda") for r in range(size)]
    out = torch.empty(777 * size, device=dev)
    dist.all_gather_into_tensor(out, inputs[rank], group=pg)
    assert_equal(out, torch.cat(inputs), "all_gather_into_tensor")
    outs = [torch.empty(777, device=dev) for _ in range(size)]
    dist.all_gather(outs, inputs[rank], group=pg)
    assert_equal(torch.cat(outs), torch.cat(inputs), "all_gather list")
    big = [make("rs", r, 555 * size, torch.float32, device="cuda") for r in range(size)]
    rs = torch.empty(555, device=dev)
    dist.reduce_scatter_tensor(rs, big[rank], group=pg)
    assert_equal(rs, reduce_ref([b.cpu() for b in big], "sum")[rank * 555 : (rank + 1) * 555], "reduce_scatter_tensor", True)
    b = make("bc", 0, 999, torch.int64, device="cuda") if rank == 0 else torch.zeros(999, dtype=torch.int64, device=dev)
    dist.broadcast(b, ranks[0], group=pg)
    assert_equal(b, make("bc", 0, 999, torch.int64), "broadcast")
    rows = lambda s, d: (s + 2 * d) % 3 + 1  # noqa: E731
    src = make(f"a2a/{rank}", 0, 2 * sum(rows(rank, d) for d in range(size)), torch.float32, device="cuda").view(-1, 2)
    a2a = torch.empty(sum(rows(s, rank) for s in range(size)), 2, device=dev)
    dist.all_to_all_single(a2a, src, [rows(s, rank) for s in range(size)], [rows(rank, d) for d in range(size)], group=pg)
    parts = []
    for s in range(size):
        theirs = make(f"a2a/{s}", 0, 2 * sum(rows(s, d) for d in range(size)), torch.float32).view(-1, 2)
        start = sum(rows(s, d) for d in range(rank))
        parts.append(theirs[start : start + rows(s, rank)])
    assert_equal(a2a, torch.cat(parts), "all_to_all_single uneven")
    nxt, prv = ranks[(rank + 1) % size], ranks[(rank - 1) % size]
    mine = make("p2p", rank, 100003, torch.float32, device="cuda")
    got = torch.empty(100003, device=dev)
    for req in dist.batch_isend_irecv([dist.P2POp(dist.isend, mine, nxt, pg), dist.P2POp(dist.irecv, got, prv, pg)]):
        req.wait()
    assert_equal(got, make("p2p", (rank - 1) % size, 100003, torch.float32), "batch_isend_irecv ring")
    dist.barrier(group=pg)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).cuda()


def _ddp_vs_nccl(rank: int, size: int, dev: torch.device) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    nccl = dist.new_group(list(range(size)), backend="nccl")
    params = []
    for pg in (dist.group.WORLD, nccl):
        model = DDP(_model(0), device_ids=[dev.index], process_group=pg, bucket_cap_mb=0.01)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(5):
            x = make(f"ddp_x/{step}", rank, 32 * 64, torch.float32, device="cuda").view(32, 64)
            y = make(f"ddp_y/{step}", rank, 32 * 10, torch.float32, device="cuda").view(32, 10)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        torch.cuda.synchronize()
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"DDP flagcx vs NCCL: {m}")


def _cpu_in_gpu_group(pg, size: int) -> None:
    t = torch.ones(5)
    dist.all_reduce(t, group=pg)
    assert_equal(t, torch.full((5,), float(size)), "CPU tensor through the same group")
    objs = [None] * size
    dist.all_gather_object(objs, dist.get_rank(), group=pg)
    assert objs == list(range(size))
