"""Checks specific to the shm transport, run inside spawned ranks (see tests/test_shm.py).

Large messages through the chunked pipeline, every reduce dtype and op, sizes around
the chunk and threshold boundaries of a communicator with small staging buffers, the
single-copy path (reads out of the peer's memory) for send/recv, allgather and alltoall,
send/recv ordering and any-source, "auto" picking shm on one host, the segment's
mode and unlinking, and errors that must name the offending rank (mismatched calls,
mismatched splits, mismatched message sizes).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable

import torch

import flagcx
from flagcx import Communicator, InvalidArgument
from flagcx.tensors import as_bytes

from ..helpers.harness import flagcx_env
from ..helpers.matrix import Check, comm_matrix
from ..helpers.reference import FLOATS, INTS, assert_equal, make, reduce_ref

SEGMENT_RE = re.compile(r"^/flagcx-[0-9a-f]{32}$")


def _shm(comm: Communicator):
    return comm._adapters["cpu"]


def matrix_and_shm(rank: int, size: int) -> Iterable[Check]:
    """Suite: the full correctness matrix, then the shm-specific checks, in one set of ranks."""
    yield from comm_matrix(rank, size)
    yield from shm_checks(rank, size)


def shm_checks(rank: int, size: int) -> Iterable[Check]:
    comm = Communicator.from_env(name="shm")
    yield "shm/segment", lambda: _segment(comm)
    yield "shm/auto", lambda: _auto(rank)
    yield "shm/large", lambda: _large(comm)
    for dtype in FLOATS + INTS:
        yield f"shm/dtypes/{dtype}", lambda d=dtype: _dtype(comm, d)
    with flagcx_env(FLAGCX_SHM_BUFFER="64K", FLAGCX_SHM_P2P_BUFFER="8K"):
        small = Communicator.from_env(name="shm-small")
    yield "shm/boundaries/reductions", lambda: _boundary_reductions(small)
    yield "shm/boundaries/movement", lambda: _boundary_movement(small)
    yield "shm/p2p/ordered", lambda: _p2p_ordered(small)
    yield "shm/p2p/any_source", lambda: _p2p_any_source(small)
    yield "shm/p2p/with_collectives", lambda: _p2p_with_collectives(comm)
    yield "shm/p2p/wait_timeout", lambda: _p2p_wait_timeout(comm)
    yield "shm/p2p/nobody_waits", lambda: _p2p_nobody_waits(comm)
    for dtype in (torch.float32, torch.int64, torch.bfloat16):
        yield f"shm/fast_path/{dtype}", lambda d=dtype: _fast_paths(comm, d)
    yield "shm/alltoallv_mismatch", lambda: _alltoallv_mismatch(comm)
    yield "shm/forked_child", lambda: _forked_child(comm)
    yield "shm/mismatched_calls", lambda: _mismatched_calls(rank, size)
    yield "shm/mismatch_seen_by_receivers_only", lambda: _mismatch_reaches_root(rank, size)
    yield "shm/alltoall_in_place_on_some", lambda: _alltoall_in_place_on_some(rank, size)
    yield "shm/p2p_size_mismatch", lambda: _p2p_size_mismatch(rank, size)
    with flagcx_env(FLAGCX_SHM_SINGLE_COPY="1K", FLAGCX_SHM_P2P_BUFFER="8K", FLAGCX_SHM_BUFFER="64K"):
        single = Communicator.from_env(name="shm-single")
    with flagcx_env(FLAGCX_SHM_SINGLE_COPY="0"):
        staged = Communicator.from_env(name="shm-staged")
    yield "shm/single_copy/setup", lambda: _single_copy_setup(single, staged)
    yield "shm/single_copy/movement", lambda: _boundary_movement(single)
    yield "shm/single_copy/allgather_floor", lambda: _allgather_floor(single)
    yield "shm/single_copy/p2p_ordered", lambda: _p2p_ordered(single)
    yield "shm/single_copy/fast_path", lambda: _fast_paths(single, torch.float32)
    yield "shm/single_copy/p2p_with_collectives", lambda: _p2p_with_collectives(single)
    yield "shm/single_copy/staged_large", lambda: _large(staged)
    yield "shm/single_copy/destroy", lambda: (single.destroy(), staged.destroy())
    with flagcx_env(FLAGCX_SHM_THREADS="3"):
        threaded = Communicator.from_env(name="shm-threads")
    yield "shm/threads/setup", lambda: _threaded_setup(threaded)
    yield "shm/threads/large", lambda: _large(threaded)
    yield "shm/threads/boundaries", lambda: _boundary_reductions(threaded)
    yield "shm/threads/dtypes", lambda: _threaded_dtypes(threaded)
    yield "shm/destroy", lambda: (small.destroy(), comm.destroy(), threaded.destroy())


def _segment(comm: Communicator) -> None:
    assert comm.adapter_name("cpu") == "shm"
    shm = _shm(comm)
    assert SEGMENT_RE.match(shm.segment_name), shm.segment_name
    assert shm.segment_mode == 0o600, oct(shm.segment_mode)
    assert not os.path.exists("/dev/shm" + shm.segment_name), "segment still linked after every rank attached"


def _auto(rank: int) -> None:
    with flagcx_env(FLAGCX_CPU_ADAPTER="auto"):
        same = Communicator.from_env(name="auto-same")
        with flagcx_env(FLAGCX_HOST_ID=f"host-{rank}"):
            split = Communicator.from_env(name="auto-hosts")
    try:
        assert same.adapter_name("cpu") == "shm", same.adapter_name("cpu")
        assert split.adapter_name("cpu") == "gloo", split.adapter_name("cpu")
        x = torch.full((5,), float(rank))
        same.all_reduce(x)
        assert_equal(x, torch.full((5,), float(sum(range(same.size)))), "auto all_reduce")
    finally:
        split.destroy()
        same.destroy()


def _large(comm: Communicator) -> None:
    """Multi-chunk pipeline with the default buffers (3 M float32; inputs shared by the ops)."""
    n, r = comm.size, comm.rank
    count = 3_000_017
    inputs = [make("large", p, count, torch.float32) for p in range(n)]
    expected = reduce_ref(inputs, "sum")
    x = inputs[r].clone()
    comm.all_reduce(x)
    assert_equal(x, expected, "large all_reduce", True)
    out = torch.empty(count)
    comm.all_reduce(inputs[r], "avg", out=out)
    assert_equal(out, expected / n, "large all_reduce avg", True)
    per = count // n
    rs_out = torch.empty(per)
    comm.reduce_scatter(rs_out, inputs[r][: per * n])
    assert_equal(rs_out, expected[r * per : (r + 1) * per], "large reduce_scatter", True)
    buf = inputs[r][: per * n].clone()  # in place: the output is block r of the input
    comm.reduce_scatter(buf[r * per : (r + 1) * per], buf, "max")
    assert_equal(buf[r * per : (r + 1) * per], reduce_ref(inputs, "max")[r * per : (r + 1) * per], "in-place reduce_scatter")
    ag_out = torch.empty(per * n)
    comm.all_gather(ag_out, inputs[r][:per])
    assert_equal(ag_out, torch.cat([t[:per] for t in inputs]), "large all_gather")


def _threaded_setup(comm: Communicator) -> None:
    """FLAGCX_SHM_THREADS=3: three threads per rank split large steps, over 4 MiB staging (rank 0's choice)."""
    shm = _shm(comm)
    assert (shm.threads, shm.staging_bytes) == (3, 4 << 20), (shm.threads, shm.staging_bytes)


def _threaded_dtypes(comm: Communicator) -> None:
    """Split reductions in other dtypes and ops (every step large enough to be split), and reduce to a root."""
    n, r = comm.size, comm.rank
    count = 600_011
    for dtype, op in ((torch.bfloat16, "sum"), (torch.int64, "max"), (torch.float64, "prod"), (torch.int32, "avg")):
        inputs = [make(f"thr/{dtype}/{op}", p, count, dtype, op) for p in range(n)]
        expected = reduce_ref(inputs, op)
        x = inputs[r].clone()
        comm.all_reduce(x, op)
        assert_equal(x, expected, f"threaded all_reduce {dtype} {op}", True)
        y = inputs[r].clone()
        comm.reduce(y, n - 1, op)
        assert_equal(y, expected if r == n - 1 else inputs[r], f"threaded reduce {dtype} {op}", True)


def _dtype(comm: Communicator, dtype: torch.dtype) -> None:
    """Every reduce op of one dtype at an odd size of a few hundred thousand elements.

    With more than 2 ranks the size is smaller: the references, computed by every rank
    for every rank's input, dominate the run time on a 2-core machine.
    """
    n, r = comm.size, comm.rank
    count = 200_003 if n <= 2 else 40_009
    per = count // (2 * n)
    for i, op in enumerate(["sum", "prod", "max", "min", "avg"]):
        if op in ("sum", "prod"):  # max/min/avg reuse the sum inputs
            inputs = [make(f"dt/{op}", p, count, dtype, op) for p in range(n)]
        expected = reduce_ref(inputs, op)
        x = inputs[r].clone()
        comm.all_reduce(x, op)
        assert_equal(x, expected, f"all_reduce {dtype} {op} n={count}", True)
        out = torch.empty(per, dtype=dtype)
        comm.reduce_scatter(out, inputs[r][: per * n], op)
        assert_equal(out, expected[r * per : (r + 1) * per], f"reduce_scatter {dtype} {op}", True)
        root = i % n
        y = inputs[r].clone()
        comm.reduce(y, root, op)
        assert_equal(y, expected if r == root else inputs[r], f"reduce {dtype} {op} root={root}", True)


def _sizes_around(unit: int) -> list[int]:
    return [unit - 1, unit, unit + 1, 3 * unit + 5]


def _boundary_reductions(comm: Communicator) -> None:
    """float32 sums at chunk - 1, chunk, chunk + 1 (small staging buffers: many chunks)."""
    shm = _shm(comm)
    n, r = comm.size, comm.rank
    half = shm.staging_bytes // 2
    chunk = (half // 4) & ~63
    small = shm.small_bytes // 4
    for count in sorted(set(_sizes_around(chunk) + _sizes_around(small) + [7 * chunk // n + 3])):
        inputs = [make("bd/ar", p, count, torch.float32) for p in range(n)]
        x = inputs[r].clone()
        comm.all_reduce(x)
        assert_equal(x, reduce_ref(inputs, "sum"), f"all_reduce n={count}", True)
        root = count % n
        y = inputs[r].clone()
        comm.reduce(y, root, "min")
        if r == root:
            assert_equal(y, reduce_ref(inputs, "min"), f"reduce n={count}", True)
    window = (half // (n * 4)) & ~15
    for per in _sizes_around(window):
        inputs = [make("bd/rs", p, per * n, torch.float32) for p in range(n)]
        out = torch.empty(per)
        comm.reduce_scatter(out, inputs[r])
        assert_equal(out, reduce_ref(inputs, "sum")[r * per : (r + 1) * per], f"reduce_scatter per={per}", True)


def _boundary_movement(comm: Communicator) -> None:
    """Byte-exact data movement at the half-slot and per-rank window boundaries."""
    shm = _shm(comm)
    n, r = comm.size, comm.rank
    half = shm.staging_bytes // 2
    window = (half // n) & ~63
    u8 = torch.uint8
    for nb in _sizes_around(half):
        mine = make("bd/ag", r, nb, u8)
        out = torch.empty(nb * n, dtype=u8)
        comm.all_gather(out, mine)
        assert_equal(out, torch.cat([make("bd/ag", p, nb, u8) for p in range(n)]), f"all_gather {nb} B")
        root = nb % n
        src = make("bd/bc", root, nb, u8)
        x = src.clone() if r == root else torch.zeros(nb, dtype=u8)
        comm.broadcast(x, root)
        assert_equal(x, src, f"broadcast {nb} B")
        g = torch.empty(nb * n, dtype=u8) if r == root else None
        comm.gather(mine, g, root)
        if r == root:
            assert_equal(g, out, f"gather {nb} B")
    for nb in _sizes_around(window):
        root = (nb + 1) % n
        full = make("bd/sc", root, nb * n, u8)
        recv = torch.empty(nb, dtype=u8)
        comm.scatter(recv, full if r == root else None, root)
        assert_equal(recv, full[r * nb : (r + 1) * nb], f"scatter {nb} B")
        ins = [make("bd/a2a", p, nb * n, u8) for p in range(n)]
        out = torch.empty(nb * n, dtype=u8)
        comm.all_to_all(out, ins[r])
        assert_equal(out, torch.cat([ins[p][r * nb : (r + 1) * nb] for p in range(n)]), f"all_to_all {nb} B")

    # uneven: pair (p, q) moves (p + 2q) windows + q + 1 bytes, up to several rounds
    def rows(p: int, q: int) -> int:
        return (p + 2 * q) * window + q + 1

    ins = [make(f"bd/a2av/{p}", 0, sum(rows(p, q) for q in range(n)), u8) for p in range(n)]
    out = torch.empty(sum(rows(p, r) for p in range(n)), dtype=u8)
    comm.all_to_all(out, ins[r], [rows(p, r) for p in range(n)], [rows(r, q) for q in range(n)])
    parts = [ins[p][sum(rows(p, q) for q in range(r)) :][: rows(p, r)] for p in range(n)]
    assert_equal(out, torch.cat(parts), "all_to_all uneven, several rounds")


def _p2p_ordered(comm: Communicator) -> None:
    """Several messages per pair, around and above the ring size, all posted before any wait."""
    n, r = comm.size, comm.rank
    ring = _shm(comm).ring_bytes
    sizes = [1, ring - 1, ring, ring + 1, 3 * ring + 17]
    works, recvs = [], []
    for p in range(n):
        if p == r:
            continue
        for i, nb in enumerate(sizes):
            got = torch.empty(nb, dtype=torch.uint8)
            recvs.append((got, make(f"p2p/{p}->{r}/{i}", 0, nb, torch.uint8)))
            works.append(comm.recv(got, p, async_op=True))
        for i, nb in enumerate(sizes):
            works.append(comm.send(make(f"p2p/{r}->{p}/{i}", 0, nb, torch.uint8), p, async_op=True))
    for w in works:
        w.wait()
    for got, expected in recvs:
        assert_equal(got, expected, f"ordered p2p {got.numel()} B")


def _p2p_any_source(comm: Communicator) -> None:
    n, r = comm.size, comm.rank
    if r == 0:
        sources = []
        for _ in range(n - 1):
            y = torch.empty(3, dtype=torch.int64)
            src = comm.recv(y, None)
            assert_equal(y, torch.full((3,), src, dtype=torch.int64), f"any-source payload from {src}")
            sources.append(src)
        assert sorted(sources) == list(range(1, n)), sources
    else:
        comm.send(torch.full((3,), r, dtype=torch.int64), 0)
    comm.barrier()


def _p2p_with_collectives(comm: Communicator) -> None:
    """p2p posted, collectives run meanwhile, p2p completed afterwards."""
    n, r = comm.size, comm.rank
    nxt, prv = (r + 1) % n, (r - 1) % n
    got = torch.empty(400_001)
    wr = comm.recv(got, prv, async_op=True)
    ws = comm.send(make("p2pc", r, 400_001, torch.float32), nxt, async_op=True)
    x = torch.ones(100_003)
    comm.all_reduce(x)
    assert_equal(x, torch.full((100_003,), float(n)), "all_reduce during p2p", True)
    ws.wait()
    wr.wait()
    assert_equal(got, make("p2pc", prv, 400_001, torch.float32), "p2p across collectives")


def _p2p_wait_timeout(comm: Communicator) -> None:
    """A handle's wait(timeout) raises FlagcxTimeout while the peer has not sent; the op still completes later."""
    shm, r = _shm(comm), comm.rank
    if r == 0:
        got = torch.empty(5)
        handle = shm.recv(as_bytes(got), 1)  # adapters move byte views
        try:
            handle.wait(0.2)
        except flagcx.FlagcxTimeout as exc:
            assert "recv from rank 1" in str(exc) and "0 of 20 bytes" in str(exc), str(exc)
        else:
            raise AssertionError("wait(0.2) returned before the peer sent")
        assert not handle.done()
        comm.barrier()
        handle.wait()
        assert handle.done() and handle.source() == 1
        assert_equal(got, torch.arange(5.0), "recv after a timed-out wait")
    else:
        comm.barrier()
        if r == 1:
            shm.send(as_bytes(torch.arange(5.0)), 0).wait()


def _p2p_nobody_waits(comm: Communicator) -> None:
    """A message larger than the ring moves while the rank that posted its half waits on something else (the store).

    Rank 0 isends to rank 1, which receives blocking; then rank 1 irecvs from rank 0, which
    sends blocking. The rank with the posted op blocks outside flagcx until its peer's
    blocking call returned, so only its progress thread can move the ring's rest.
    """
    r, n = comm.rank, comm.size
    nb = 4 * _shm(comm).ring_bytes + 13
    data = make("p2p/undriven", 0, nb, torch.uint8)
    store = comm._store
    for turn in ("send", "recv"):
        key = f"p2p/undriven/{turn}"
        if r == 0:
            work = comm.send(data, 1, async_op=True) if turn == "send" else None
            got = torch.empty(nb, dtype=torch.uint8)
            if turn == "recv":
                work = comm.recv(got, 1, async_op=True)
            store.wait([key])
            assert work is not None
            work.wait()
            if turn == "recv":
                assert_equal(got, data, "irecv completed while this rank waited on the store")
        elif r == 1:
            if turn == "send":
                got = torch.empty(nb, dtype=torch.uint8)
                comm.recv(got, 0)
                assert_equal(got, data, "recv of an isend whose rank waits on the store")
            else:
                comm.send(data, 0)
            store.set(key, b"1")
    comm.barrier()
    assert n >= 2


def _fast_paths(comm: Communicator, dtype: torch.dtype) -> None:
    """Every op's later calls take the fast path (the ordinary one raises here) and give the exact result.

    Random data, sizes 1, 7 and 1031 elements per rank, out of place and in NCCL's in-place
    layouts (all_to_all: one buffer), every root; send/recv around the ring.
    """
    n, r = comm.size, comm.rank

    def refuse(op, *args, **kwargs):
        raise AssertionError(f"{op} took the ordinary path; the fast path should have run it")

    def inputs(tag: str, k: int) -> list[torch.Tensor]:
        return [make(f"fp/{tag}", p, k, dtype) for p in range(n)]

    def calls(k: int, root: int) -> None:
        xs = inputs("ar", k)
        out = torch.empty(k, dtype=dtype)
        comm.all_reduce(xs[r], out=out)
        assert_equal(out, reduce_ref(xs, "sum"), f"all_reduce {k}", True)
        x = xs[r].clone()
        comm.all_reduce(x)
        assert_equal(x, reduce_ref(xs, "sum"), f"all_reduce in place {k}", True)
        big = inputs("rs", k * n)
        out = torch.empty(k, dtype=dtype)
        comm.reduce_scatter(out, big[r])
        assert_equal(out, reduce_ref(big, "sum")[r * k : (r + 1) * k], f"reduce_scatter {k}", True)
        out = torch.full((k,), 7, dtype=dtype)
        comm.reduce(xs[r], root, out=out)
        assert_equal(out, reduce_ref(xs, "sum") if r == root else torch.full((k,), 7, dtype=dtype), f"reduce {k} root {root}", True)
        gathered = torch.empty(k * n, dtype=dtype)
        comm.all_gather(gathered, xs[r])
        assert_equal(gathered, torch.cat(xs), f"all_gather {k}")
        gathered = torch.empty(k * n, dtype=dtype)
        gathered[r * k : (r + 1) * k] = xs[r]
        comm.all_gather(gathered, gathered[r * k : (r + 1) * k])
        assert_equal(gathered, torch.cat(xs), f"all_gather in place {k}")
        b = xs[r].clone()
        comm.broadcast(b, root)
        assert_equal(b, xs[root], f"broadcast {k} root {root}")
        g = torch.empty(k * n, dtype=dtype) if r == root else None
        comm.gather(xs[r], g, root)
        if g is not None:
            assert_equal(g, torch.cat(xs), f"gather {k} root {root}")
        s = torch.empty(k, dtype=dtype)
        comm.scatter(s, big[root] if r == root else None, root)
        assert_equal(s, big[root][r * k : (r + 1) * k], f"scatter {k} root {root}")
        out = torch.empty(k * n, dtype=dtype)
        comm.all_to_all(out, big[r])
        exchanged = torch.cat([big[p][r * k : (r + 1) * k] for p in range(n)])
        assert_equal(out, exchanged, f"all_to_all {k}")
        both = big[r].clone()
        comm.all_to_all(both, both)
        assert_equal(both, exchanged, f"all_to_all in place {k}")
        both = big[r].clone()
        comm.reduce_scatter(both[r * k : (r + 1) * k], both)
        assert_equal(both[r * k : (r + 1) * k], reduce_ref(big, "sum")[r * k : (r + 1) * k], f"reduce_scatter in place {k}", True)
        if r == root:
            whole = torch.empty(k * n, dtype=dtype)
            whole[r * k : (r + 1) * k] = xs[r]
            comm.gather(whole[r * k : (r + 1) * k], whole, root)
            assert_equal(whole, torch.cat(xs), f"gather in place {k} root {root}")
            whole = big[root].clone()
            comm.scatter(whole[r * k : (r + 1) * k], whole, root)
            assert_equal(whole, big[root], f"scatter in place {k} root {root}")
        else:
            comm.gather(xs[r], None, root)
            mine = torch.empty(k, dtype=dtype)
            comm.scatter(mine, None, root)
            assert_equal(mine, big[root][r * k : (r + 1) * k], f"scatter {k} root {root} (in place on the root)")
        if r == root:  # torch's list forms: each block at its own address (the root's own block may be mine itself)
            blocks = [torch.full((k,), 9, dtype=dtype) for _ in range(n)]
            comm.gather(xs[r], blocks, root)
            assert_equal(torch.cat(blocks), torch.cat(xs), f"gather into a list {k} root {root}")
            blocks[r] = mine = xs[r].clone()
            comm.gather(mine, blocks, root)
            assert_equal(torch.cat(blocks), torch.cat(xs), f"gather into a list, own block in place {k} root {root}")
            parts = list(big[root].clone().split(k))
            s = torch.empty(k, dtype=dtype)
            comm.scatter(s, parts, root)
            comm.scatter(parts[r], parts, root)
            assert_equal(s, big[root][r * k : (r + 1) * k], f"scatter from a list {k} root {root}")
            assert_equal(torch.cat(parts), big[root], f"scatter from a list, own block in place {k} root {root}")
        else:
            comm.gather(xs[r], None, root)
            comm.gather(xs[r], None, root)
            s = torch.empty(k, dtype=dtype)
            comm.scatter(s, None, root)
            comm.scatter(s, None, root)
            assert_equal(s, big[root][r * k : (r + 1) * k], f"scatter from a list {k} root {root}")
        got = torch.empty(k, dtype=dtype)
        nxt, prv = (r + 1) % n, (r - 1) % n
        if r % 2 == 0:
            comm.send(xs[r], nxt)
            assert comm.recv(got, prv) == prv
        else:
            assert comm.recv(got, prv) == prv
            comm.send(xs[r], nxt)
        assert_equal(got, xs[prv], f"send/recv {k}")

    calls(5, 0)  # the ordinary path fills the fast path's cache
    x, blocks = torch.ones(3, dtype=dtype), [torch.empty(3, dtype=dtype) for _ in range(n)]
    for kind, bad in (
        ("scatter", blocks[:-1]),  # one block short
        ("scatter", [*blocks[:-1], torch.empty(4, dtype=dtype)]),  # a block of another size
        ("gather", [torch.empty(3, dtype=torch.int16 if dtype == torch.int8 else torch.int8), *blocks[1:]]),  # another dtype
        ("scatter", [x] * n),  # other ranks' blocks at mine's address: the ordinary path stages them
    ):
        if r == 0:  # the root's list decides (off the root the fast path would run the call)
            assert not comm._fast.movement(kind, x, bad, 0), f"{kind} took the fast path with {[(t.dtype, t.numel()) for t in bad]}"
    comm._call = refuse  # type: ignore[method-assign]  # this instance only
    try:
        for k in (1, 7, 1031):
            for root in range(n):
                calls(k, root)
    finally:
        del comm._call
    comm.barrier()


def _allgather_floor(comm: Communicator) -> None:
    """all_gather goes single copy from 256 KiB blocks only (below, through the segment): byte-exact on both sides of that floor."""
    n, r = comm.size, comm.rank
    for nb in ((256 << 10) - 1, 256 << 10, (256 << 10) + 13):
        want = torch.cat([make("ag/floor", p, nb, torch.uint8) for p in range(n)])
        out = torch.empty(nb * n, dtype=torch.uint8)
        comm.all_gather(out, make("ag/floor", r, nb, torch.uint8))
        assert_equal(out, want, f"all_gather {nb} B per rank")
        out = torch.zeros(nb * n, dtype=torch.uint8)
        out[r * nb : (r + 1) * nb] = want[r * nb : (r + 1) * nb]
        comm.all_gather(out, out[r * nb : (r + 1) * nb])
        assert_equal(out, want, f"all_gather in place {nb} B per rank")


def _single_copy_setup(single: Communicator, staged: Communicator) -> None:
    """The threshold is the one asked for where every rank can read its peers' memory (probed here too), else 0; 0 asked: off."""
    from flagcx.adapters.shm import _lib

    adapter = _shm(single)
    readable = bool(_lib.fxs_cma_probe(adapter._c))
    assert adapter.single_copy == (1024 if readable else 0), (adapter.single_copy, readable)
    assert _shm(staged).single_copy == 0


def _alltoallv_mismatch(comm: Communicator) -> None:
    """Splits that disagree between ranks: every rank gets InvalidArgument, the communicator lives on."""
    n, r = comm.size, comm.rank
    ins = torch.zeros(n, 2)
    out_splits = [1] * n
    if r == 0:
        out_splits = [2, 0] + [1] * (n - 2)  # expects 2 rows from itself, none from rank 1
    try:
        comm.all_to_all(torch.empty(n, 2), ins, out_splits, [1] * n)
    except InvalidArgument as exc:
        assert "rank 0 sends 8 bytes to rank 0 but rank 0 expects 16" in str(exc), str(exc)
    else:
        raise AssertionError("mismatched splits were accepted")
    x = torch.ones(3)
    comm.all_reduce(x)
    assert_equal(x, torch.full((3,), float(n)), "all_reduce after rejected splits", True)


def _forked_child(comm: Communicator) -> None:
    """A forked child that tears its copy of the adapter down must not disturb the parent's rank."""
    pid = os.fork()
    if pid == 0:
        try:
            _shm(comm)._finalizer()  # what interpreter exit would run in the child
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    x = torch.ones(7)
    comm.all_reduce(x)
    assert_equal(x, torch.full((7,), float(comm.size)), "all_reduce after a forked child exited", True)


def _mismatched_calls(rank: int, size: int) -> None:
    """Rank 0 calls all_reduce while the others call all_gather: InvalidArgument naming the other side."""
    comm = Communicator.from_env(name="shm-mismatch")
    try:
        try:
            if rank == 0:
                comm.all_reduce(torch.ones(100))
            else:
                comm.all_gather(torch.empty(100 * size), torch.ones(100))
        except InvalidArgument as exc:
            text = str(exc)
            assert ("rank 0 called all_reduce(float32[100], sum)" in text) if rank else ("called all_gather(400 bytes)" in text), text
            assert "communicator shm-mismatch: " in text and "; every rank must call the same collectives" in text, text
        else:
            raise AssertionError("mismatched collectives were not detected")
        try:
            comm.barrier()
        except flagcx.FlagcxError as exc:
            assert "unusable" in str(exc), str(exc)
        else:
            raise AssertionError("a broken communicator accepted another call")
    finally:
        comm.destroy()


def _alltoall_in_place_on_some(rank: int, size: int) -> None:
    """all_to_all in place on rank 0 only: the ranks' calls differ, and each side's error names the other's."""
    comm = Communicator.from_env(name="shm-a2a-mix")
    try:
        data = torch.arange(8 * size, dtype=torch.float32)
        try:
            comm.all_to_all(data, data) if rank == 0 else comm.all_to_all(torch.empty_like(data), data)
        except InvalidArgument as exc:
            text = str(exc)
            theirs = "rank 0 called all_to_all(32 bytes, in place)" if rank else "called all_to_all(32 bytes)"
            assert theirs in text and "in place on every rank or on none" in text, text
        else:
            raise AssertionError("an all_to_all in place on one rank only was not detected")
    finally:
        comm.destroy()


def _mismatch_reaches_root(rank: int, size: int) -> None:
    """A broadcast whose root sends fewer bytes than the others expect: the root returns from its part,
    the receivers raise InvalidArgument, and the root's next call raises at once, naming a rank that saw it."""
    comm = Communicator.from_env(name="shm-bcast-size")
    try:
        try:
            comm.broadcast(torch.ones(4 if rank == 0 else 5), 0)
        except InvalidArgument as exc:
            assert rank != 0 and "called broadcast" in str(exc), str(exc)
        else:
            assert rank == 0, "a receiver of a mismatched broadcast returned success"
        start = time.monotonic()
        try:
            comm.all_reduce(torch.ones(3))
        except flagcx.FlagcxError as exc:
            text = str(exc)
            assert ("unusable" in text) if rank else ("do not match" in text), text
            assert time.monotonic() - start < 5, f"the next call took {time.monotonic() - start:.1f} s to fail"
        else:
            raise AssertionError("a rank ran its next collective on a communicator with a mismatched call")
    finally:
        comm.destroy()


def _p2p_size_mismatch(rank: int, size: int) -> None:
    """A recv smaller than the message: InvalidArgument naming the sender and both sizes."""
    comm = Communicator.from_env(name="shm-p2p-mismatch")
    try:
        if rank == 0:
            comm.send(torch.ones(10), 1)
        elif rank == 1:
            try:
                comm.recv(torch.empty(11), 0)
            except InvalidArgument as exc:
                assert "rank 0 sent a message of 40 bytes but the matching recv holds 44 bytes" in str(exc), str(exc)
            else:
                raise AssertionError("a recv of the wrong size was accepted")
    finally:
        comm.destroy()
