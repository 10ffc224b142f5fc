"""flagcx: a unified collective-communication library for PyTorch.

``import flagcx`` registers the torch.distributed backend ``"flagcx"``; the
engine-facing :class:`Communicator` works without torch.distributed's global state.
"""

from __future__ import annotations

from . import (
    _torch_first,  # noqa: F401  (before anything: torch takes seconds to import)
    config,
)
from .config import DEFAULT_TIMEOUT
from .core.communicator import Communicator
from .errors import (
    BuildError,
    Cause,
    CommAborted,
    ConfigError,
    FlagcxError,
    FlagcxTimeout,
    InvalidArgument,
    NotSupported,
    RemoteError,
)
from .flight import dump_trace
from .frontends.process_group import ProcessGroupFlagcx, monitored_barrier, register
from .types import PremulSum, ReduceOp
from .work import Work

__version__ = "0.1.0"

_C = None
"""No compiled torch extension: the backend is pure Python. The C++ FlagCX plugin exposes
``flagcx._C.ProcessGroupFlagCX.Options``; its users' code tests ``flagcx._C`` for that and
takes the path without options here."""

register()

__all__ = [
    "BuildError",
    "Cause",
    "CommAborted",
    "ConfigError",
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
    "dump_trace",
    "monitored_barrier",
]
