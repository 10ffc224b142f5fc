"""Suites for torch's parallelism stacks on backend "flagcx": DDP, FSDP2, DeviceMesh + DTensor,
functional collectives (eager and inside torch.compile)."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

import flagcx  # noqa: F401  (registers the backend)

from ..helpers.matrix import Check
from ..helpers.reference import assert_equal, make


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return make(f"x/{step}", rank, 8 * 12, torch.float32).view(8, 12), make(f"y/{step}", rank, 8 * 5, torch.float32).view(8, 5)


def _ddp(rank: int, size: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    gloo = dist.new_group(list(range(size)), backend="gloo")
    results = []
    for pg in (dist.group.WORLD, gloo):
        model = DDP(_model(0), process_group=pg, bucket_cap_mb=0.0001)  # tiny buckets: several allreduces per step
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(4):
            x, y = _batch(rank, step)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"DDP flagcx vs gloo parameters: {m}")
    # and both equal a single-process run on the concatenated batch
    ref = _model(0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(4):
        opt.zero_grad()
        loss = sum(nn.functional.mse_loss(ref(_batch(r, step)[0]), _batch(r, step)[1]) for r in range(size)) / size
        loss.backward()
        opt.step()
    for a, b in zip(results[0], ref.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"DDP vs single process: {m}")


def _fsdp2(rank: int, size: int) -> None:
    from torch.distributed.fsdp import fully_shard

    model = _model(1)
    ref = copy.deepcopy(model)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    x, y = _batch(rank, 0)
    nn.functional.mse_loss(model(x), y).backward()
    # reference: mean over ranks of each rank's gradient on the unsharded model
    for r in range(size):
        xr, yr = _batch(r, 0)
        (nn.functional.mse_loss(ref(xr), yr) / size).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        full = p.grad.full_tensor()
        torch.testing.assert_close(full, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"FSDP2 grad of {name}: {m}")


def _device_mesh(rank: int, size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    if size != 4:
        mesh = init_device_mesh("cpu", (size,), mesh_dim_names=("dp",))
        assert isinstance(mesh.get_group("dp"), flagcx.ProcessGroupFlagcx)
        return
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    for dim in ("dp", "tp"):
        assert isinstance(mesh.get_group(dim), flagcx.ProcessGroupFlagcx), type(mesh.get_group(dim))
    full = make("mesh", 0, 8 * 6, torch.float32).view(8, 6)
    dt = distribute_tensor(full, mesh, [Shard(0), Shard(1)])
    assert_equal(dt.redistribute(mesh, [Replicate(), Replicate()]).to_local(), full, "S(0),S(1) -> R,R")
    dt2 = distribute_tensor(full, mesh, [Shard(0), Replicate()])
    back = dt2.redistribute(mesh, [Shard(1), Shard(0)]).full_tensor()
    assert_equal(back, full, "S(0),R -> S(1),S(0)")
    a = distribute_tensor(make("mm_a", 0, 8 * 6, torch.float32).view(8, 6), mesh, [Replicate(), Shard(1)])
    b = distribute_tensor(make("mm_b", 0, 6 * 4, torch.float32).view(6, 4), mesh, [Replicate(), Shard(0)])
    c = torch.mm(a, b)
    assert any(isinstance(p, Partial) for p in c.placements), c.placements
    want = make("mm_a", 0, 8 * 6, torch.float32).view(8, 6) @ make("mm_b", 0, 6 * 4, torch.float32).view(6, 4)
    torch.testing.assert_close(c.redistribute(mesh, [Replicate(), Replicate()]).to_local(), want, rtol=1e-5, atol=1e-5)


def _funcol(rank: int, size: int) -> None:
    group = dist.group.WORLD
    x = make("fc", rank, 6 * size, torch.float32)
    inputs = [make("fc", r, 6 * size, torch.float32) for r in range(size)]
    total = sum(inputs)
    torch.testing.assert_close(funcol.all_reduce(x, "sum", group), total)
    torch.testing.assert_close(funcol.all_reduce(x, "avg", group), total / size)
    assert_equal(funcol.all_gather_tensor(x, 0, group), torch.cat(inputs), "funcol all_gather")
    torch.testing.assert_close(funcol.reduce_scatter_tensor(x, "sum", 0, group), total[rank * 6 : rank * 6 + 6])
    out = funcol.all_to_all_single(x, None, None, group)
    assert_equal(out, torch.cat([inputs[r][rank * 6 : rank * 6 + 6] for r in range(size)]), "funcol all_to_all_single")
    assert_equal(funcol.broadcast(x, 0, group), inputs[0], "funcol broadcast")


def _compiled(rank: int, size: int, backend: str) -> None:
    group = dist.group.WORLD

    def step(t: torch.Tensor) -> torch.Tensor:
        g = funcol.all_gather_tensor(t * 2, 0, group)
        r = funcol.reduce_scatter_tensor(g, "sum", 0, group)
        return funcol.all_reduce(r + 1, "avg", group)

    x = make("compile", rank, 4 * size, torch.float32)
    fn = torch.compile(step, backend=backend, fullgraph=True)
    eager = step(x)
    got = fn(x)
    torch.testing.assert_close(got, eager)
    inputs = [make("compile", r, 4 * size, torch.float32) for r in range(size)]
    gathered = torch.cat([2 * t for t in inputs])  # identical on every rank
    blocks = size * gathered.view(size, -1)  # reduce_scatter(sum) of identical inputs: rank r gets size * block r
    want = (blocks + 1).mean(0)  # all_reduce(avg) of each rank's block + 1
    torch.testing.assert_close(eager, want, rtol=1e-5, atol=1e-5)


def _inplace_compiled(rank: int, size: int) -> None:
    def step(t: torch.Tensor) -> torch.Tensor:
        t = t * 3
        dist.all_reduce(t)
        return t

    x = torch.full((5,), float(rank + 1))
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
    assert_equal(got, torch.full((5,), 3.0 * size * (size + 1) / 2), "dynamo-rewritten dist.all_reduce")


def integration(rank: int, size: int) -> Iterable[Check]:
    """Suite: DDP, FSDP2, DeviceMesh/DTensor, funcol, torch.compile on backend flagcx."""
    dist.init_process_group("flagcx")
    yield "ddp", lambda: _ddp(rank, size)
    yield "fsdp2", lambda: _fsdp2(rank, size)
    yield "device_mesh_dtensor", lambda: _device_mesh(rank, size)
    yield "funcol", lambda: _funcol(rank, size)
    yield "compile_aot_eager", lambda: _compiled(rank, size, "aot_eager")
    yield "compile_inductor", lambda: _compiled(rank, size, "inductor")
    yield "compile_inplace_all_reduce", lambda: _inplace_compiled(rank, size)
    yield "destroy", dist.destroy_process_group
