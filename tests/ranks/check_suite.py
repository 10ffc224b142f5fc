"""Suite for FLAGCX_CHECK=1: matching calls run normally; mismatched ones raise on every rank."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from flagcx import Communicator, InvalidArgument

from ..helpers.matrix import Check, movement_checks, reduction_checks
from ..helpers.reference import assert_equal


def _mismatch(comm: Communicator, call_on, words: list[str]) -> None:
    """Every rank runs ``call_on(rank)``; each must raise InvalidArgument naming the group, both calls and the fix (the shm transport's style)."""
    try:
        call_on(comm.rank)
    except InvalidArgument as exc:
        text = str(exc)
        for w in words + [f"(rank {comm.rank}): communicator check: ", " while this rank called #", "; every rank must call the same collectives"]:
            assert w in text, f"{text!r} lacks {w!r}"
    else:
        raise AssertionError("a mismatched collective was not detected")
    y = torch.ones(3)  # the communicator is still consistent afterwards
    comm.all_reduce(y)
    assert_equal(y, torch.full((3,), float(comm.size)), "all_reduce after a detected mismatch")


def check_suite(rank: int, size: int) -> Iterable[Check]:
    comm = Communicator.from_env(name="check")
    assert comm._check, "run with FLAGCX_CHECK=1"
    yield from reduction_checks(comm, "checked", dtypes=[torch.float32, torch.int64], ops=["sum", "max", "avg"])
    yield from movement_checks(comm, "checked", dtypes=[torch.float32])
    x = torch.ones(8)
    yield (
        "other_op",
        lambda: _mismatch(comm, lambda r: comm.all_reduce(x.clone()) if r == 0 else comm.all_gather(torch.empty(8 * size), x), ["all_reduce", "all_gather"]),
    )
    yield (
        "other_dtype",
        lambda: _mismatch(comm, lambda r: comm.all_reduce(torch.ones(8, dtype=torch.float64 if r == 1 else torch.float32)), ["float64", "float32"]),
    )
    yield "other_size", lambda: _mismatch(comm, lambda r: comm.all_reduce(torch.ones(8 + (r == size - 1))), ["[8]", "[9]"])
    yield "other_root", lambda: _mismatch(comm, lambda r: comm.broadcast(torch.ones(4), 1 if r == 0 else 0), ["root=0", "root=1"])
    yield "other_reduce_op", lambda: _mismatch(comm, lambda r: comm.all_reduce(torch.ones(4), "max" if r == 0 else "sum"), ["max", "sum"])
    yield "skipped_call", lambda: _mismatch(comm, lambda r: comm.barrier() if r == 0 else comm.all_reduce(torch.ones(2)), ["barrier", "all_reduce"])
    yield "all_to_all_splits", lambda: _split_mismatch(comm)
    yield "all_to_all_even_size", lambda: _split_mismatch(comm, even=True)
    yield "p2p_recv_first_exchange", lambda: _p2p_exchange(comm)
    yield "p2p_other_dtype", lambda: _p2p_mismatch(comm)
    yield "destroy", comm.destroy


def _p2p_exchange(comm: Communicator) -> None:
    """Ranks 0 and 1 post their receives before their sends (nothing in the check waits before a transport op)."""
    if comm.rank > 1:
        return
    peer = 1 - comm.rank
    got = torch.empty(5, dtype=torch.int64)
    works = [comm.recv(got, peer, async_op=True), comm.send(torch.arange(5) + 10 * comm.rank, peer, async_op=True)]
    for w in works:
        w.wait()
    assert_equal(got, torch.arange(5) + 10 * peer, "exchanged")


def _p2p_mismatch(comm: Communicator) -> None:
    """Rank 0 sends float32[8], rank 1 receives int32[8] (the same bytes, which no transport can tell apart).

    Rank 1 raises at its recv; rank 0's next checked call carries the report, so every rank raises at the
    following collective; the communicator is usable afterwards."""
    rank = comm.rank
    if rank == 0:
        comm.send(torch.ones(8), 1)
    elif rank == 1:
        try:
            comm.recv(torch.empty(8, dtype=torch.int32), 0)
        except InvalidArgument as exc:
            assert "float32[8]" in str(exc) and "int32[8]" in str(exc) and "rank 0" in str(exc), str(exc)
        else:
            raise AssertionError("a recv of another dtype than its send was not detected")
    try:
        comm.all_reduce(torch.ones(2))
    except InvalidArgument as exc:
        assert "did not match (found by rank(s) " in str(exc) and "rank 0's send" in str(exc), str(exc)  # [1], or [0, 1] once rank 0 saw the report
    else:
        raise AssertionError("the collective after a mismatched send did not fail on every rank")
    y = torch.ones(3)
    comm.all_reduce(y)
    assert_equal(y, torch.full((3,), float(comm.size)), "all_reduce after a detected p2p mismatch")


def _split_mismatch(comm: Communicator, even: bool = False) -> None:
    """Rank 1 sends rank 0 more than rank 0 expects: every rank raises naming the pair; the communicator stays usable."""
    size, rank = comm.size, comm.rank
    if even:
        rows = 2 if rank == 1 else 1
        call = lambda: comm.all_to_all(torch.empty(rows * size), torch.ones(rows * size))  # noqa: E731
        words = ["rank 1 sends 8 bytes to rank 0, which expects 4"]
    else:
        in_splits = [2 if (rank == 1 and j == 0) else 1 for j in range(size)]
        call = lambda: comm.all_to_all(torch.empty(size), torch.ones(sum(in_splits)), [1] * size, in_splits)  # noqa: E731
        words = ["rank 1 sends 8 bytes to rank 0, which expects 4"]
    try:
        call()
    except InvalidArgument as exc:
        for w in words + ["split sizes do not match"]:
            assert w in str(exc), f"{exc} lacks {w!r}"
    else:
        raise AssertionError("a mismatched all_to_all was not detected")
    y = torch.ones(3)
    comm.all_reduce(y)
    assert_equal(y, torch.full((3,), float(size)), "all_reduce after a detected mismatch")
