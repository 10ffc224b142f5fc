"""Suites for heterogeneous communicators: ranks labelled into clusters (FLAGCX_CLUSTER_ID) on different CPU adapters.

``cluster_env(labels, adapters, chunk)`` gives the per-rank environment; the suites run
the shared correctness matrix (tests.helpers.matrix) on the world communicator and on a
subgroup that spans clusters, plus checks of the plan itself (cluster layout, chunked
transfers, rooted ops from every rank, uneven alltoallv with empty blocks).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Optional

import torch
import torch.distributed as dist

from flagcx import Communicator, NotSupported
from flagcx.adapters import adapter_class
from flagcx.hetero import HeteroAdapter

from ..helpers.harness import flagcx_env
from ..helpers.matrix import Check, error_checks, movement_checks, reduction_checks, subgroup_ranks
from ..helpers.reference import assert_equal, make, reduce_ref


def shm_usable() -> bool:
    """Whether the shm adapter can run here (it is optional: a C build)."""
    try:
        return adapter_class("shm").unavailable_reason(torch.device("cpu")) is None
    except Exception:
        return False


def cluster_env(labels: str, adapters: Mapping[str, str], chunk: Optional[str] = None, lanes: int = 0) -> Callable[[int], dict]:
    """Per-rank env: rank r gets cluster ``labels[r]`` and that cluster's CPU adapter (plus staging chunk / lanes).

    The ranks see no GPU (CUDA_VISIBLE_DEVICES=""): these clusters are CPU clusters by
    label, also on a GPU machine (where every rank would otherwise open NCCL on one device).
    """

    def env(rank: int) -> dict:
        out = {"FLAGCX_CLUSTER_ID": f"cl-{labels[rank]}", "FLAGCX_CPU_ADAPTER": adapters[labels[rank]], "CUDA_VISIBLE_DEVICES": ""}
        if chunk:
            out["FLAGCX_HETERO_CHUNK"] = chunk
        if lanes:
            out["FLAGCX_HETERO_LANES"] = str(lanes)
        return out

    return env


def _layout(comm: Communicator, labels: str) -> None:
    hetero = comm._hetero
    assert isinstance(hetero, HeteroAdapter), f"expected a heterogeneous communicator, got {comm._adapter(torch.device('cpu'), 'x')}"
    expected: dict[str, list[int]] = {}
    for r, label in enumerate(labels):
        expected.setdefault(f"cl-{label}", []).append(r)
    got = {c.label: list(c.ranks) for c in comm.clusters}
    assert got == expected, f"clusters {got} != {expected}"
    assert comm.adapter_name("cpu") == "hetero"
    assert not hetero.capabilities.stream_ordered
    assert hetero.layout.m == min(len(v) for v in expected.values())


def _rooted_everywhere(g: Communicator, label: str, device: str = "cpu") -> None:
    """broadcast / reduce / gather / scatter with every rank as root, n not divisible by anything."""
    n = 37
    for root in range(g.size):
        src = make(f"{label}/bc-all", root, n, torch.int64, device=device)
        x = src.clone() if g.rank == root else torch.zeros(n, dtype=torch.int64, device=device)
        g.broadcast(x, root)
        assert_equal(x, src, f"broadcast root={root}")
        inputs = [make(f"{label}/red-all/{root}", r, n, torch.int32, "sum", device=device) for r in range(g.size)]
        x = inputs[g.rank].clone()
        g.reduce(x, root, "max")
        if g.rank == root:
            assert_equal(x, reduce_ref(inputs, "max"), f"reduce root={root}", True)
        else:
            assert_equal(x, inputs[g.rank], f"reduce root={root}: non-root input changed")
        blocks = [make(f"{label}/ga-all/{root}", r, 5, torch.float32, device=device) for r in range(g.size)]
        out = torch.empty(5 * g.size, device=device) if g.rank == root else None
        g.gather(blocks[g.rank], out, root)
        if g.rank == root:
            assert_equal(out, torch.cat(blocks), f"gather root={root}")
        full = make(f"{label}/sc-all/{root}", root, 3 * g.size, torch.int16, device=device)
        got = torch.empty(3, dtype=torch.int16, device=device)
        g.scatter(got, full if g.rank == root else None, root)
        assert_equal(got, full[3 * g.rank : 3 * g.rank + 3], f"scatter root={root}")


def _large(g: Communicator, label: str, device: str = "cpu") -> None:
    """Sizes that span several staged chunks (the suites set FLAGCX_HETERO_CHUNK small)."""
    for n in (100_003, 6 * 20_011):
        inputs = [make(f"{label}/big/{n}", r, n, torch.float32, "sum", device=device) for r in range(g.size)]
        x = inputs[g.rank].clone()
        g.all_reduce(x)
        assert_equal(x, reduce_ref(inputs, "sum"), f"large all_reduce n={n}", True)
        src = make(f"{label}/bigbc/{n}", g.size - 1, n, torch.float64, device=device)
        y = src.clone() if g.rank == g.size - 1 else torch.zeros(n, dtype=torch.float64, device=device)
        g.broadcast(y, g.size - 1)
        assert_equal(y, src, f"large broadcast n={n}")
    n = 20_011
    inputs = [make(f"{label}/bigrs", r, n * g.size, torch.int64, "sum", device=device) for r in range(g.size)]
    out = torch.empty(n, dtype=torch.int64, device=device)
    g.reduce_scatter(out, inputs[g.rank].clone())
    assert_equal(out, reduce_ref(inputs, "sum")[g.rank * n : (g.rank + 1) * n], "large reduce_scatter", True)
    ag = torch.empty(n * g.size, dtype=torch.int64, device=device)
    g.all_gather(ag, inputs[g.rank][:n].clone())
    assert_equal(ag, torch.cat([i[:n] for i in inputs]), "large all_gather")


def _p2p_all_pairs(g: Communicator, label: str, device: str = "cpu") -> None:
    """Every ordered pair exchanges a message (same cluster and across), posted before waiting."""
    works = []
    outs = {}
    for peer in range(g.size):
        if peer == g.rank:
            continue
        outs[peer] = torch.empty(11 + peer + g.rank, dtype=torch.int32, device=device)
        works.append(g.recv(outs[peer], peer, async_op=True))
        works.append(g.send(make(f"{label}/pairs/{g.rank}->{peer}", 0, 11 + peer + g.rank, torch.int32, device=device), peer, async_op=True))
    for w in works:
        w.wait()
    for peer, t in outs.items():
        assert_equal(t, make(f"{label}/pairs/{peer}->{g.rank}", 0, 11 + peer + g.rank, torch.int32, device=device), f"message from {peer}")


def _alltoallv_sparse(g: Communicator, label: str, device: str = "cpu") -> None:
    """Uneven exchange where many blocks are empty (only some pairs talk)."""
    rows = lambda s, d: (s + 2 * d) % 3  # noqa: E731
    ins = make(f"{label}/a2as/{g.rank}", 0, 2 * sum(rows(g.rank, d) for d in range(g.size)), torch.float16, device=device).view(-1, 2)
    out = torch.empty(sum(rows(s, g.rank) for s in range(g.size)), 2, dtype=torch.float16, device=device)
    g.all_to_all(out, ins, [rows(s, g.rank) for s in range(g.size)], [rows(g.rank, d) for d in range(g.size)])
    parts = []
    for s in range(g.size):
        full = make(f"{label}/a2as/{s}", 0, 2 * sum(rows(s, d) for d in range(g.size)), torch.float16).view(-1, 2)
        start = sum(rows(s, d) for d in range(g.rank))
        parts.append(full[start : start + rows(s, g.rank)])
    assert_equal(out, torch.cat(parts), "sparse all_to_all")


def _any_source_rejected(g: Communicator, device: str = "cpu") -> None:
    try:
        g.recv(torch.empty(1, device=device), None)
    except NotSupported as exc:
        assert "any source" in str(exc)
        return
    raise AssertionError("any-source recv on a heterogeneous communicator did not raise NotSupported")


def _allreduce_plans(g: Communicator, label: str, device: str = "cpu") -> None:
    """auto: a size class is timed both ways on its first calls and every rank keeps the same plan; flat and
    hierarchical forced give exact results too (random data every call)."""
    from flagcx.hetero import PlanChooser

    hetero = g._hetero
    assert hetero is not None, "plan checks run on communicators that span clusters"
    n = 30_011
    cls = (n * 4).bit_length()
    for call in range(len(PlanChooser.ORDER) + 2):
        inputs = [make(f"{label}/plans/{call}", r, n, torch.float32, "sum", device=device) for r in range(g.size)]
        x = inputs[g.rank].clone()
        g.all_reduce(x)
        assert_equal(x, reduce_ref(inputs, "sum"), f"auto plan, call {call}", True)
    chosen = hetero.plans.chosen[cls]
    hier, flat = hetero.plans.timings[cls]
    assert chosen == ("flat" if flat < hier else "hierarchical") and hier > 0 and flat > 0, (chosen, hier, flat)
    votes = torch.tensor([float(PlanChooser.PLANS.index(chosen))])
    g.all_reduce(votes, "max")
    top = votes.item()
    votes.fill_(-float(PlanChooser.PLANS.index(chosen)))
    g.all_reduce(votes, "max")
    assert top == -votes.item(), "ranks chose different plans for one size class"
    saved = hetero.plans
    try:
        for fixed in PlanChooser.PLANS:
            hetero.plans = PlanChooser(fixed)
            inputs = [make(f"{label}/plan-{fixed}", r, n, torch.int64, "max", device=device) for r in range(g.size)]
            out = torch.empty_like(inputs[g.rank])
            g.all_reduce(inputs[g.rank].clone(), "max", out=out)
            assert_equal(out, reduce_ref(inputs, "max"), f"{fixed} plan, out of place")
    finally:
        hetero.plans = saved


def plan_checks(g: Optional[Communicator], label: str, device: str = "cpu") -> Iterable[Check]:
    """Checks of the plan itself; every rank yields them (non-members of a subgroup pass trivially)."""
    checks = {
        "rooted_everywhere": lambda: _rooted_everywhere(g, label, device),
        "large_chunked": lambda: _large(g, label, device),
        "allreduce_plans": lambda: _allreduce_plans(g, label, device),
        "p2p_all_pairs": lambda: _p2p_all_pairs(g, label, device),
        "alltoallv_sparse": lambda: _alltoallv_sparse(g, label, device),
        "any_source_rejected": lambda: _any_source_rejected(g, device),
    }
    for name, check in checks.items():
        yield f"{label}/{name}", (check if g is not None else lambda: None)


def hetero_matrix(rank: int, size: int) -> Iterable[Check]:
    """Suite: the full matrix on a heterogeneous world communicator and on a cross-cluster subgroup."""
    labels = os.environ["HETERO_LABELS"]
    comm = Communicator.from_env(name="hetero")
    yield "layout", lambda: _layout(comm, labels)
    sub_ranks = subgroup_ranks(size)
    sub = comm.split(sub_ranks)
    yield "sub_layout", lambda: _layout(sub, "".join(labels[r] for r in sub_ranks)) if sub is not None else None
    for name, g in (("world", comm), ("sub", sub)):
        yield from reduction_checks(g, name)
        yield from movement_checks(g, name)
        yield from error_checks(g, name)
        yield from plan_checks(g, name)
    yield "destroy", lambda: (sub.destroy() if sub else None, comm.destroy())


def torch_hetero(rank: int, size: int) -> Iterable[Check]:
    """Suite: a few torch.distributed ops through backend "flagcx" on a job with two cluster labels."""
    import flagcx  # noqa: F401  (registers the backend)

    dist.init_process_group("flagcx")
    pg = dist.group.WORLD
    yield "is_hetero", lambda: _torch_is_hetero(pg)
    yield "all_reduce", lambda: _torch_all_reduce(rank, size)
    yield "all_gather_into_tensor", lambda: _torch_all_gather(rank, size)
    yield "reduce_scatter_tensor", lambda: _torch_reduce_scatter(rank, size)
    yield "broadcast_object_and_barrier", lambda: _torch_objects(rank, size)
    yield "batch_isend_irecv", lambda: _torch_ring(rank, size)
    yield "new_group", lambda: _torch_new_group(rank, size)
    yield "destroy", dist.destroy_process_group


def _torch_is_hetero(pg) -> None:
    assert isinstance(pg.comm._hetero, HeteroAdapter), f"{pg!r} is not heterogeneous"


def _torch_all_reduce(rank: int, size: int) -> None:
    for op, name in ((dist.ReduceOp.SUM, "sum"), (dist.ReduceOp.AVG, "avg"), (dist.ReduceOp.MIN, "min")):
        inputs = [make(f"t/ar/{name}", r, 1031, torch.float32, name) for r in range(size)]
        x = inputs[rank].clone()
        dist.all_reduce(x, op=op)
        assert_equal(x, reduce_ref(inputs, name), f"torch all_reduce {name}", True)
    w = dist.all_reduce(y := torch.full((7,), rank, dtype=torch.int64), async_op=True)
    w.wait()
    assert_equal(y, torch.full((7,), sum(range(size)), dtype=torch.int64), "async all_reduce")


def _torch_all_gather(rank: int, size: int) -> None:
    inputs = [make("t/ag", r, 13, torch.bfloat16) for r in range(size)]
    out = torch.empty(13 * size, dtype=torch.bfloat16)
    dist.all_gather_into_tensor(out, inputs[rank])
    assert_equal(out, torch.cat(inputs), "torch all_gather_into_tensor")
    lst = [torch.empty(13, dtype=torch.bfloat16) for _ in range(size)]
    dist.all_gather(lst, inputs[rank])
    assert_equal(torch.cat(lst), torch.cat(inputs), "torch all_gather")


def _torch_reduce_scatter(rank: int, size: int) -> None:
    inputs = [make("t/rs", r, 5 * size, torch.int32, "sum") for r in range(size)]
    out = torch.empty(5, dtype=torch.int32)
    dist.reduce_scatter_tensor(out, inputs[rank].clone())
    assert_equal(out, reduce_ref(inputs, "sum")[5 * rank : 5 * rank + 5], "torch reduce_scatter_tensor")


def _torch_objects(rank: int, size: int) -> None:
    obj = [{"from": size - 1, "data": list(range(5))}] if rank == size - 1 else [None]
    dist.broadcast_object_list(obj, src=size - 1)
    assert obj[0] == {"from": size - 1, "data": list(range(5))}
    gathered = [None] * size
    dist.all_gather_object(gathered, ("rank", rank))
    assert gathered == [("rank", r) for r in range(size)]
    dist.barrier()


def _torch_ring(rank: int, size: int) -> None:
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    send = torch.full((9,), rank, dtype=torch.float64)
    recv = torch.empty(9, dtype=torch.float64)
    ops = [dist.P2POp(dist.isend, send, nxt), dist.P2POp(dist.irecv, recv, prv)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    assert_equal(recv, torch.full((9,), prv, dtype=torch.float64), "batch_isend_irecv ring")


def _torch_new_group(rank: int, size: int) -> None:
    ranks = [size - 1, 0, 1]
    g = dist.new_group(ranks)
    if rank in ranks:
        x = torch.tensor([rank + 1.0])
        dist.all_reduce(x, group=g)
        assert_equal(x, torch.tensor([float(sum(r + 1 for r in ranks))]), "all_reduce on a new_group")


def init_errors(rank: int, size: int) -> Iterable[Check]:
    """Suite: configurations every rank must reject alike at init (no rank left waiting)."""
    from flagcx import InvalidArgument

    def expect(env: dict, name: str, *words: str) -> None:
        try:
            with flagcx_env(**env):
                Communicator.from_env(name=name)
        except InvalidArgument as exc:
            for w in words:
                assert w in str(exc), f"{exc} lacks {w!r}"
            return
        raise AssertionError("init did not raise InvalidArgument")

    label = "cl-A" if rank < size // 2 else "cl-B"
    yield (
        "cpu_adapter_disagrees_in_cluster",
        lambda: expect({"FLAGCX_CLUSTER_ID": label, "FLAGCX_CPU_ADAPTER": "gloo" if rank == 0 else "auto"}, "bad-adapter", "FLAGCX_CPU_ADAPTER", "cl-A"),
    )
    yield (
        "chunk_disagrees",
        lambda: expect({"FLAGCX_CLUSTER_ID": label, "FLAGCX_HETERO_CHUNK": "1M" if rank == size - 1 else "2M"}, "bad-chunk", "FLAGCX_HETERO_CHUNK"),
    )
    yield (
        "allreduce_plan_disagrees",
        lambda: expect({"FLAGCX_CLUSTER_ID": label, "FLAGCX_HETERO_ALLREDUCE": "flat" if rank == 1 else "auto"}, "bad-plan", "FLAGCX_HETERO_ALLREDUCE"),
    )
    yield "mixed_device_types_in_cluster", lambda: _mixed_device_types(rank)


def _mixed_device_types(rank: int) -> None:
    """Records saying one cluster holds cpu and cuda ranks: every rank rejects the communicator."""

    from flagcx import InvalidArgument
    from flagcx.bootstrap import store_from_env
    from flagcx.topology.detect import PeerRecord, local_record

    size = int(os.environ["WORLD_SIZE"])
    records = []
    for r in range(size):
        rec = local_record().to_json()
        rec.update(cluster="same", device_type="cuda" if r == 0 else "cpu")
        records.append(PeerRecord.from_json({"topo": rec, "cpu_adapter": "auto"}))
    store = dist.PrefixStore("mixed/", store_from_env(30))
    try:
        Communicator(store, rank, size, name="mixed", _records=records)
    except InvalidArgument as exc:
        assert "mixes device types" in str(exc) and "FLAGCX_CLUSTER_ID" in str(exc), str(exc)
        return
    raise AssertionError("a cluster mixing cpu and cuda ranks was accepted")
