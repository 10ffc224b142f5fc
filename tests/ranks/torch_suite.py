"""Suites for the torch.distributed frontend: every dist.* op through backend "flagcx".

Each rank runs ``init_process_group`` once and then every check, on the world group and
on a non-contiguous subgroup, sync and async, against exact references.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

import flagcx

from ..helpers.matrix import Check, subgroup_ranks
from ..helpers.reference import PREMUL_FACTOR, assert_equal, make, reduce_ref

TORCH_OPS = {
    "sum": dist.ReduceOp.SUM,
    "prod": dist.ReduceOp.PRODUCT,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "avg": dist.ReduceOp.AVG,
}
DTYPES = [torch.float32, torch.bfloat16, torch.int32, torch.int8, torch.float64, torch.float16, torch.uint8, torch.int64]


def _finish(work, async_op: bool) -> None:
    if async_op:
        assert isinstance(work, dist.Work), f"async op returned {type(work)}"
        work.wait()
        assert work.is_completed()
    else:
        assert work is None


class Group:
    """A group under test: the torch group object, its ranks, and this rank's group rank."""

    def __init__(self, label: str, pg, ranks: list[int]) -> None:
        self.label = label
        self.pg = pg
        self.ranks = ranks
        me = dist.get_rank()
        self.member = me in ranks
        self.rank = ranks.index(me) if self.member else -1
        self.size = len(ranks)

    def global_rank(self, group_rank: int) -> int:
        return self.ranks[group_rank]


def op_checks(g: Group) -> Iterable[Check]:
    for dtype in DTYPES:
        for name, op in TORCH_OPS.items():
            for async_op in (False, True):
                yield f"{g.label}/all_reduce/{dtype}/{name}/async={async_op}", lambda d=dtype, n=name, o=op, a=async_op: _all_reduce(g, d, n, o, a)
        yield f"{g.label}/collectives/{dtype}", lambda d=dtype: _collectives(g, d)
    yield f"{g.label}/premul_sum", lambda: _premul(g)
    yield f"{g.label}/coalesced", lambda: _coalesced(g)
    yield f"{g.label}/all_to_all", lambda: _all_to_all(g)
    yield f"{g.label}/p2p", lambda: _p2p(g)
    yield f"{g.label}/objects", lambda: _objects(g)
    yield f"{g.label}/barrier_and_errors", lambda: _barrier_errors(g)


def _all_reduce(g: Group, dtype, name, op, async_op) -> None:
    if not g.member:
        return
    for n in (0, 1, 1031):
        inputs = [make(f"{g.label}/t_ar/{n}", r, n, dtype, name) for r in range(g.size)]
        x = inputs[g.rank].clone()
        _finish(dist.all_reduce(x, op=op, group=g.pg, async_op=async_op), async_op)
        assert_equal(x, reduce_ref(inputs, name), f"all_reduce {name} n={n}", True)


def _premul(g: Group) -> None:
    if not g.member:
        return
    inputs = [make(f"{g.label}/t_pm", r, 77, torch.float32, "premul_sum") for r in range(g.size)]
    x = inputs[g.rank].clone()
    if callable(dist.ReduceOp.PREMUL_SUM) and hasattr(dist.ReduceOp, "PREMUL_SUM") and _has_factor():
        dist.all_reduce(x, op=dist.ReduceOp.PREMUL_SUM(PREMUL_FACTOR), group=g.pg)
        assert_equal(x, reduce_ref(inputs, "premul_sum"), "premul_sum", True)
    else:  # torch 2.11: the factor cannot be read from Python
        try:
            dist.all_reduce(x, op=dist._make_nccl_premul_sum(PREMUL_FACTOR), group=g.pg)
        except flagcx.NotSupported as exc:
            assert "PREMUL_SUM" in str(exc)
        else:
            raise AssertionError("expected NotSupported for PREMUL_SUM on this torch")


def _has_factor() -> bool:
    try:
        return getattr(dist.ReduceOp.PREMUL_SUM(1.0), "factor", None) is not None
    except TypeError:
        return False


def _collectives(g: Group, dtype) -> None:
    if not g.member:
        return
    size, rank, pg = g.size, g.rank, g.pg
    for i, n in enumerate((0, 5, 1031)):
        a = bool(i % 2)
        ins = [make(f"{g.label}/t_ag/{n}", r, n, dtype) for r in range(size)]
        outs = [torch.empty(n, dtype=dtype) for _ in range(size)]
        _finish(dist.all_gather(outs, ins[rank], group=pg, async_op=a), a)
        assert_equal(torch.cat(outs), torch.cat(ins), f"all_gather n={n}")
        flat = torch.empty(n * size, dtype=dtype)
        _finish(dist.all_gather_into_tensor(flat, ins[rank], group=pg, async_op=not a), not a)
        assert_equal(flat, torch.cat(ins), f"all_gather_into_tensor n={n}")
        # reduce_scatter (list) and reduce_scatter_tensor
        full = [make(f"{g.label}/t_rs/{n}", r, n * size, dtype, "sum") for r in range(size)]
        expected = reduce_ref(full, "sum")[rank * n : (rank + 1) * n]
        out = torch.empty(n, dtype=dtype)
        _finish(dist.reduce_scatter(out, list(full[rank].clone().chunk(size)) if n else [torch.empty(0, dtype=dtype)] * size, group=pg, async_op=a), a)
        assert_equal(out, expected, f"reduce_scatter n={n}", True)
        out2 = torch.empty(n, dtype=dtype)
        _finish(dist.reduce_scatter_tensor(out2, full[rank].clone(), group=pg, async_op=not a), not a)
        assert_equal(out2, expected, f"reduce_scatter_tensor n={n}", True)
        if dtype.is_floating_point:
            out3 = torch.empty(n, dtype=dtype)
            dist.reduce_scatter_tensor(out3, full[rank].clone(), op=dist.ReduceOp.AVG, group=pg)
            assert_equal(out3, reduce_ref(full, "avg")[rank * n : (rank + 1) * n], f"reduce_scatter_tensor avg n={n}", True)
        # broadcast / reduce with every root
        for root in range(size):
            groot = g.global_rank(root)
            src = make(f"{g.label}/t_bc/{n}", root, n, dtype)
            x = src.clone() if rank == root else torch.zeros(n, dtype=dtype)
            _finish(dist.broadcast(x, groot, group=pg, async_op=a), a)
            assert_equal(x, src, f"broadcast root={root} n={n}")
            rins = [make(f"{g.label}/t_red/{n}", r, n, dtype, "max") for r in range(size)]
            y = rins[rank].clone()
            _finish(dist.reduce(y, groot, op=dist.ReduceOp.MAX, group=pg, async_op=a), a)
            if rank == root:
                assert_equal(y, reduce_ref(rins, "max"), f"reduce root={root} n={n}", True)
        # gather / scatter
        root = (i + 1) % size
        groot = g.global_rank(root)
        glist = [torch.empty(n, dtype=dtype) for _ in range(size)] if rank == root else None
        _finish(dist.gather(ins[rank], glist, dst=groot, group=pg, async_op=a), a)
        if rank == root:
            assert_equal(torch.cat(glist), torch.cat(ins), f"gather n={n}")
        slist = [make(f"{g.label}/t_sc/{n}/{r}", root, n, dtype) for r in range(size)]
        recv = torch.empty(n, dtype=dtype)
        _finish(dist.scatter(recv, slist if rank == root else None, src=groot, group=pg, async_op=not a), not a)
        assert_equal(recv, slist[rank], f"scatter n={n}")


def _coalesced(g: Group) -> None:
    if not g.member:
        return
    size, rank, pg = g.size, g.rank, g.pg
    ts = [make(f"{g.label}/t_co/{k}", rank, 10 + k, torch.float32) for k in range(3)]
    expected = [reduce_ref([make(f"{g.label}/t_co/{k}", r, 10 + k, torch.float32) for r in range(size)], "sum") for k in range(3)]
    xs = [t.clone() for t in ts]
    dist.all_reduce_coalesced(xs, group=pg)
    for k in range(3):
        assert_equal(xs[k], expected[k], f"all_reduce_coalesced {k}", True)
    xs = [t.clone() for t in ts]
    with dist._coalescing_manager(group=pg, async_ops=True) as cm:
        for x in xs:
            dist.all_reduce(x, group=pg)
    cm.wait()
    for k in range(3):
        assert_equal(xs[k], expected[k], f"coalescing manager all_reduce {k}", True)
    outs = [torch.empty(size * t.numel()) for t in ts]
    with dist._coalescing_manager(group=pg, async_ops=False):
        for o, t in zip(outs, ts):
            dist.all_gather_into_tensor(o, t, group=pg)
    for k in range(3):
        want = torch.cat([make(f"{g.label}/t_co/{k}", r, 10 + k, torch.float32) for r in range(size)])
        assert_equal(outs[k], want, f"coalescing manager all_gather_into_tensor {k}")
    rs_in = [make(f"{g.label}/t_rsc/{k}", rank, size * (3 + k), torch.float32) for k in range(2)]
    rs_out = [torch.empty(3 + k) for k in range(2)]
    with dist._coalescing_manager(group=pg, async_ops=False):
        for o, t in zip(rs_out, rs_in):
            dist.reduce_scatter_tensor(o, t, group=pg)
    for k in range(2):
        full = reduce_ref([make(f"{g.label}/t_rsc/{k}", r, size * (3 + k), torch.float32) for r in range(size)], "sum")
        assert_equal(rs_out[k], full[rank * (3 + k) : (rank + 1) * (3 + k)], f"coalesced reduce_scatter_tensor {k}", True)
    # device-style coalescing (start/end_coalescing) with broadcasts
    bs = [torch.full((4,), float(rank)) for _ in range(2)]
    with dist._coalescing_manager(group=pg, device=torch.device("cpu"), async_ops=True) as cm:
        for b in bs:
            dist.broadcast(b, g.global_rank(0), group=pg)
    cm.wait()
    for b in bs:
        assert_equal(b, torch.zeros(4), "coalesced broadcast")


def _all_to_all(g: Group) -> None:
    if not g.member:
        return
    size, rank, pg = g.size, g.rank, g.pg
    x = make(f"{g.label}/t_a2a", rank, 6 * size, torch.float32)
    out = torch.empty(6 * size)
    dist.all_to_all_single(out, x, group=pg)
    want = torch.cat([make(f"{g.label}/t_a2a", r, 6 * size, torch.float32)[rank * 6 : rank * 6 + 6] for r in range(size)])
    assert_equal(out, want, "all_to_all_single even")
    rows = lambda s, d: (s + 2 * d) % 3 + 1  # noqa: E731
    src = make(f"{g.label}/t_a2av/{rank}", 0, 2 * sum(rows(rank, d) for d in range(size)), torch.int64).view(-1, 2)
    out = torch.empty(sum(rows(s, rank) for s in range(size)), 2, dtype=torch.int64)
    work = dist.all_to_all_single(out, src, [rows(s, rank) for s in range(size)], [rows(rank, d) for d in range(size)], group=pg, async_op=True)
    work.wait()
    parts = []
    for s in range(size):
        theirs = make(f"{g.label}/t_a2av/{s}", 0, 2 * sum(rows(s, d) for d in range(size)), torch.int64).view(-1, 2)
        start = sum(rows(s, d) for d in range(rank))
        parts.append(theirs[start : start + rows(s, rank)])
    assert_equal(out, torch.cat(parts), "all_to_all_single uneven")
    ins = [torch.full((d + 1,), float(rank * 10 + d)) for d in range(size)]
    outs = [torch.empty(rank + 1) for _ in range(size)]
    dist.all_to_all(outs, ins, group=pg)
    for s in range(size):
        assert_equal(outs[s], torch.full((rank + 1,), float(s * 10 + rank)), f"all_to_all list from {s}")


def _p2p(g: Group) -> None:
    if not g.member or g.size < 2:
        return
    size, rank, pg = g.size, g.rank, g.pg
    nxt, prv = g.global_rank((rank + 1) % size), g.global_rank((rank - 1) % size)
    mine = make(f"{g.label}/t_p2p", rank, 50001, torch.float32)
    got = torch.empty(50001)
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, mine, nxt, pg), dist.P2POp(dist.irecv, got, prv, pg)])
    for r in reqs:
        r.wait()
    assert_equal(got, make(f"{g.label}/t_p2p", (rank - 1) % size, 50001, torch.float32), "batch_isend_irecv ring")
    w = dist.isend(mine, nxt, group=pg)
    got2 = torch.empty(50001)
    dist.recv(got2, prv, group=pg)
    w.wait()
    assert_equal(got2, got, "isend + recv")
    if rank == 1:
        dist.send(torch.tensor([7, 8, 9]), g.global_rank(0), group=pg)
    elif rank == 0:
        t = torch.empty(3, dtype=torch.int64)
        src = dist.recv(t, group=pg)  # any source
        assert src == g.global_rank(1), src
        assert_equal(t, torch.tensor([7, 8, 9]), "recv any source")


def _objects(g: Group) -> None:
    if not g.member:
        return
    size, rank, pg = g.size, g.rank, g.pg
    objs = [None] * size
    dist.all_gather_object(objs, {"rank": rank, "data": list(range(rank))}, group=pg)
    assert objs == [{"rank": r, "data": list(range(r))} for r in range(size)]
    lst = [f"hello-{rank}", rank] if rank == 0 else [None, None]
    dist.broadcast_object_list(lst, src=g.global_rank(0), group=pg)
    assert lst == ["hello-0", 0]
    out = [None] * size if rank == 0 else None
    dist.gather_object(("g", rank), out, dst=g.global_rank(0), group=pg)
    if rank == 0:
        assert out == [("g", r) for r in range(size)]
    recv = [None]
    dist.scatter_object_list(recv, [f"s{r}" for r in range(size)] if rank == 0 else None, src=g.global_rank(0), group=pg)
    assert recv == [f"s{rank}"]


def _expect_flagcx_error(fn, *words) -> None:
    try:
        fn()
    except flagcx.FlagcxError as exc:
        for w in words:
            assert w in str(exc), f"{exc!r} lacks {w!r}"
        return
    raise AssertionError("expected a FlagcxError")


def _barrier_errors(g: Group) -> None:
    if not g.member:
        return
    dist.barrier(group=g.pg)
    dist.barrier(group=g.pg, async_op=True).wait()
    x = torch.ones(4)
    _expect_flagcx_error(lambda: dist.all_reduce(torch.ones(3, dtype=torch.bool), op=dist.ReduceOp.AVG, group=g.pg), "AVG")
    _expect_flagcx_error(lambda: dist.all_gather_into_tensor(torch.empty(3), x, group=g.pg), "out")
    _expect_flagcx_error(lambda: dist.reduce_scatter_tensor(torch.empty(4, dtype=torch.float64), torch.ones(4 * g.size), group=g.pg), "dtype")
    _expect_flagcx_error(lambda: dist.all_gather_into_tensor(torch.empty(4 * g.size, device="meta"), x, group=g.pg), "device")
    _expect_flagcx_error(lambda: g.pg.broadcast([x], g.size + 3), "root")
    y = torch.ones(2)
    dist.all_reduce(y, group=g.pg)
    assert_equal(y, torch.full((2,), float(g.size)), "all_reduce after errors")


def torch_ops(rank: int, size: int) -> Iterable[Check]:
    """Suite: every dist.* op on WORLD and on a flagcx subgroup."""
    dist.init_process_group(os.environ.get("FLAGCX_TEST_BACKEND", "flagcx"))
    assert isinstance(dist.group.WORLD, flagcx.ProcessGroupFlagcx), type(dist.group.WORLD)
    sub_ranks = subgroup_ranks(size)
    sub = dist.new_group(sorted(sub_ranks), backend="flagcx")
    groups = [Group("world", dist.group.WORLD, list(range(size))), Group("sub", sub, sorted(sub_ranks))]
    yield "identity", lambda: _identity(groups)
    for g in groups:
        yield from op_checks(g)
    yield "groups_named_in_messages", lambda: _groups_named_in_messages(rank, size)
    yield "destroy", dist.destroy_process_group


def _groups_named_in_messages(rank: int, size: int) -> None:
    """A mismatch names the group as its user knows it (and breaks only that group): by its group_desc, else by its ranks."""
    from flagcx.frontends.process_group import communicator_of

    assert communicator_of(dist.group.WORLD).title == "the default group"
    every = list(range(size))
    for desc, title in (
        ("tp", f"group 'tp' (ranks 0{'-' if size > 2 else ', '}{size - 1})"),
        (None, f"the group of ranks 0{'-' if size > 2 else ', '}{size - 1}"),
    ):
        pg = dist.new_group(every, backend="flagcx", group_desc=desc)
        theirs = "all_reduce(float32[5], sum)" if rank == 0 else "all_reduce(float32[4], sum)"
        _expect_flagcx_error(
            lambda: dist.all_reduce(torch.ones(5 if rank else 4), group=pg),
            f"all_reduce (rank {rank}): {title}: rank",
            f"called {theirs} while this rank called",
        )


def _identity(groups: list[Group]) -> None:
    world = groups[0].pg
    assert dist.get_backend(world) == os.environ.get("FLAGCX_TEST_BACKEND", "flagcx")
    assert world.name() == "flagcx"
    assert world.group_name, "group name must be set for functional collectives"
    from torch.distributed.distributed_c10d import _resolve_process_group

    assert _resolve_process_group(world.group_name) is world
    for g in groups[1:]:
        if g.member:
            assert isinstance(g.pg, flagcx.ProcessGroupFlagcx)
            assert _resolve_process_group(g.pg.group_name) is g.pg
