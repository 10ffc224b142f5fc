"""flagcx.adapters: one module per transport behind the contract in :mod:`.base`.

Adapters are looked up by name and imported on first use, so a missing optional
dependency (mpi4py, the compiled shm module, libnccl) only matters when that adapter
is asked for. A name is a builtin, ``torch_pg:<c10d backend>`` (any registered
torch.distributed backend, see :mod:`.torch_pg`), or a third-party plugin (see
:mod:`.plugins`), looked up in that order; the builtin names are in :mod:`.names`.
Which adapter carries which tensors is decided above this layer, in
:mod:`flagcx.core.selection`.
"""

from __future__ import annotations

import importlib

from ..errors import FlagcxError
from .base import ADAPTER_API_VERSION, ALL_OPS, DONE, Adapter, AdapterContext, AdapterGroup, AdapterGroupFactory, Capabilities, Handle, all_of, grouped, then
from .names import BUILTIN, KEYWORDS


def builtin_names() -> list[str]:
    return sorted(BUILTIN)


def adapter_class(name: str) -> type[Adapter]:
    """The adapter class registered under ``name`` (imported on first use): builtins, then ``torch_pg:<backend>``, then plugins."""
    target = BUILTIN.get(name)
    if target is not None:
        module_name, _, attr = target.partition(":")
        return getattr(importlib.import_module(module_name), attr)
    kind, sep, backend = name.partition(":")
    if kind == "torch_pg":
        if not sep or not backend:
            raise FlagcxError("adapter 'torch_pg' needs a c10d backend name; select it with FLAGCX_VENDOR_BACKEND=<device type>:<backend>")
        from .torch_pg import bound

        return bound(backend)
    from . import plugins

    cls = plugins.find(name)
    if cls is None:
        known = ", ".join(builtin_names() + ["torch_pg:<c10d backend>"] + plugins.names())
        raise FlagcxError(
            f"unknown adapter {name!r}; known adapters: {known}. Plugins register through the "
            f"{plugins.ENTRY_POINT_GROUP!r} entry points or FLAGCX_ADAPTER_PLUGIN=module:Class"
        )
    return cls


__all__ = [
    "AdapterGroup",
    "AdapterGroupFactory",
    "ADAPTER_API_VERSION",
    "ALL_OPS",
    "BUILTIN",
    "DONE",
    "KEYWORDS",
    "Adapter",
    "AdapterContext",
    "Capabilities",
    "Handle",
    "adapter_class",
    "all_of",
    "builtin_names",
    "grouped",
    "then",
]
