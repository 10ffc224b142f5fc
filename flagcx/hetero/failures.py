"""How a heterogeneous op fails: fast, on every rank, naming ranks of the communicator the user holds.

A transport failure inside any op aborts every lane at once (the plan is broken
anyway): peers blocked on this rank in another lane then fail immediately instead of at
their timeout. Errors name ranks in the heterogeneous communicator's own numbering
(never a lane's), and every failing rank records its error in the store, so a rank that
only waited on a live peer (or saw it abort) appends what that peer was failing on,
down to the rank that died or stalled. A heterogeneous op completes on the host, so a
CUDA graph capture of one is refused.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

from ..bootstrap import store_poll
from ..core.selection import AdapterSet
from ..errors import FlagcxError, FlagcxTimeout, InvalidArgument, NotSupported

if TYPE_CHECKING:  # the adapter's ops are wrapped here; only the type comes from there
    from . import HeteroAdapter

F = TypeVar("F", bound=Callable[..., Any])

_RANK = re.compile(r"\brank (\d+)( \(global \d+\))?")
FAILURE_WAIT = 2.0
"""Seconds a failing rank waits for the record of a live peer it blames (see _fail_fast)."""


def in_comm_ranks(adapter: HeteroAdapter, text: str) -> str:
    """``text`` with the ranks of the sub-communicator it names rewritten as this communicator's ranks."""
    for sub in sorted(adapter.lanes.sets(), key=lambda c: -len(c.name)):
        at = text.find(sub.name)
        if at < 0:
            continue
        head, tail = text[: at + len(sub.name)], text[at + len(sub.name) :]

        def mapped(m: re.Match[str], sub: AdapterSet = sub) -> str:
            r = int(m.group(1))
            if r >= len(sub.global_ranks):
                return m.group(0)
            g = sub.global_ranks[r]
            mine = adapter.ctx.global_ranks.index(g)
            return f"rank {mine}" if mine == g else f"rank {mine} (global {g})"

        return head.replace(sub.name, f"{adapter.ctx.label} ({sub.name[len(adapter.ctx.label) + 1 :]})") + _RANK.sub(mapped, tail)
    return text


def with_peer_failures(adapter: HeteroAdapter, exc: FlagcxError, text: str) -> tuple[str, type]:
    """``text`` plus what the live peers it blames were failing on (one peer's wait is often another's stall).

    Every failing rank records its error (class and text) under ``failure/<rank>`` in the
    store; a rank that blames a live peer (timed out waiting for it, or saw it abort) waits
    up to FAILURE_WAIT for that peer's record and follows the chain, so the rank that
    really died or stalled is named even by ranks that only waited on its victims. A rank
    whose own news is only a peer's abort takes the class of the failure that caused it
    (a peer that timed out makes it a FlagcxTimeout here too).
    """
    store = adapter.ctx.store
    try:
        store.compare_set(f"failure/{adapter.rank}", "", f"{type(exc).__name__}:{text}")  # a rank's first failure explains it
    except Exception:  # the store is gone: report what this rank saw
        return text, type(exc)
    cls: type = type(exc)
    cascade = "aborted its communicator" in text or "closed its communicator" in text
    notes: list[str] = []
    seen, todo = {adapter.rank}, [text]
    deadline = time.monotonic() + min(FAILURE_WAIT, adapter.ctx.timeout)
    while todo and len(seen) <= adapter.size:
        current = todo.pop(0)
        if " died" in current and "alive" not in current:
            continue
        for m in _RANK.finditer(current):
            peer = int(m.group(1))
            if peer in seen or peer >= adapter.size:
                continue
            seen.add(peer)
            try:
                record = store_poll(store, f"failure/{peer}", max(deadline - time.monotonic(), 0.0))
            except Exception:
                return text + "".join(notes), cls
            if record is None:
                continue
            kind, _, theirs = record.decode(errors="replace").partition(":")
            notes.append(f"; rank {peer} was failing too: {theirs}")
            todo.append(theirs)
            if cascade and kind == FlagcxTimeout.__name__:
                cls = FlagcxTimeout
    return text + "".join(notes), cls


def refuse_capture(adapter: HeteroAdapter, op: str) -> None:
    """A heterogeneous op completes on the host before it returns, so a CUDA graph cannot hold it."""
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        raise NotSupported(
            f"{op} on heterogeneous communicator {adapter.ctx.label} cannot be captured in a CUDA graph: it moves data "
            "through host memory and completes on the host before it returns; call it outside the capture "
            "(or capture only the device clusters' own communicators)",
            op=op,
            rank=adapter.rank,
        )


def fail_fast(fn: F) -> F:
    """Wrap an op of HeteroAdapter: refuse a CUDA graph capture; a transport failure aborts every sub-communicator before it propagates."""

    @functools.wraps(fn)
    def op(adapter: HeteroAdapter, *args: Any, **kwargs: Any) -> Any:
        refuse_capture(adapter, fn.__name__)
        try:
            return fn(adapter, *args, **kwargs)
        except (InvalidArgument, NotSupported):
            raise
        except FlagcxError as exc:
            adapter.abort()
            text, cls = with_peer_failures(adapter, exc, in_comm_ranks(adapter, exc.detail))
            raise cls(text, op=exc.op, rank=exc.rank) from exc

    return cast(F, op)
