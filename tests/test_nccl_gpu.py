"""The NCCL adapter on 2 GPUs: every op of the adapter contract against exact references.

Two spawned ranks (one GPU each) build NcclAdapter directly from a store; ops run on
the current stream and results are compared after a synchronize. Covers reductions
(every dtype x op at sizes that are not powers of two, in and out of place), data
movement on byte views (as the core passes them), deferred send/recv in a ring in both
directions, explicit groups, CUDA-graph capture, split, barrier, abort and close.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import pytest
import torch
import torch.distributed as dist

from flagcx.adapters import DONE, AdapterContext
from flagcx.bootstrap import store_from_env
from flagcx.tensors import as_bytes
from flagcx.types import ReduceOp

from .helpers.harness import assert_passed, run_suite
from .helpers.reference import FLOATS, INTS, PREMUL_FACTOR, assert_equal, make, reduce_ref

pytestmark = pytest.mark.gpu

SIZES = [0, 1, 13, 1031, 300007]
OPS = {"sum": ReduceOp.SUM, "prod": ReduceOp.PROD, "max": ReduceOp.MAX, "min": ReduceOp.MIN, "avg": ReduceOp.AVG}
MOVE_DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.uint8]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_nccl_adapter_two_gpus():
    assert_passed(run_suite("tests.test_nccl_gpu:suite", 2, env={"NCCL_NVLS_ENABLE": "0"}), min_checks=60)


def suite(rank: int, size: int) -> Iterable[tuple[str, Callable[[], None]]]:
    from flagcx.adapters.nccl import NcclAdapter

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    timeout = float(os.environ["FLAGCX_TIMEOUT"])
    store = dist.PrefixStore("nccl-gpu/", store_from_env(timeout))
    ctx = AdapterContext(store=store, rank=rank, size=size, timeout=timeout, device=dev, label="nccl-gpu", global_ranks=list(range(size)))
    a = NcclAdapter(ctx)

    def inputs(tag: str, n: int, dtype: torch.dtype, op=None) -> list[torch.Tensor]:
        return [make(tag, r, n, dtype, op, "cuda") for r in range(size)]

    def done(handle) -> None:
        assert handle is DONE, f"expected DONE, got {handle!r}"
        torch.cuda.synchronize()

    def init() -> None:
        lib = a._lib
        assert lib.comm_int("CommCount", a._comm) == size and lib.comm_int("CommUserRank", a._comm) == rank
        assert lib.comm_device(a._comm) == rank
        a.check_async_error()

    yield "init", init

    # ------------------------------------------------------------------ reductions
    def allreduce(dtype, name) -> None:
        for n in SIZES:
            xs = inputs(f"ar/{name}", n, dtype, name)
            expected = reduce_ref(xs, name)
            out = torch.empty_like(xs[rank])
            done(a.allreduce(xs[rank], out, OPS[name]))
            assert_equal(out, expected, f"allreduce {dtype} {name} n={n} out of place", True)
            assert_equal(xs[rank], make(f"ar/{name}", rank, n, dtype, name, "cuda"), "allreduce input untouched")
            x = xs[rank].clone()
            done(a.allreduce(x, x, OPS[name]))
            assert_equal(x, expected, f"allreduce {dtype} {name} n={n} in place", True)

    def reducescatter(dtype, name) -> None:
        for n in SIZES:
            xs = inputs(f"rs/{name}", n * size, dtype, name)
            expected = reduce_ref(xs, name)[rank * n : (rank + 1) * n]
            out = torch.empty(n, dtype=dtype, device=dev)
            done(a.reducescatter(xs[rank], out, OPS[name]))
            assert_equal(out, expected, f"reducescatter {dtype} {name} n={n}", True)
            buf = xs[rank].clone()  # in place: recv is this rank's block of send
            done(a.reducescatter(buf, buf[rank * n : (rank + 1) * n], OPS[name]))
            assert_equal(buf[rank * n : (rank + 1) * n], expected, f"reducescatter {dtype} {name} n={n} in place", True)

    def reduce(dtype, name) -> None:
        for i, n in enumerate(SIZES):
            root = i % size
            xs = inputs(f"red/{name}", n, dtype, name)
            x = xs[rank].clone()
            out = torch.zeros_like(x)
            done(a.reduce(x, out, OPS[name], root))
            if rank == root:
                assert_equal(out, reduce_ref(xs, name), f"reduce {dtype} {name} n={n} root={root}", True)
            assert_equal(x, xs[rank], f"reduce {dtype} {name} n={n}: send modified")
            done(a.reduce(x, x, OPS[name], root))  # in place, as the core passes it (recv is send off the root)
            expected = reduce_ref(xs, name) if rank == root else xs[rank]
            assert_equal(x, expected, f"reduce {dtype} {name} n={n} root={root} in place", True)

    for dtype in FLOATS + INTS:
        for name in OPS:
            if name == "avg" and not dtype.is_floating_point:
                continue  # the core computes integer AVG as SUM then a truncating division
            yield f"allreduce/{dtype}/{name}", lambda d=dtype, o=name: allreduce(d, o)
            yield f"reducescatter/{dtype}/{name}", lambda d=dtype, o=name: reducescatter(d, o)
            yield f"reduce/{dtype}/{name}", lambda d=dtype, o=name: reduce(d, o)

    def premul() -> None:
        for dtype in FLOATS:
            xs = inputs("premul", 1031, dtype)
            out = torch.empty_like(xs[rank])
            done(a.allreduce(xs[rank], out, ReduceOp.PREMUL_SUM, factor=PREMUL_FACTOR))
            assert_equal(out, reduce_ref(xs, "premul_sum"), f"premul_sum {dtype}", True)

    yield "allreduce_premul", premul

    # ------------------------------------------------------------------ data movement (byte views)
    def allgather(dtype) -> None:
        for n in SIZES:
            xs = inputs("ag", n, dtype)
            out = torch.empty(n * size, dtype=dtype, device=dev)
            done(a.allgather(as_bytes(xs[rank]), as_bytes(out)))
            assert_equal(out, torch.cat(xs), f"allgather {dtype} n={n}")
            buf = torch.zeros(n * size, dtype=dtype, device=dev)
            mine = buf[rank * n : (rank + 1) * n]
            mine.copy_(xs[rank])
            done(a.allgather(as_bytes(mine), as_bytes(buf)))
            assert_equal(buf, torch.cat(xs), f"allgather {dtype} n={n} in place")

    def broadcast(dtype) -> None:
        for i, n in enumerate(SIZES):
            root = i % size
            src = make("bc", root, n, dtype, None, "cuda")
            x = src.clone() if rank == root else torch.zeros(n, dtype=dtype, device=dev)
            done(a.broadcast(as_bytes(x), root))
            assert_equal(x, src, f"broadcast {dtype} n={n} root={root}")

    def gather_scatter(dtype) -> None:
        for i, n in enumerate(SIZES):
            root = (i + 1) % size
            xs = inputs("ga", n, dtype)
            out = torch.zeros(n * size, dtype=dtype, device=dev) if rank == root else None
            done(a.gather(as_bytes(xs[rank]), as_bytes(out) if out is not None else None, root))
            if rank == root:
                assert_equal(out, torch.cat(xs), f"gather {dtype} n={n} root={root}")
            full = make("sc", root, n * size, dtype, None, "cuda")
            recv = torch.zeros(n, dtype=dtype, device=dev)
            done(a.scatter(as_bytes(full) if rank == root else None, as_bytes(recv), root))
            assert_equal(recv, full[rank * n : (rank + 1) * n], f"scatter {dtype} n={n} root={root}")

    def alltoall(dtype) -> None:
        for n in SIZES:
            xs = inputs("a2a", n * size, dtype)
            out = torch.zeros(n * size, dtype=dtype, device=dev)
            done(a.alltoall(as_bytes(xs[rank]), as_bytes(out)))
            expected = torch.cat([xs[r][rank * n : (rank + 1) * n] for r in range(size)])
            assert_equal(out, expected, f"alltoall {dtype} n={n}")
            buf = xs[rank].clone()  # in place: the adapter must copy the input first
            done(a.alltoall(as_bytes(buf), as_bytes(buf)))
            assert_equal(buf, expected, f"alltoall {dtype} n={n} in place")

    def alltoallv(dtype) -> None:
        def count(src: int, dst: int) -> int:  # elements src sends dst; some zero, none a power of two
            return (src * 7 + dst * 3) % 5 * 13

        es = torch.empty(0, dtype=dtype).element_size()
        xs = [make("a2av", r, sum(count(r, d) for d in range(size)), dtype, None, "cuda") for r in range(size)]
        out = torch.zeros(sum(count(s, rank) for s in range(size)), dtype=dtype, device=dev)
        send_counts = [count(rank, d) * es for d in range(size)]
        recv_counts = [count(s, rank) * es for s in range(size)]
        done(a.alltoallv(as_bytes(xs[rank]), send_counts, as_bytes(out), recv_counts))
        pieces = []
        for s in range(size):
            start = sum(count(s, d) for d in range(rank))
            pieces.append(xs[s][start : start + count(s, rank)])
        assert_equal(out, torch.cat(pieces), f"alltoallv {dtype}")

    for dtype in MOVE_DTYPES:
        yield f"allgather/{dtype}", lambda d=dtype: allgather(d)
        yield f"broadcast/{dtype}", lambda d=dtype: broadcast(d)
        yield f"gather_scatter/{dtype}", lambda d=dtype: gather_scatter(d)
        yield f"alltoall/{dtype}", lambda d=dtype: alltoall(d)
        yield f"alltoallv/{dtype}", lambda d=dtype: alltoallv(d)

    # ------------------------------------------------------------------ point to point
    def ring(step: int) -> None:
        """Every rank posts isend to rank+step, then irecv from rank-step, then waits: needs the deferred launch."""
        for n in [1, 1031, 300007]:
            dst, src = (rank + step) % size, (rank - step) % size
            mine = make(f"ring{step}", rank, n, torch.float32, None, "cuda")
            got = torch.zeros(n, device=dev)
            hs = a.send(as_bytes(mine), dst)
            hr = a.recv(as_bytes(got), src)
            hr.wait()
            hs.wait()
            torch.cuda.synchronize()
            assert hs.done() and hr.done()
            assert_equal(got, make(f"ring{step}", src, n, torch.float32, None, "cuda"), f"ring step {step} n={n}")

    yield "ring/forward", lambda: ring(1)
    yield "ring/backward", lambda: ring(-1)

    def p2p_across_streams() -> None:
        """Posted on a side stream, waited from the default stream: wait() orders the caller's stream after it."""
        peer = 1 - rank
        n = 300007
        mine = make("p2p-stream", rank, n, torch.float32, None, "cuda")
        got = torch.zeros(n, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            hs = a.send(as_bytes(mine), peer)
            hr = a.recv(as_bytes(got), peer)
        hr.wait()
        hs.wait()
        result = got * 1  # ordered after the recv on the default stream
        assert_equal(result, make("p2p-stream", peer, n, torch.float32, None, "cuda"), "recv waited across streams")

    yield "p2p/across_streams", p2p_across_streams

    def p2p_flushed_by_collective() -> None:
        """A queued recv/send pair is launched when a collective is issued (before it, in order)."""
        n = 1031
        payload = make("p2p-coll", 0, n, torch.int64, None, "cuda")
        got = torch.zeros(n, dtype=torch.int64, device=dev)
        h = a.send(as_bytes(payload), 1) if rank == 0 else a.recv(as_bytes(got), 0)
        x = torch.full((7,), rank + 1, dtype=torch.int32, device=dev)
        done(a.allreduce(x, x, ReduceOp.SUM))
        assert_equal(x, torch.full((7,), size * (size + 1) // 2, dtype=torch.int32), "allreduce after queued p2p")
        h.wait()
        if rank == 1:
            assert_equal(got, payload, "recv launched by the collective")

    yield "p2p/flushed_by_collective", p2p_flushed_by_collective

    def group() -> None:
        peer = 1 - rank
        xs = inputs("grp", 1031, torch.float32)
        ys = inputs("grp2", 13, torch.bfloat16)
        x, y = xs[rank].clone(), ys[rank].clone()
        mine = make("grp-p2p", rank, 77, torch.float32, None, "cuda")
        got = torch.zeros(77, device=dev)
        a.group_start()
        assert a.allreduce(x, x, ReduceOp.SUM) is DONE
        assert a.send(as_bytes(mine), peer) is DONE
        assert a.recv(as_bytes(got), peer) is DONE
        assert a.allreduce(y, y, ReduceOp.MAX) is DONE
        a.group_end()
        torch.cuda.synchronize()
        assert_equal(x, reduce_ref(xs, "sum"), "grouped allreduce sum", True)
        assert_equal(y, reduce_ref(ys, "max"), "grouped allreduce max", True)
        assert_equal(got, make("grp-p2p", peer, 77, torch.float32, None, "cuda"), "grouped send/recv")

    yield "group", group

    def graph() -> None:
        x = torch.full((1031,), float(rank + 1), device=dev)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            a.allreduce(x, x, ReduceOp.SUM)
        torch.cuda.synchronize()
        assert_equal(x, torch.full((1031,), float(rank + 1)), "capture does not run the op")
        total = float(size * (size + 1) // 2)
        g.replay()
        g.replay()
        torch.cuda.synchronize()
        assert_equal(x, torch.full((1031,), total * size), "two replays of a captured allreduce")

    yield "cuda_graph", graph

    def registered() -> None:
        x = make("reg", rank, 4099, torch.float32, None, "cuda")
        handle = a.register(x)
        try:
            expected = reduce_ref(inputs("reg", 4099, torch.float32), "sum")
            done(a.allreduce(x, x, ReduceOp.SUM))
            assert_equal(x, expected, "allreduce on a registered buffer", True)
        finally:
            a.deregister(handle)

    yield "register", registered

    def barrier() -> None:
        for _ in range(3):
            assert a.barrier() is DONE
        a.check_async_error()

    yield "barrier", barrier

    # ------------------------------------------------------------------ split, abort, close
    def split() -> None:
        child = a.split([1, 0])  # reversed order: child rank = position in the list
        assert child is not None and child.rank == 1 - rank and child.size == 2
        x = torch.full((13,), float(child.rank + 1), device=dev)
        done(child.allreduce(x, x, ReduceOp.SUM))
        assert_equal(x, torch.full((13,), 3.0), "allreduce on the split communicator")
        alone = a.split(rank)  # a color per rank: two single-rank communicators
        assert alone is not None and alone.size == 1 and alone.rank == 0
        y = torch.arange(5, device=dev, dtype=torch.float32)
        done(alone.allreduce(y, y, ReduceOp.SUM))
        assert_equal(y, torch.arange(5, dtype=torch.float32), "single-rank allreduce")
        only0 = a.split([0])
        assert (only0 is None) == (rank != 0)
        for c in (child, alone, only0):
            if c is not None:
                c.close()
                c.close()  # idempotent

    yield "split", split

    def abort() -> None:
        child = a.split([0, 1])
        x = torch.ones(13, device=dev)
        done(child.allreduce(x, x, ReduceOp.SUM))
        child.abort()
        child.abort()
        y = torch.ones(13, device=dev)
        done(a.allreduce(y, y, ReduceOp.SUM))  # the parent is unaffected
        assert_equal(y, torch.full((13,), float(size)), "parent after a child's abort")

    yield "abort", abort

    def close() -> None:
        a.close()
        a.close()

    yield "close", close
