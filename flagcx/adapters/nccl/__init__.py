"""The NCCL adapter and what it stands on: NCCL (and its API clones) through cffi, with its queue of point-to-point
calls, the watchdog's view of its launches, and the peer-mapped small-message allreduce.

- :mod:`.adapter`: :class:`NcclAdapter`, the adapter contract over one NCCL communicator;
- :mod:`.lib`: loading libnccl or a clone (RCCL, MCCL...) and its error codes;
- :mod:`.p2p`: send/recv queued until a group end or a wait;
- :mod:`.watch`: the launches the process watchdog bounds by the timeout;
- :mod:`.ipc_allreduce` and :mod:`.ipc_kernels`: FLAGCX_FAST_ALLREDUCE's peer-mapped buffers and Triton kernels.
"""

from __future__ import annotations

from .adapter import NcclAdapter

__all__ = ["NcclAdapter"]
