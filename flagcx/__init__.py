"""flagcx: a unified collective-communication library for PyTorch.

``import flagcx`` registers the torch.distributed backend ``"flagcx"``; the
engine-facing :class:`Communicator` works without torch.distributed's global state.
"""

from __future__ import annotations

from . import config
from .backend import ProcessGroupFlagcx, register
from .communicator import DEFAULT_TIMEOUT, Communicator
from .errors import (
    BuildError,
    CommAborted,
    FlagcxError,
    FlagcxTimeout,
    InvalidArgument,
    NotSupported,
    RemoteError,
)
from .types import PremulSum, ReduceOp
from .work import Work

__version__ = "0.1.0"

register()

__all__ = [
    "BuildError",
    "CommAborted",
    "Communicator",
    "DEFAULT_TIMEOUT",
    "FlagcxError",
    "FlagcxTimeout",
    "InvalidArgument",
    "NotSupported",
    "PremulSum",
    "ProcessGroupFlagcx",
    "ReduceOp",
    "RemoteError",
    "Work",
    "__version__",
    "config",
]
