"""Suites for the torch_pg adapter (a torch.distributed c10d backend as a flagcx transport).

``hetero_vendor``: ranks labelled into two clusters, one whose CPU transport is
torch_pg over Gloo (FLAGCX_VENDOR_BACKEND=cpu:gloo) and one on shm; the matrix runs
on the heterogeneous world, then, on sub-communicators over every rank, c10d backends
registered the way vendors' extensions register theirs (extended API or not), a
backend that lacks ops, an unregistered one, and a backend string naming a vendor
device type. ``gpu_vendor_matrix``: the CUDA matrix of tests.ranks.gpu_suite with NCCL
reached as if it were a vendor's c10d backend (FLAGCX_VENDOR_BACKEND=cuda:nccl).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroupGloo

import flagcx
from flagcx import Communicator, FlagcxError, NotSupported
from flagcx.adapters.torch_pg import DEFAULT_TRAITS, BackendTraits, declare_backend

from ..helpers.harness import with_cpu_adapter
from ..helpers.matrix import Check, error_checks, expect_error, movement_checks, reduction_checks
from ..helpers.reference import assert_equal, make, reduce_ref
from .hetero_suite import plan_checks, shm_usable

SHM = "shm" if shm_usable() else "gloo"
SMALL = [0, 13, 1031]
created: dict[str, list] = {}
"""Options each test creator was called with, by backend name."""


def vendor_env(labels: str):
    """Per-rank env: cluster ``labels[r]``; cluster A on torch_pg(gloo), cluster B on shm."""

    def env(rank: int) -> dict:
        label = labels[rank]
        out = {"FLAGCX_CLUSTER_ID": f"cl-{label}", "HETERO_LABELS": labels}
        if label == "A":
            out["FLAGCX_VENDOR_BACKEND"] = "cpu:gloo"
        else:
            out["FLAGCX_CPU_ADAPTER"] = SHM
        return out

    return env


# ---------------------------------------------------------------- test c10d backends, registered like a vendor's
def _extended_creator(opts, backend_options):
    created.setdefault("vendorx", []).append((opts.group_id, list(opts.global_ranks_in_group), backend_options))
    return ProcessGroupGloo(opts.store, opts.group_rank, opts.group_size, opts.timeout)


def _plain_creator(store, rank, size, timeout):
    created.setdefault("vendory", []).append((rank, size, timeout))
    return ProcessGroupGloo(store, rank, size, timeout)


class _AllreduceOnly(dist.ProcessGroup):
    """A c10d backend that implements allreduce only (over an inner Gloo): every other op is refused."""

    def __init__(self, store, rank: int, size: int, timeout: timedelta) -> None:
        super().__init__(rank, size)
        self._inner = ProcessGroupGloo(store, rank, size, timeout)

    def allreduce(self, tensors, opts=None):
        return self._inner.allreduce(tensors, opts)


def register_test_backends() -> None:
    """c10d backends "vendorx" (extended API), "vendory" (plain API) and "partialpg" (allreduce only), all CPU."""
    if "VENDORX" not in dist.Backend._plugins:
        dist.Backend.register_backend("vendorx", _extended_creator, extended_api=True, devices=["cpu"])
        dist.Backend.register_backend("vendory", _plain_creator, devices=["cpu"])
        dist.Backend.register_backend("partialpg", _AllreduceOnly, devices=["cpu"])


# ---------------------------------------------------------------- checks
def _layout(comm: Communicator, labels: str) -> None:
    hetero = comm._hetero
    assert hetero is not None, "expected a heterogeneous communicator"
    assert {c.label: list(c.ranks) for c in comm.clusters} == {f"cl-{x}": [r for r, y in enumerate(labels) if y == x] for x in sorted(set(labels))}
    mine = labels[comm.rank]
    want = "torch_pg:gloo" if mine == "A" else SHM
    got = hetero.lanes.intra.adapter_name("cpu")
    assert got == want, f"cluster {mine} runs its intra traffic on {got}, expected {want}"


def _basic_ops(g: Communicator, label: str) -> None:
    """Data moves through the wrapped backend: reductions in the declared dtypes, movement, p2p ring, in every size of SMALL."""
    size, rank = g.size, g.rank
    for n in SMALL:
        for dtype, op in ((torch.float32, "sum"), (torch.int32, "max"), (torch.bfloat16, "min"), (torch.float16, "prod")):
            inputs = [make(f"{label}/ar/{n}/{op}", r, n, dtype, op) for r in range(size)]
            x = inputs[rank].clone()
            g.all_reduce(x, op)
            assert_equal(x, reduce_ref(inputs, op), f"{label} all_reduce {dtype} {op} n={n}", True)
        blocks = [make(f"{label}/ag/{n}", r, n, torch.float64) for r in range(size)]
        out = torch.empty(n * size, dtype=torch.float64)
        g.all_gather(out, blocks[rank])
        assert_equal(out, torch.cat(blocks), f"{label} all_gather n={n}")
        big = [make(f"{label}/rs/{n}", r, n * size, torch.float32, "sum") for r in range(size)]
        rs = torch.empty(n, dtype=torch.float32)
        g.reduce_scatter(rs, big[rank].clone())
        assert_equal(rs, reduce_ref(big, "sum")[rank * n : (rank + 1) * n], f"{label} reduce_scatter n={n}", True)
        src = make(f"{label}/bc/{n}", size - 1, n, torch.int64)
        y = src.clone() if rank == size - 1 else torch.zeros(n, dtype=torch.int64)
        g.broadcast(y, size - 1)
        assert_equal(y, src, f"{label} broadcast n={n}")
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    got = torch.empty(1031)
    w = g.recv(got, prv, async_op=True)
    g.send(make(f"{label}/p2p", rank, 1031, torch.float32), nxt, async_op=True).wait()
    w.wait()
    assert_equal(got, make(f"{label}/p2p", prv, 1031, torch.float32), f"{label} ring send/recv")


def _extended_plugin(comm: Communicator) -> None:
    sub = with_cpu_adapter(comm, "vendorx", "torch_pg:vendorx")
    adapter = sub._adapter(torch.device("cpu"), "check")
    assert adapter.name == "torch_pg:vendorx", adapter.name
    group_id, ranks, backend_options = created["vendorx"][-1]
    assert group_id == f"{sub.name}/torch_pg" and ranks == list(range(comm.size)) and backend_options is None, created["vendorx"]
    caps = adapter.capabilities
    assert caps.reduce_dtypes == DEFAULT_TRAITS.reduce_dtypes and not caps.any_source and not caps.stream_ordered
    _basic_ops(sub, "vendorx")
    expect_error(NotSupported, lambda: sub.all_reduce(torch.ones(3, dtype=torch.int64)), "torch_pg:vendorx", "int64")
    expect_error(NotSupported, lambda: sub.recv(torch.empty(1), None), "any source")
    sub.destroy()


def _declared_plugin(comm: Communicator) -> None:
    """declare_backend widens what the adapter declares (int64 reductions, any-source receive)."""
    declare_backend("vendorx", BackendTraits(DEFAULT_TRAITS.reduce_dtypes | {torch.int64}, DEFAULT_TRAITS.reduce_ops, any_source=True))
    sub = with_cpu_adapter(comm, "vendorx-declared", "torch_pg:vendorx")
    inputs = [make("declared/i64", r, 77, torch.int64, "sum") for r in range(comm.size)]
    x = inputs[comm.rank].clone()
    sub.all_reduce(x)
    assert_equal(x, reduce_ref(inputs, "sum"), "declared int64 all_reduce", True)
    if sub.rank == 1:
        sub.send(torch.full((4,), 7.0), 0)
    elif sub.rank == 0:
        y = torch.empty(4)
        assert sub.recv(y, None) == 1
        assert_equal(y, torch.full((4,), 7.0), "any-source recv")
    sub.destroy()


def _plain_plugin(comm: Communicator) -> None:
    sub = with_cpu_adapter(comm, "vendory", "torch_pg:vendory")
    rank, size, timeout = created["vendory"][-1]
    assert (rank, size) == (comm.rank, comm.size) and timeout == timedelta(seconds=sub.timeout), created["vendory"]
    x = torch.full((5,), float(comm.rank + 1))
    sub.all_reduce(x)
    assert_equal(x, torch.full((5,), float(comm.size * (comm.size + 1) // 2)), "plain-API plugin all_reduce")
    sub.destroy()


def _lacking_backend(comm: Communicator) -> None:
    """Ops the backend does not implement raise NotSupported naming backend and op; the communicator keeps working."""
    sub = with_cpu_adapter(comm, "partial", "torch_pg:partialpg")
    x = torch.ones(6)
    expect_error(NotSupported, lambda: sub.all_gather(torch.empty(6 * comm.size), x), "'partialpg'", "allgather")
    out = torch.empty(6 * comm.size) if comm.rank == 0 else None
    expect_error(NotSupported, lambda: sub.gather(x, out, 0), "'partialpg'", "gather")
    expect_error(NotSupported, lambda: sub.barrier(), "'partialpg'", "barrier")
    sub.all_reduce(x)
    assert_equal(x, torch.full((6,), float(comm.size)), "all_reduce after refusals")
    sub.destroy()


def _unregistered(comm: Communicator) -> None:
    expect_error(FlagcxError, lambda: with_cpu_adapter(comm, "none", "torch_pg:nosuchccl"), "'nosuchccl' is not registered", "torch extension")


def _vendor_backend_string(comm: Communicator) -> None:
    """init_process_group parses a backend string naming a vendor device type and routes CPU tensors through flagcx."""
    store = dist.PrefixStore("pg/", comm._store)
    dist.init_process_group("cpu:gloo,npu:flagcx", store=store, rank=comm.rank, world_size=comm.size)
    try:
        assert isinstance(dist.group.WORLD, flagcx.ProcessGroupFlagcx), dist.group.WORLD
        x = torch.full((9,), float(comm.rank))
        dist.all_reduce(x)
        assert_equal(x, torch.full((9,), float(sum(range(comm.size)))), "all_reduce on 'cpu:gloo,npu:flagcx'")
    finally:
        dist.destroy_process_group()


def hetero_vendor(rank: int, size: int) -> Iterable[Check]:
    """Suite (env from vendor_env): torch_pg(gloo) as one cluster of a heterogeneous communicator, then c10d-plugin checks."""
    register_test_backends()
    labels = os.environ["HETERO_LABELS"]
    comm = Communicator.from_env(name="vendor")
    yield "layout", lambda: _layout(comm, labels)
    yield from reduction_checks(comm, "world", dtypes=[torch.float32, torch.int64, torch.bool], sizes=SMALL)
    yield from movement_checks(comm, "world", dtypes=[torch.float16], sizes=SMALL)
    yield from error_checks(comm, "world")
    yield from plan_checks(comm, "world")
    yield "c10d_plugin_extended_api", lambda: _extended_plugin(comm)
    yield "c10d_plugin_declared", lambda: _declared_plugin(comm)
    yield "c10d_plugin_plain_api", lambda: _plain_plugin(comm)
    yield "c10d_backend_lacking_ops", lambda: _lacking_backend(comm)
    yield "c10d_backend_unregistered", lambda: _unregistered(comm)
    yield "backend_string_vendor_device", lambda: _vendor_backend_string(comm)
    yield "destroy", comm.destroy


def gpu_vendor_matrix(rank: int, size: int) -> Iterable[Check]:
    """Suite (FLAGCX_VENDOR_BACKEND=cuda:nccl): tests.ranks.gpu_suite's CUDA matrix through torch_pg over ProcessGroupNCCL."""
    from .gpu_suite import CUDA_MOVE_DTYPES, CUDA_REDUCE_DTYPES, _async_streams, _device, _graph

    dev = _device(rank)
    comm = Communicator.from_env(name="gpu-vendor")
    comm.connect(dev)
    yield "adapter_is_torch_pg_nccl", lambda: _expect_name(comm, dev)
    sub = comm.split(list(reversed(range(size))))
    for label, g in (("world", comm), ("sub", sub)):
        yield from reduction_checks(g, label, device="cuda", dtypes=CUDA_REDUCE_DTYPES)
        yield from movement_checks(g, label, device="cuda", dtypes=CUDA_MOVE_DTYPES)
        yield from error_checks(g, label, device="cuda")
    yield "sub_uses_torch_pg", lambda: _expect_name(sub, dev)
    yield "async_side_stream", lambda: _async_streams(comm, dev)
    yield "cuda_graph", lambda: _graph(comm, dev)
    yield "destroy", lambda: (sub.destroy(), comm.destroy())


def _expect_name(comm: Communicator, dev: torch.device) -> None:
    adapter = comm._adapter(dev, "check")
    assert adapter.name == "torch_pg:nccl" and adapter.capabilities.stream_ordered, (adapter.name, adapter.capabilities)
