"""Rendezvous through a torch Store: all-gathers and broadcasts of small records, and agreement on settings.

Every rank-to-rank exchange at init (topology records, shm segment names, NCCL unique
ids) goes through :func:`store_allgather` / :func:`store_broadcast`; :func:`agree` and
:func:`require_same` make every rank raise alike when ranks were set differently.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Optional, TypeVar

from ..errors import FlagcxError, FlagcxTimeout, InvalidArgument

T = TypeVar("T")


def _missing(store, keys: list[str]) -> list[int]:
    """Indexes of the keys not in the store (raises the store's error when it is unreachable)."""
    return [i for i, key in enumerate(keys) if not store.check([key])]


def store_poll(store, key: str, timeout: float) -> Optional[bytes]:
    """The value of ``key`` once it exists, or None after ``timeout`` seconds (polls, so a dead writer never hangs it)."""
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while True:
        if store.check([key]):
            return store.get(key)
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.01)


def store_wait(store, keys: list[str], timeout: float, what: str, ranks: Optional[list[int]] = None) -> None:
    """Wait until every key exists, or raise FlagcxTimeout naming the ranks that never wrote theirs."""
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except Exception as exc:
        text = str(exc).lower()
        if "timeout" in text or "timed out" in text or "wait timeout" in text:
            try:
                late = _missing(store, keys)
            except Exception as down:
                raise FlagcxError(f"{what}: the store failed ({down}); is the store server (rank 0 / the launcher) still running?") from exc
            who = [ranks[i] if ranks else i for i in late]
            raise FlagcxTimeout(
                f"{what}: rank(s) {who} did not arrive within {timeout:g} s (a rank crashed, was not started, or is blocked in another call)"
            ) from exc
        raise FlagcxError(f"{what}: the store failed ({exc}); is the store server (rank 0 / the launcher) still running?") from exc


def store_allgather(store, key: str, rank: int, size: int, value: bytes, timeout: float, what: str) -> list[bytes]:
    """Every rank contributes ``value``; every rank gets the list in rank order.

    Each record carries its writer's group size. A rank that sees another size raises
    InvalidArgument naming both, and first fills the keys of the ranks that only the
    larger size has with a note, so that a rank waiting for them raises at once too
    (a rank started with WORLD_SIZE off by one fails fast on every rank, not by timeout).
    """
    try:
        store.set(f"{key}/{rank}", b"%d:" % size + value)
    except Exception as exc:
        raise FlagcxError(f"{what}: cannot write to the store ({exc}); is the store server (rank 0 / the launcher) still running?") from exc
    keys = [f"{key}/{r}" for r in range(size)]
    store_wait(store, keys, timeout, what)
    try:
        raw = [bytes(v) for v in store.multi_get(keys)]
    except Exception as exc:
        raise FlagcxError(f"{what}: the store failed ({exc}); is the store server (rank 0 / the launcher) still running?") from exc
    values = []
    sizes: dict[int, int] = {}
    for r, record in enumerate(raw):
        head, sep, body = record.partition(b":")
        if record.startswith(b"!"):  # another rank's note: the group sizes differ
            raise InvalidArgument(record[1:].decode(errors="replace"), op="init", rank=rank)
        if not sep or not head.isdigit():
            raise InvalidArgument(
                f"{what}: a foreign record sits at store key {keys[r]!r}; use a store (or prefix) of its own for every group", op="init", rank=rank
            )
        sizes[r] = int(head)
        values.append(body)
    if len(set(sizes.values()) | {size}) > 1:
        detail = ", ".join(f"rank {r}: {s}" for r, s in sizes.items())
        note = f"{what}: the ranks were started with different world / group sizes ({detail}); start every rank with the same WORLD_SIZE (or group size)"
        for r in range(size, max(sizes.values())):
            try:
                store.set(f"{key}/{r}", b"!" + note.encode())
            except Exception:  # the note only speeds up the other ranks' failure
                break
        raise InvalidArgument(note, op="init", rank=rank)
    return values


def store_broadcast(store, key: str, rank: int, root: int, value: Optional[bytes], timeout: float, what: str) -> bytes:
    """Root publishes ``value``; every rank returns it."""
    try:
        if rank == root:
            assert value is not None
            store.set(key, value)
            return value
        store_wait(store, [key], timeout, what, ranks=[root])
        return bytes(store.get(key))
    except FlagcxError:
        raise
    except Exception as exc:
        raise FlagcxError(f"{what}: the store failed ({exc}); is the store server (rank 0 / the launcher) still running?") from exc


def require_same(values: Sequence[T], rank: int, what: str, fix: str, *, op: str = "init", ranks: Optional[Sequence[int]] = None) -> T:
    """The one value every rank holds (``values[i]`` is rank ``ranks[i]``'s), else InvalidArgument listing each rank's.

    Every rank holds the same list, so all of them raise together and none is left waiting.
    """
    if len(set(values)) > 1:
        names = ranks if ranks is not None else range(len(values))
        detail = ", ".join(f"rank {r}: {v}" for r, v in zip(names, values))
        raise InvalidArgument(f"ranks disagree on {what} ({detail}); {fix}", op=op, rank=rank)
    return values[0]


def agree(store, key: str, rank: int, size: int, value: str, timeout: float, what: str, fix: str, *, op: str = "init") -> str:
    """Exchange ``value`` through the store and return it once every rank holds the same (see :func:`require_same`)."""
    raw = store_allgather(store, key, rank, size, value.encode(), timeout, f"comparing {what}")
    return require_same([r.decode() for r in raw], rank, what, fix, op=op)


# ---------------------------------------------------------------- naming the peers behind a failure
