"""flagcx.adapters: one module per transport behind the contract in :mod:`.base`.

Adapters are looked up by name and imported on first use, so a missing optional
dependency (mpi4py, the compiled shm module, libnccl) only matters when that adapter
is asked for.
"""

from __future__ import annotations

import importlib

from ..errors import FlagcxError
from .base import ADAPTER_API_VERSION, DONE, Adapter, AdapterContext, Capabilities, Handle

_BUILTIN = {
    "gloo": "flagcx.adapters.gloo:GlooAdapter",
    "nccl": "flagcx.adapters.nccl:NcclAdapter",
    "mpi": "flagcx.adapters.mpi:MpiAdapter",
    "shm": "flagcx.adapters.shm:ShmAdapter",
}


def builtin_names() -> list[str]:
    return sorted(_BUILTIN)


def adapter_class(name: str) -> type[Adapter]:
    """The adapter class registered under ``name`` (imported on first use)."""
    target = _BUILTIN.get(name)
    if target is None:
        raise FlagcxError(f"unknown adapter {name!r}; known adapters: {', '.join(builtin_names())}")
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


__all__ = [
    "ADAPTER_API_VERSION",
    "DONE",
    "Adapter",
    "AdapterContext",
    "Capabilities",
    "Handle",
    "adapter_class",
    "builtin_names",
]
