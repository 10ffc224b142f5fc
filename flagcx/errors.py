"""The flagcx exception hierarchy (every layer raises these, never a bare RuntimeError).

Messages name the op, the rank, the argument and what would fix the problem, so a
user reading one line of a 64-rank log knows what to change.
"""

from __future__ import annotations


class FlagcxError(RuntimeError):
    """Root of every error flagcx raises."""

    def __init__(self, message: str, *, op: str | None = None, rank: int | None = None) -> None:
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
