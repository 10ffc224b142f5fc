"""The flagcx exception hierarchy (every layer raises these, never a bare RuntimeError).

Messages name the op, the rank, the argument and what would fix the problem, so a
user reading one line of a 64-rank log knows what to change. A transport failure also
carries its facts as data (``peers``, ``cause``, ``comm``): code that reacts to a failure
(the heterogeneous layer's failure chain, a user's recovery logic) reads those, never the
text, which is for people and may be reworded.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Cause(StrEnum):
    """Why a transport op failed, as far as this rank can tell."""

    DIED = "died"
    """a blamed peer's process is gone"""
    PEER_LEFT = "peer_left"
    """a blamed peer closed or aborted its communicator, or failed first and stopped"""
    TIMEOUT = "timeout"
    """a blamed peer did not arrive within the timeout (alive, or unknown)"""
    MISMATCH = "mismatch"
    """the ranks' calls do not match (op, size, root...)"""
    DISCONNECTED = "disconnected"
    """a connection to a peer closed (which peer and why: see ``peers``, when known)"""


class FlagcxError(RuntimeError):
    """Root of every error flagcx raises."""

    def __init__(
        self,
        message: str,
        *,
        op: str | None = None,
        rank: int | None = None,
        peers: Iterable[int] = (),
        cause: Cause | None = None,
        comm: str | None = None,
    ) -> None:
        prefix = "flagcx"
        if op:
            prefix += f" {op}"
        if rank is not None:
            prefix += f" (rank {rank})"
        super().__init__(f"{prefix}: {message}")
        self.detail = message
        """The message without the ``flagcx op (rank r):`` prefix (for re-raising with more context)."""
        self.op = op
        self.rank = rank
        self.peers: tuple[int, ...] = tuple(peers)
        """The ranks this failure blames, in the numbering of communicator ``comm``."""
        self.cause = cause
        """Why it failed (:class:`Cause`), where the transport knows."""
        self.comm = comm
        """The label of the communicator (or transport) whose rank numbers ``peers`` and the text use."""


class InvalidArgument(FlagcxError, ValueError):
    """A caller passed something the op cannot accept (wrong size, dtype, device, root...)."""


class ConfigError(FlagcxError, ValueError):
    """A FLAGCX_* environment variable has a value flagcx cannot use (the message says what to write)."""


class NotSupported(FlagcxError):
    """The op, dtype or reduce op is not supported by the adapter that would run it."""


class FlagcxTimeout(FlagcxError, TimeoutError):
    """A blocking wait exceeded the communicator's timeout (a peer did not arrive)."""


class RemoteError(FlagcxError):
    """A peer failed or disappeared while this rank waited for it."""


class CommAborted(FlagcxError):
    """The communicator was aborted or destroyed; create a new one."""


class BuildError(FlagcxError):
    """A compiled part of flagcx (the shm transport) is missing or failed to build."""


def invalid(op: str, rank: int | None, arg: str, problem: str, fix: str) -> InvalidArgument:
    """Build an InvalidArgument whose text follows the 'argument: problem; fix' convention."""
    return InvalidArgument(f"argument '{arg}': {problem}; {fix}", op=op, rank=rank)
