"""The correctness matrix over a flagcx Communicator, shared by every adapter's tests.

ops x dtypes x reduce ops x {world, subgroup} x {sync, async, in-place, out-of-place,
non-contiguous} at sizes that are not powers of two (including 0 and sizes not
divisible by the group size), each against the exact reference of tests.helpers.reference.
The adapter under test is chosen by the environment (FLAGCX_CPU_ADAPTER...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Optional

import torch

import flagcx
from flagcx import Communicator, InvalidArgument, NotSupported, PremulSum

from .reference import MOVE_DTYPES, PREMUL_FACTOR, REDUCE_DTYPES, REDUCE_OPS, assert_equal, make, reduce_ref, supported

SIZES = [0, 1, 13, 1031]
Check = tuple[str, Callable[[], None]]


def op_arg(op: str):
    return PremulSum(PREMUL_FACTOR) if op == "premul_sum" else op


def _wait(work) -> None:
    if work is not None:
        work.wait()


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous tensor holding t's values (every other element of a larger buffer)."""
    big = torch.empty(t.numel() * 2, dtype=t.dtype, device=t.device)
    view = big[::2]
    view.copy_(t)
    return view


def reduction_checks(g: Optional[Communicator], label: str, device: str = "cpu", dtypes=REDUCE_DTYPES, ops=REDUCE_OPS, sizes=SIZES) -> Iterable[Check]:
    for dtype in dtypes:
        for op in ops:
            if not supported(dtype, op):
                continue
            yield f"{label}/all_reduce/{dtype}/{op}", lambda d=dtype, o=op: _all_reduce(g, label, d, o, device, sizes)
            yield f"{label}/reduce_scatter/{dtype}/{op}", lambda d=dtype, o=op: _reduce_scatter(g, label, d, o, device, sizes)
            yield f"{label}/reduce/{dtype}/{op}", lambda d=dtype, o=op: _reduce(g, label, d, o, device, sizes)


def _all_reduce(g, label, dtype, op, device, sizes) -> None:
    if g is None:
        return
    for i, n in enumerate(sizes):
        tag = f"{label}/ar/{n}"
        inputs = [make(tag, r, n, dtype, op, device) for r in range(g.size)]
        expected = reduce_ref(inputs, op)
        mode = i % 3
        x = inputs[g.rank].clone()
        if mode == 0:  # sync, in place
            g.all_reduce(x, op_arg(op))
            assert_equal(x, expected, f"all_reduce n={n} in-place", True)
        elif mode == 1:  # async, out of place
            out = torch.empty_like(x)
            work = g.all_reduce(x, op_arg(op), out=out, async_op=True)
            work.wait()
            assert_equal(out, expected, f"all_reduce n={n} out-of-place async", True)
            assert_equal(x, inputs[g.rank], f"all_reduce n={n} input untouched")
        else:  # non-contiguous, in place
            nc = _noncontig(x)
            g.all_reduce(nc, op_arg(op))
            assert_equal(nc, expected, f"all_reduce n={n} non-contiguous", True)


def _reduce_scatter(g, label, dtype, op, device, sizes) -> None:
    if g is None:
        return
    for i, n in enumerate(sizes):
        tag = f"{label}/rs/{n}"
        inputs = [make(tag, r, n * g.size, dtype, op, device) for r in range(g.size)]
        expected = reduce_ref(inputs, op)[g.rank * n : (g.rank + 1) * n]
        out = torch.empty(n, dtype=dtype, device=device)
        if i % 2 == 0:
            _wait(g.reduce_scatter(out, inputs[g.rank].clone(), op_arg(op), async_op=bool(i % 4)))
        else:
            blocks = list(inputs[g.rank].clone().chunk(g.size)) if n else [torch.empty(0, dtype=dtype, device=device)] * g.size
            _wait(g.reduce_scatter(out, blocks, op_arg(op), async_op=True))
        assert_equal(out, expected, f"reduce_scatter n={n}", True)


def _reduce(g, label, dtype, op, device, sizes) -> None:
    if g is None:
        return
    for i, n in enumerate(sizes):
        root = (i + 1) % g.size
        tag = f"{label}/red/{n}"
        inputs = [make(tag, r, n, dtype, op, device) for r in range(g.size)]
        x = inputs[g.rank].clone()
        out = torch.empty_like(x) if i % 2 else None
        _wait(g.reduce(x, root, op_arg(op), out=out, async_op=bool(i % 2)))
        if g.rank == root:
            assert_equal(out if out is not None else x, reduce_ref(inputs, op), f"reduce n={n} root={root}", True)
        if g.rank != root or out is not None:
            assert_equal(x, inputs[g.rank], f"reduce n={n}: input changed")


def movement_checks(g: Optional[Communicator], label: str, device: str = "cpu", dtypes=MOVE_DTYPES, sizes=SIZES) -> Iterable[Check]:
    for dtype in dtypes:
        yield f"{label}/all_gather/{dtype}", lambda d=dtype: _all_gather(g, label, d, device, sizes)
        yield f"{label}/broadcast/{dtype}", lambda d=dtype: _broadcast(g, label, d, device, sizes)
        yield f"{label}/gather_scatter/{dtype}", lambda d=dtype: _gather_scatter(g, label, d, device, sizes)
        yield f"{label}/all_to_all/{dtype}", lambda d=dtype: _all_to_all(g, label, d, device, sizes)
    yield f"{label}/all_gather_uneven", lambda: _all_gather_uneven(g, label, device)
    yield f"{label}/send_recv", lambda: _send_recv(g, label, device)
    yield f"{label}/barrier", lambda: _barrier(g)


def _all_gather(g, label, dtype, device, sizes) -> None:
    if g is None:
        return
    for i, n in enumerate(sizes):
        inputs = [make(f"{label}/ag/{n}", r, n, dtype, None, device) for r in range(g.size)]
        expected = torch.cat(inputs)
        out = torch.empty(n * g.size, dtype=dtype, device=device)
        _wait(g.all_gather(out, inputs[g.rank], async_op=bool(i % 2)))
        assert_equal(out, expected, f"all_gather flat n={n}")
        outs = [torch.empty(n, dtype=dtype, device=device) for _ in range(g.size)]
        _wait(g.all_gather(outs, inputs[g.rank], async_op=not bool(i % 2)))
        assert_equal(torch.cat(outs), expected, f"all_gather list n={n}")
        if n:  # in place: the input is this rank's block of the output
            buf = torch.empty(n * g.size, dtype=dtype, device=device)
            mine = buf[g.rank * n : (g.rank + 1) * n]
            mine.copy_(inputs[g.rank])
            g.all_gather(buf, mine)
            assert_equal(buf, expected, f"all_gather in-place n={n}")


def _all_gather_uneven(g, label, device) -> None:
    if g is None:
        return
    counts = [3 * r + 1 for r in range(g.size)]
    inputs = [make(f"{label}/agu", r, counts[r], torch.float32, None, device) for r in range(g.size)]
    outs = [torch.empty(c, device=device) for c in counts]
    _wait(g.all_gather(outs, inputs[g.rank], async_op=True))
    for r in range(g.size):
        assert_equal(outs[r], inputs[r], f"uneven all_gather block {r}")


def _broadcast(g, label, dtype, device, sizes) -> None:
    if g is None:
        return
    for i, n in enumerate(sizes):
        root = i % g.size
        src = make(f"{label}/bc/{n}", root, n, dtype, None, device)
        x = src.clone() if g.rank == root else torch.zeros(n, dtype=dtype, device=device)
        if i == 2:
            x = _noncontig(x)
        _wait(g.broadcast(x, root, async_op=bool(i % 2)))
        assert_equal(x, src, f"broadcast n={n} root={root}")


def _gather_scatter(g, label, dtype, device, sizes) -> None:
    if g is None:
        return
    for i, n in enumerate(sizes):
        root = (g.size - 1 - i) % g.size
        inputs = [make(f"{label}/ga/{n}", r, n, dtype, None, device) for r in range(g.size)]
        if i % 2:
            out = [torch.empty(n, dtype=dtype, device=device) for _ in range(g.size)] if g.rank == root else None
        else:
            out = torch.empty(n * g.size, dtype=dtype, device=device) if g.rank == root else None
        _wait(g.gather(inputs[g.rank], out, root, async_op=bool(i % 2)))
        if g.rank == root:
            got = torch.cat(out) if isinstance(out, list) else out
            assert_equal(got, torch.cat(inputs), f"gather n={n} root={root}")
        full = make(f"{label}/sc/{n}", root, n * g.size, dtype, None, device)
        src = None
        if g.rank == root:
            src = list(full.chunk(g.size)) if (i % 2 and n) else full
            if isinstance(src, list) and not n:
                src = [full[:0]] * g.size
        recv = torch.empty(n, dtype=dtype, device=device)
        _wait(g.scatter(recv, src, root, async_op=not bool(i % 2)))
        assert_equal(recv, full[g.rank * n : (g.rank + 1) * n], f"scatter n={n} root={root}")


def _all_to_all(g, label, dtype, device, sizes) -> None:
    if g is None:
        return
    size = g.size
    for n in sizes:
        # even, flat
        inputs = [make(f"{label}/a2a/{n}", r, n * size, dtype, None, device) for r in range(size)]
        out = torch.empty(n * size, dtype=dtype, device=device)
        g.all_to_all(out, inputs[g.rank])
        expected = torch.cat([inputs[r][g.rank * n : (g.rank + 1) * n] for r in range(size)])
        assert_equal(out, expected, f"all_to_all even n={n}")

    # uneven splits (rows of 3 elements), sizes not divisible by the group size
    def rows(src: int, dst: int) -> int:
        return (src * 7 + dst * 3) % 5

    ins = [make(f"{label}/a2av", r, 3 * sum(rows(r, d) for d in range(size)), dtype, None, device).view(-1, 3) for r in range(size)]
    in_splits = [rows(g.rank, d) for d in range(size)]
    out_splits = [rows(s, g.rank) for s in range(size)]
    out = torch.empty(sum(out_splits), 3, dtype=dtype, device=device)
    _wait(g.all_to_all(out, ins[g.rank], out_splits, in_splits, async_op=True))
    parts = []
    for s in range(size):
        start = sum(rows(s, d) for d in range(g.rank))
        parts.append(ins[s][start : start + rows(s, g.rank)])
    assert_equal(out, torch.cat(parts), "all_to_all uneven splits")
    # lists of different sizes
    lin = [make(f"{label}/a2al/{g.rank}/{d}", 0, rows(g.rank, d) + 1, dtype, None, device) for d in range(size)]
    lout = [torch.empty(rows(s, g.rank) + 1, dtype=dtype, device=device) for s in range(size)]
    g.all_to_all(lout, lin)
    for s in range(size):
        assert_equal(lout[s], make(f"{label}/a2al/{s}/{g.rank}", 0, rows(s, g.rank) + 1, dtype, None, device), f"all_to_all list from {s}")


def _send_recv(g, label, device) -> None:
    if g is None or g.size < 2:
        return
    nxt, prv = (g.rank + 1) % g.size, (g.rank - 1) % g.size
    for n in (1, 1031, 70001):
        mine = make(f"{label}/p2p/{n}", g.rank, n, torch.float32, None, device)
        got = torch.empty(n, device=device)
        # Both directions posted before waiting: must not deadlock.
        w_recv = g.recv(got, prv, async_op=True)
        w_send = g.send(mine, nxt, async_op=True)
        w_send.wait()
        w_recv.wait()
        assert_equal(got, make(f"{label}/p2p/{n}", prv, n, torch.float32, None, device), f"ring send/recv n={n}")
    if g.size >= 2:  # synchronous pair 0 <-> 1, then any-source where supported
        x = torch.arange(5, dtype=torch.int64, device=device) + g.rank
        if g.rank == 0:
            g.send(x, 1)
        elif g.rank == 1:
            y = torch.empty(5, dtype=torch.int64, device=device)
            assert g.recv(y, 0) == 0
            assert_equal(y, torch.arange(5, dtype=torch.int64), "sync recv")
        any_source = g._adapter(torch.device(device), "recv").capabilities.any_source
        if any_source:
            if g.rank == 1:
                g.send(x, 0)
            elif g.rank == 0:
                y = torch.empty(5, dtype=torch.int64, device=device)
                work = g.recv(y, None, async_op=True)
                work.wait()
                assert work.source_rank() == 1
                assert_equal(y, torch.arange(5, dtype=torch.int64) + 1, "any-source recv")


def _barrier(g) -> None:
    if g is None:
        return
    g.barrier()
    g.barrier(async_op=True).wait()


def error_checks(g: Optional[Communicator], label: str, device: str = "cpu") -> Iterable[Check]:
    yield f"{label}/errors", lambda: _errors(g, device)


def expect_error(exc_type, fn, *words) -> None:
    """Assert ``fn()`` raises ``exc_type`` (a FlagcxError) whose text names flagcx and every one of ``words``."""
    try:
        fn()
    except exc_type as exc:
        text = str(exc)
        for w in words:
            assert w in text, f"error text {text!r} lacks {w!r}"
        assert "flagcx" in text
        return
    raise AssertionError(f"expected {exc_type.__name__}")


def _errors(g, device) -> None:
    if g is None:
        return
    x = torch.ones(4, device=device)
    expect_error(InvalidArgument, lambda: g.all_reduce(x, out=torch.empty(5, device=device)), "out", "elements")
    expect_error(InvalidArgument, lambda: g.all_reduce(x, out=torch.empty(4, dtype=torch.float64, device=device)), "dtype")
    expect_error(InvalidArgument, lambda: g.all_reduce(x, out=torch.empty(4, device="meta")), "device")
    expect_error(InvalidArgument, lambda: g.broadcast(x, g.size), "root")
    expect_error(InvalidArgument, lambda: g.broadcast(x, -1), "root")
    expect_error(InvalidArgument, lambda: g.all_gather(torch.empty(3, device=device), x), "out")
    expect_error(InvalidArgument, lambda: g.all_gather([x] * (g.size + 1), x), "out")
    expect_error(InvalidArgument, lambda: g.reduce_scatter(torch.empty(3, device=device), x), "tensor")
    expect_error(InvalidArgument, lambda: g.send(x, g.rank), "peer")
    expect_error(
        InvalidArgument, lambda: g.all_to_all(torch.empty(5, device=device), torch.ones(5, device=device), [5] + [0] * (g.size - 1), [1] * g.size), "in_splits"
    )
    expect_error(NotSupported, lambda: g.all_reduce(torch.ones(3, dtype=torch.bool, device=device), "avg"), "AVG", "bool")
    expect_error(NotSupported, lambda: g.all_reduce(torch.ones(3, dtype=torch.int32, device=device), PremulSum(2.0)), "PREMUL_SUM")
    expect_error(InvalidArgument, lambda: g.all_reduce(x, "bogus"), "bogus")
    expect_error(InvalidArgument, lambda: g.all_reduce([x], "sum"), "tensor")
    one = torch.ones(1, device=device)
    expect_error(InvalidArgument, lambda: g.all_reduce(one.expand(4)), "tensor", "share memory")
    expect_error(InvalidArgument, lambda: g.all_reduce(x, out=one.expand(4)), "out", "share memory")
    expect_error(InvalidArgument, lambda: g.broadcast(one.expand(4), 0), "share memory")
    expect_error(InvalidArgument, lambda: g.all_gather(one.expand(4 * g.size), x), "out", "share memory")
    expect_error(InvalidArgument, lambda: g.all_gather([one.expand(4)] * g.size, x), "out[0]", "share memory")
    expect_error(InvalidArgument, lambda: g.all_reduce(one.expand(8 << 30)), "share memory")  # a 32 GiB view of 4 bytes
    # out-of-place with partially overlapping input and output: computed as if the input were copied first
    buf = torch.arange(12, dtype=torch.float32, device=device) + g.rank
    g.all_reduce(buf[:8], out=buf[4:])
    expected = sum(torch.arange(8, dtype=torch.float32) + r for r in range(g.size)).to(device)
    assert_equal(buf[4:], expected, "all_reduce into an output that overlaps its input")
    # the communicator still works after all those rejections
    y = torch.ones(3, device=device)
    g.all_reduce(y)
    assert_equal(y, torch.full((3,), float(g.size), device=device), "all_reduce after errors")


def subgroup_ranks(size: int) -> list[int]:
    """A non-contiguous, reordered subgroup (its rank order differs from the world's)."""
    if size >= 4:
        return [size - 1, 0, 2]
    return list(reversed(range(size)))


def comm_matrix(rank: int, size: int) -> Iterable[Check]:
    """Suite: the full matrix on the world communicator and on a subgroup."""
    comm = Communicator.from_env(name="matrix")
    sub = comm.split(subgroup_ranks(size))
    for label, g in (("world", comm), ("sub", sub)):
        yield from reduction_checks(g, label)
        yield from movement_checks(g, label)
        yield from error_checks(g, label)
    yield "destroy", lambda: (sub.destroy() if sub else None, comm.destroy())
    yield "closed", lambda: expect_error(flagcx.CommAborted, lambda: comm.all_reduce(torch.ones(1)), "destroyed")
