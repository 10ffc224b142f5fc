"""How a heterogeneous op fails: fast, on every rank, naming ranks of the communicator the user holds.

A transport failure inside any op aborts every lane at once (the plan is broken
anyway): peers blocked on this rank in another lane then fail immediately instead of at
their timeout. Errors name ranks in the heterogeneous communicator's own numbering
(never a lane's), built from the error's data (``peers``, ``cause``, ``comm``: never
parsed from its text), and every failing rank records its error in the store, so a rank
that only waited on a live peer (or saw it abort) appends what that peer was failing on,
down to the rank that died or stalled. A heterogeneous op completes on the host, so a
CUDA graph capture of one is refused.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

from ..bootstrap import store_poll
from ..errors import Cause, FlagcxError, FlagcxTimeout, InvalidArgument, NotSupported

if TYPE_CHECKING:  # the adapter's ops are wrapped here; only the type comes from there
    from . import HeteroAdapter

F = TypeVar("F", bound=Callable[..., Any])

FAILURE_WAIT = 2.0
"""Seconds a failing rank waits for the record of a live peer it blames (see with_peer_failures)."""


def _lane_map(adapter: HeteroAdapter, exc: FlagcxError) -> dict[int, int]:
    """``exc.peers`` (in the numbering of the lane ``exc.comm``) -> their ranks in this communicator."""
    if exc.comm == adapter.ctx.label:
        return {p: p for p in exc.peers}
    for sub in adapter.lanes.sets():
        if sub.name == exc.comm:
            g = sub.global_ranks
            return {r: adapter.ctx.global_ranks.index(g[r]) for r in exc.peers if 0 <= r < len(g)}
    return {}


def comm_peers(adapter: HeteroAdapter, exc: FlagcxError) -> tuple[int, ...]:
    """``exc.peers`` in this communicator's numbering (``exc.comm`` names the lane whose numbering they use)."""
    return tuple(_lane_map(adapter, exc).values())


def rank_name(adapter: HeteroAdapter, r: int) -> str:
    """``rank r``, with its global rank where the two differ."""
    g = adapter.ctx.global_ranks[r]
    return f"rank {r}" if g == r else f"rank {r} (global {g})"


_RANK_WORDS = re.compile(r"\brank (\d+)(?!\d)")


def in_comm_text(adapter: HeteroAdapter, exc: FlagcxError) -> str:
    """The lane's message in this communicator's terms: its label, and the blamed ranks (``exc.peers``) renamed.

    Only the ranks the error blames are renamed, from its data; blamed ranks that its
    text does not mention (a reworded message) are named at the end.
    """
    label, lane = adapter.ctx.label, exc.comm or ""
    if lane == label:  # already in this communicator's numbering
        return exc.detail
    mapping = _lane_map(adapter, exc)
    seen: set[int] = set()

    def rename(m: re.Match[str]) -> str:
        r = int(m.group(1))
        if r not in mapping:
            return m.group(0)
        seen.add(r)
        return rank_name(adapter, mapping[r])

    text = _RANK_WORDS.sub(rename, exc.detail)
    if lane.startswith(label + "."):
        named = f"{adapter.ctx.where} ({lane[len(label) + 1 :]})"
        old = next((o for o in (f"communicator {lane}", lane) if o in text), None)
        text = text.replace(old, named) if old else f"{named}: {text}"
    missing = [mapping[r] for r in mapping if r not in seen]
    if missing:
        text += f" [in {adapter.ctx.where}: {', '.join(rank_name(adapter, p) for p in missing)}]"
    return text


def with_peer_failures(adapter: HeteroAdapter, exc: FlagcxError, text: str, peers: tuple[int, ...]) -> tuple[str, type, tuple[int, ...]]:
    """``text`` plus what the live peers it blames were failing on (one peer's wait is often another's stall).

    Every failing rank records its error (class, text, blamed ranks, cause) under
    ``failure/<rank>`` in the store; a rank that blames a live peer waits up to
    FAILURE_WAIT for that peer's record and follows the chain through the blamed ranks
    (data, never the text), so the rank that really died or stalled is named even by
    ranks that only waited on its victims. A rank whose own news is only a peer leaving
    takes the class of the failure that caused it (a peer that timed out makes it a
    FlagcxTimeout here too). Returns the text, the class and the ranks at the end of the
    chain (blamed, with no failure of their own on record).
    """
    store = adapter.ctx.store
    cause = exc.cause.value if exc.cause else None
    record = json.dumps({"cls": type(exc).__name__, "text": text, "peers": list(peers), "cause": cause})
    try:
        store.compare_set(f"failure/{adapter.rank}", "", record)  # a rank's first failure explains it
    except Exception:  # the store is gone: report what this rank saw
        return text, type(exc), peers
    cls: type = type(exc)
    cascade = exc.cause in (Cause.PEER_LEFT, Cause.DISCONNECTED)
    notes: list[str] = []
    roots: list[int] = []
    seen = {adapter.rank}
    todo = [(p, cause) for p in peers]
    deadline = time.monotonic() + min(FAILURE_WAIT, adapter.ctx.timeout)
    while todo:
        peer, why = todo.pop(0)
        if peer in seen or not 0 <= peer < adapter.size:
            continue
        seen.add(peer)
        if why == Cause.DIED.value:  # blamed as dead: it has nothing to say
            roots.append(peer)
            continue
        try:
            raw = store_poll(store, f"failure/{peer}", max(deadline - time.monotonic(), 0.0))
        except Exception:
            break
        if raw is None:
            roots.append(peer)
            continue
        theirs = json.loads(raw.decode(errors="replace"))
        notes.append(f"; {rank_name(adapter, peer)} was failing too: {theirs['text']}")
        todo.extend((p, theirs["cause"]) for p in theirs["peers"])
        if cascade and theirs["cls"] == FlagcxTimeout.__name__:
            cls = FlagcxTimeout
    return text + "".join(notes), cls, tuple(roots) or peers


def refuse_capture(adapter: HeteroAdapter, op: str) -> None:
    """A heterogeneous op completes on the host before it returns, so a CUDA graph cannot hold it."""
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        raise NotSupported(
            f"{op} on {adapter.ctx.where} (heterogeneous) cannot be captured in a CUDA graph: it moves data "
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
            peers = comm_peers(adapter, exc)
            text, cls, blamed = with_peer_failures(adapter, exc, in_comm_text(adapter, exc), peers)
            raise cls(text, op=exc.op, rank=exc.rank, peers=blamed, cause=exc.cause, comm=adapter.ctx.label) from exc

    return cast(F, op)
