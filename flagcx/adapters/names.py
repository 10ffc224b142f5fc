"""The names of the builtin adapters and of the selection keywords (read by the registry and by plugin validation)."""

from __future__ import annotations

BUILTIN = {
    "gloo": "flagcx.adapters.gloo:GlooAdapter",
    "nccl": "flagcx.adapters.nccl.adapter:NcclAdapter",
    "mpi": "flagcx.adapters.mpi:MpiAdapter",
    "shm": "flagcx.adapters.shm:ShmAdapter",
}
"""The builtin adapters, name -> ``module:Class``: the one list of builtin names (which one carries which
tensors is decided in :mod:`flagcx.core.selection`)."""

KEYWORDS = frozenset({"auto", "torch_pg", "hetero"})
"""Names with a meaning in selection (``auto``, ``torch_pg:<backend>``, the heterogeneous runner): no plugin may take them."""
