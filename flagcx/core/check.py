"""FLAGCX_CHECK: every rank compares each call with every other rank's before running it.

A mismatch (another op, dtype, size, root or reduce op, or a skipped call) raises
InvalidArgument on every rank, naming what each rank called, instead of hanging or
computing garbage. The cost is one small all-gather on the host transport per call
(two for all_to_all, whose byte counts are checked pairwise).

Point-to-point (:class:`PairCheck`): a send publishes ``dtype[elements]`` of its tensor in
the store under the pair and the pair's send count; the matching recv, once its data has
arrived, compares it with its own tensor. A mismatch raises InvalidArgument on the
receiver and is left in the store for the sender, whose next point-to-point call raises
it; the receiver's next collective carries it in its fingerprint, so every rank raises
there (the sender may reach that collective before the report is in the store).
Nothing waits on the store before the transport op is posted, so pairs that post their
receives before their sends do not deadlock. A recv from any source is not checked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch

from ..bootstrap import store_poll
from ..errors import FlagcxTimeout, InvalidArgument
from ..types import PremulSum, ReduceOp

FINGERPRINT = 160
"""Bytes of one rank's call description."""


def desc(x: object) -> str:
    """``dtype[elements]`` of a tensor, or of a tensor list taken as one buffer (the forms are interchangeable)."""
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')}[{x.numel()}]"
    if isinstance(x, (list, tuple)):
        dtypes = {str(t.dtype).replace("torch.", "") for t in x if isinstance(t, torch.Tensor)}
        return f"{'/'.join(sorted(dtypes)) or '?'}[{sum(t.numel() for t in x if isinstance(t, torch.Tensor))}]"
    return "-" if x is None else type(x).__name__


def kind(x: object) -> str:
    """The dtype of an all_to_all argument (its sizes legitimately differ between ranks)."""
    first = x if isinstance(x, torch.Tensor) else next((t for t in x if isinstance(t, torch.Tensor)), None) if isinstance(x, (list, tuple)) else None
    return str(first.dtype).replace("torch.", "") if first is not None else type(x).__name__


def op_label(op: object) -> str:
    if isinstance(op, ReduceOp):
        return op.value
    if isinstance(op, PremulSum):
        return "premul_sum"
    if isinstance(op, str):
        return op.lower()
    return str(getattr(getattr(op, "op", op), "name", op)).lower()


MISMATCH_FIX = "every rank must call the same collectives, with matching dtypes, sizes, roots and reduce ops, in the same order"
"""The fix every mismatch message ends with (the shm transport's check says the same)."""


def mismatch(calls: Sequence[str], me: int) -> str:
    """``rank 1 called X while this rank called Y; <fix>``: the other ranks' calls, grouped by call, against this rank's."""
    others: dict[str, list[int]] = {}
    for r, c in enumerate(calls):
        if c != calls[me]:
            others.setdefault(c, []).append(r)
    parts = [f"{'rank' if len(rs) == 1 else 'ranks'} {', '.join(map(str, rs))} called {c}" for c, rs in others.items()]
    return f"{' and '.join(parts)} while this rank called {calls[me]}; {MISMATCH_FIX}"


class CallCheck:
    """The FLAGCX_CHECK exchanges of one communicator (``allgather(op, mine)``: every rank's small CPU tensor, in rank order)."""

    def __init__(self, rank: int, size: int, allgather: Callable[[str, torch.Tensor], torch.Tensor], pairs: PairCheck, title: str) -> None:
        self.rank = rank
        self.size = size
        self.title = title
        """The group as its user knows it, for messages."""
        self._allgather = allgather
        self._pairs = pairs
        self._seq = 0

    def call(self, op: str, *fields: str) -> None:
        """Compare this call's fingerprint (sequence number, op, fields) with every rank's.

        A mismatched send that a receiver reported for this rank joins the fingerprint, so
        that every rank raises (a sender raising alone would leave the others in the call).
        """
        self._seq += 1
        bad = self._pairs.pending()
        text = f"#{self._seq} {op}({', '.join(fields)})" + (f" after a mismatched send: {bad}" if bad else "")
        mine = torch.frombuffer(bytearray(text.encode()[:FINGERPRINT].ljust(FINGERPRINT, b"\0")), dtype=torch.uint8)
        every = self._allgather(op, mine)
        calls = [bytes(every[r * FINGERPRINT : (r + 1) * FINGERPRINT].tolist()).rstrip(b"\0").decode(errors="replace") for r in range(self.size)]
        flagged = [r for r, c in enumerate(calls) if " after a mismatched send: " in c]
        if flagged:
            self._pairs.reported()  # a sender's report of the mismatch is in the store by now: it was raised here
            raise InvalidArgument(
                f"a send and its recv did not match (found by rank(s) {flagged}), so every rank stops at this call: "
                + (bad or calls[flagged[0]].partition(" after a mismatched send: ")[2]),
                op=op,
                rank=self.rank,
            )
        if any(c != calls[0] for c in calls):
            raise InvalidArgument(f"{self.title}: {mismatch(calls, self.rank)}", op=op, rank=self.rank)

    def counts(self, op: str, send_counts: Sequence[int], recv_counts: Sequence[int]) -> None:
        """all_to_all: what rank i sends to rank j must be what rank j expects from rank i (every pair is checked on every rank)."""
        every = self._allgather(op, torch.tensor(list(send_counts) + list(recv_counts), dtype=torch.int64))
        counts = every.view(self.size, 2, self.size).tolist()
        bad = [
            f"rank {i} sends {counts[i][0][j]} bytes to rank {j}, which expects {counts[j][1][i]}"
            for i in range(self.size)
            for j in range(self.size)
            if counts[i][0][j] != counts[j][1][i]
        ]
        if bad:
            raise InvalidArgument(
                f"{self.title}: all_to_all split sizes do not match between ranks ({'; '.join(bad[:8])}{'; ...' if len(bad) > 8 else ''}); "
                "rank j's output split i must equal rank i's input split j",
                op=op,
                rank=self.rank,
            )


class PairCheck:
    """The FLAGCX_CHECK of send/recv on one communicator (see the module docstring); ``store`` is the communicator's."""

    def __init__(self, rank: int, store, timeout: float) -> None:
        self.rank = rank
        self._store = store
        self._timeout = timeout
        self._sent: Counter[int] = Counter()
        self._received: Counter[int] = Counter()
        self._found = ""
        """A mismatch this rank found as a receiver, until its next collective reports it."""

    def _key(self, src: int, dst: int, k: int) -> str:
        return f"flagcx-check/p2p/{src}-{dst}/{k}"

    def reported(self) -> str:
        """The mismatch a receiver found in one of this rank's sends ("" if none); reported once."""
        key = f"flagcx-check/p2p/bad/{self.rank}"
        if not self._store.check([key]):
            return ""
        text = bytes(self._store.get(key)).decode(errors="replace")
        self._store.delete_key(key)
        return text

    def pending(self) -> str:
        """Mismatches to report at this rank's next collective: found as a receiver, or reported to it as a sender."""
        found, self._found = self._found, ""
        return "; ".join(t for t in (found, self.reported()) if t)

    def raise_reported(self, op: str) -> None:
        """Raise the mismatch a receiver found in one of this rank's sends, if any."""
        text = self.reported()
        if text:
            raise InvalidArgument(f"an earlier send of this rank did not match its recv: {text}", op=op, rank=self.rank)

    def send(self, op: str, tensor: torch.Tensor, peer: int) -> None:
        """Publish this send's description (before the transport sees it)."""
        self.raise_reported(op)
        k = self._sent[peer]
        self._sent[peer] += 1
        self._store.set(self._key(self.rank, peer, k), desc(tensor).encode())

    def recv(self, op: str, tensor: torch.Tensor, peer: int) -> Callable[[], None]:
        """The step that compares the matching send's description with ``tensor`` (run once the data arrived)."""
        self.raise_reported(op)
        k = self._received[peer]
        self._received[peer] += 1
        mine, key = desc(tensor), self._key(peer, self.rank, k)

        def compare() -> None:
            theirs = store_poll(self._store, key, self._timeout)
            if theirs is None:
                raise FlagcxTimeout(
                    f"FLAGCX_CHECK: rank {peer} published no description of its send #{k} to this rank within {self._timeout:g} s", op=op, rank=self.rank
                )
            self._store.delete_key(key)
            sent = bytes(theirs).decode()
            if sent != mine:
                text = f"rank {peer}'s send #{k} to rank {self.rank} carried {sent}, but the recv expected {mine}; a send and its recv must agree in dtype and size"
                self._store.set(f"flagcx-check/p2p/bad/{peer}", text.encode())
                self._found = text
                raise InvalidArgument(text, op=op, rank=self.rank)

        return compare
