"""Drop-in checks for users of the C++ FlagCX torch plugin (same import and backend name).

FlagCX's own torch example (``plugin/torch/example/example.py`` in flagos-ai/FlagCX)
initialises ``"cpu:gloo,<dev>:flagcx"``, creates two more groups with that string,
probes ``flagcx._C`` for backend Options, then runs every collective, the coalescing
manager (sync and async), ``batch_isend_irecv`` rings and send/recv on them. These
checks make the same calls, in the same forms, and compare every result with an exact
reference, on CPU tensors and (when a GPU is present) on the rank's CUDA device.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

import flagcx

from ..helpers.matrix import Check


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()))
    return devices


def _eq(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(got.cpu(), want.cpu()), f"got {got.tolist()}, expected {want.tolist()}"


def compat(rank: int, size: int) -> Iterable[Check]:
    string = "cpu:gloo,cuda:flagcx"
    dist.init_process_group(string)
    ranks = list(range(size))
    g1 = dist.new_group(ranks=ranks, backend=string)
    g2 = dist.new_group(ranks=ranks, backend=string)
    prev, nxt = (rank - 1) % size, (rank + 1) % size
    arange = torch.arange(size, dtype=torch.float32)

    def identity() -> None:
        assert flagcx._C is None, "flagcx has no compiled torch extension; FlagCX's example reads flagcx._C to find backend Options"
        assert dist.get_backend_config() == string, dist.get_backend_config()
        assert dist.get_process_group_ranks(g1) == ranks
        assert isinstance(g1, flagcx.ProcessGroupFlagcx) and isinstance(g2, flagcx.ProcessGroupFlagcx)

    yield "identity", identity

    for dev in _devices():

        def ones(v: float, n: int = size, d=dev) -> torch.Tensor:
            return torch.full((n,), float(v), device=d)

        def broadcast(d=dev) -> None:
            x = ones(rank, d=d)
            dist.broadcast(x, 0, group=g2)
            _eq(x, ones(0))

        def reduce(d=dev) -> None:
            x = arange.to(d).clone()
            dist.reduce(x, 0, op=dist.ReduceOp.SUM, group=g1)
            _eq(x, arange * size if rank == 0 else arange)

        def allreduce(d=dev) -> None:
            x, y = ones(rank, d=d), ones(rank + 1, d=d)
            dist.all_reduce(x, op=dist.ReduceOp.MIN, group=g1)
            dist.all_reduce(y, op=dist.ReduceOp.MAX, group=g1)
            _eq(x, ones(0))
            _eq(y, ones(size))
            with dist._coalescing_manager(group=g1):
                dist.all_reduce(x, op=dist.ReduceOp.SUM, group=g1)
                dist.all_reduce(y, op=dist.ReduceOp.SUM, group=g1)
            _eq(x, ones(0))
            _eq(y, ones(size * size))
            with dist._coalescing_manager(group=g1, async_ops=True) as cm:
                dist.all_reduce(x, op=dist.ReduceOp.SUM, group=g1)
                dist.all_reduce(y, op=dist.ReduceOp.SUM, group=g1)
            cm.wait()
            _eq(y, ones(size**3))

        def sendrecv(d=dev) -> None:
            x, y = ones(rank, d=d), ones(-1, d=d)
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, nxt, group=g2), dist.P2POp(dist.irecv, y, prev, group=g2)])
            for req in reqs:
                req.wait()
            _eq(y, ones(prev))
            y.fill_(-1)
            if size > 1 and rank % 2 == 0:
                dist.send(x, nxt, group=g2)
                dist.recv(y, prev, group=g2)
            elif size > 1:
                dist.recv(y, prev, group=g2)
                dist.send(x, nxt, group=g2)
            dist.barrier(group=g2, async_op=True).wait()
            if size > 1 and size % 2 == 0:
                _eq(y, ones(prev))

        def allgather(d=dev) -> None:
            z = ones(rank, 1, d=d)
            y = ones(-1, d=d)
            dist.all_gather_into_tensor(y, z, group=g1)
            _eq(y, arange)
            z_list = list(torch.chunk(ones(-1, d=d), size))
            dist.all_gather(z_list, z, group=g1)
            _eq(torch.cat(z_list), arange)
            infos: list = [None] * size
            dist.all_gather_object(infos, [rank, rank + 1], group=g1)
            assert infos == [[r, r + 1] for r in ranks], infos
            z1 = ones(rank * 10, 1, d=d)
            x, y = ones(-1, d=d), ones(-1, d=d)
            for async_ops in (False, True):
                with dist._coalescing_manager(group=g1, async_ops=async_ops) as cm:
                    dist.all_gather_into_tensor(x, z1, group=g1)
                    dist.all_gather_into_tensor(y, z, group=g1)
                if async_ops:
                    cm.wait()
                _eq(x, arange * 10)
                _eq(y, arange)

        def reducescatter(d=dev) -> None:
            z = ones(0, 1, d=d)
            dist.reduce_scatter(z, list(torch.chunk(arange.to(d), size)), op=dist.ReduceOp.SUM, group=g1)
            _eq(z, ones(rank * size, 1))
            dist.reduce_scatter_tensor(z, ones(rank, d=d), op=dist.ReduceOp.MAX, group=g1)
            _eq(z, ones(size - 1, 1))
            z1 = ones(0, 1, d=d)
            for async_ops in (False, True):
                with dist._coalescing_manager(group=g1, async_ops=async_ops) as cm:
                    dist.reduce_scatter_tensor(z, arange.to(d), op=dist.ReduceOp.SUM, group=g1)
                    dist.reduce_scatter_tensor(z1, ones(rank, d=d), op=dist.ReduceOp.SUM, group=g1)
                if async_ops:
                    cm.wait()
                _eq(z, ones(rank * size, 1))
                _eq(z1, ones(size * (size - 1) // 2, 1))

        def gather_scatter(d=dev) -> None:
            z = ones(rank, 1, d=d)
            x_list = list(torch.chunk(ones(-1, d=d), size))
            dist.gather(z, x_list if rank == 0 else None, 0, group=g1, async_op=True).wait()
            if rank == 0:
                _eq(torch.cat(x_list), arange)
            z.fill_(-1)
            dist.scatter(z, list(torch.chunk(arange.to(d), size)) if rank == 0 else None, 0, group=g2)
            _eq(z, ones(rank, 1))

        def alltoall(d=dev) -> None:
            x = ones(rank, d=d)
            list_y = list(torch.chunk(ones(0, d=d), size))
            dist.all_to_all(list_y, list(torch.chunk(x, size)), group=g1)
            _eq(torch.cat(list_y), arange)
            y = ones(0, d=d)
            dist.all_to_all_single(y, x, group=g1, async_op=True).wait()
            _eq(y, arange)
            # FlagCX's uneven form: even ranks exchange 2 rows with even ranks, odd with odd.
            splits = [2 if i % 2 == rank % 2 else 0 for i in ranks]
            x2, y2 = ones(rank, 2 * size, d=d), ones(-1, 2 * size, d=d)
            peers = [i for i in ranks if i % 2 == rank % 2]
            x2 = x2[: 2 * len(peers)].contiguous()
            y2 = y2[: 2 * len(peers)].contiguous()
            dist.all_to_all_single(y2, x2, splits, splits, group=g1)
            _eq(y2, torch.tensor([float(p) for p in peers for _ in range(2)]))

        for check in (broadcast, reduce, allreduce, sendrecv, allgather, reducescatter, gather_scatter, alltoall):
            yield f"{dev.type}/{check.__name__}", check
    yield "destroy", dist.destroy_process_group
