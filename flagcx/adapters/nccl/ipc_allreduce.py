"""Small-message allreduce over peer-mapped buffers (CUDA IPC), the latency path beside NCCL for ranks of one host.

Each rank allocates, once per communicator, a data buffer and a signal array on its GPU
and exports them with CUDA IPC (torch's ``_share_cuda_``, what torch.multiprocessing uses);
the ranks exchange the handles through the adapter's store and map each other's buffers.
A call then runs on the caller's current stream, with no host synchronisation (so CUDA
graphs can capture it):

1. copy the input into this rank's data buffer;
2. barrier (:func:`.ipc_kernels.barrier`: device-side counters and flags, release/acquire);
3. one-shot: every rank reads every peer's buffer and sums locally (small sizes), or
   two-shot: rank r sums shard r of every buffer into its own buffer, barrier, every rank
   gathers shard s from rank s (medium sizes);
4. barrier, so that no rank overwrites its buffer while a peer still reads it.

Sum of float32 / bfloat16 / float16 only (accumulated in float32, in rank order); anything
else, and sizes above the buffer, go to NCCL. The crossovers (:data:`ONE_SHOT_MAX`,
:data:`TWO_SHOT_MAX`) are the values the peer libraries publish for 2-8 GPUs until they
are measured here (that needs two or more GPUs); until then the path is off unless
FLAGCX_FAST_ALLREDUCE=1 asks for it. NcclAdapter opens it for communicators it creates
(not for split children) and takes it outside groups. A rank that dies inside a call
leaves its peers' barrier kernels spinning until their processes exit (the watchdog
still reports the timeout).
"""

from __future__ import annotations

import logging
import pickle
import socket
from typing import Any, Optional

import torch

from ...bootstrap import store_allgather
from ...errors import FlagcxError
from ...types import ReduceOp
from ..base import AdapterContext

log = logging.getLogger("flagcx.ipc")

BUFFER_BYTES = 4 << 20
"""Bytes of each rank's data buffer: the largest allreduce this path takes."""
ONE_SHOT_MAX = 256 << 10
"""Largest allreduce (bytes) done one-shot; above it, two-shot up to TWO_SHOT_MAX."""
TWO_SHOT_MAX = BUFFER_BYTES
"""Largest allreduce (bytes) this path takes; larger ones go to NCCL."""
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024


def _host() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{socket.gethostname()}/{f.read().strip()}"
    except OSError:
        return socket.gethostname()


class IpcAllreduce:
    """The mapped buffers of one communicator and the allreduce over them (see the module docstring)."""

    def __init__(self, ctx: AdapterContext, kernels: Any) -> None:
        self.rank = ctx.rank
        self.size = ctx.size
        self._k = kernels
        dev = ctx.device
        self.data = torch.zeros(BUFFER_BYTES, dtype=torch.uint8, device=dev)
        self.signals = torch.zeros(self.size, dtype=torch.int32, device=dev)
        self.counter = torch.zeros(1, dtype=torch.int32, device=dev)
        mine = pickle.dumps((self.data.untyped_storage()._share_cuda_(), self.signals.untyped_storage()._share_cuda_()))
        every = [pickle.loads(b) for b in store_allgather(ctx.store, "ipc", self.rank, self.size, mine, ctx.timeout, f"mapping peer buffers of {ctx.where}")]
        self._mapped: list[Any] = []  # keeps the peers' storages open
        data_ptrs, sig_ptrs = [], []
        for r, (data_handle, sig_handle) in enumerate(every):
            if r == self.rank:
                data_ptrs.append(self.data.data_ptr())
                sig_ptrs.append(self.signals.data_ptr())
                continue
            data = torch.UntypedStorage._new_shared_cuda(*data_handle)
            sig = torch.UntypedStorage._new_shared_cuda(*sig_handle)
            self._mapped += [data, sig]
            data_ptrs.append(data.data_ptr())
            sig_ptrs.append(sig.data_ptr())
        self.data_ptrs = torch.tensor(data_ptrs, dtype=torch.int64, device=dev)
        self.sig_ptrs = torch.tensor(sig_ptrs, dtype=torch.int64, device=dev)

    def takes(self, send: torch.Tensor, op: ReduceOp) -> bool:
        """Whether this path serves the call (else NCCL does)."""
        return op is ReduceOp.SUM and send.dtype in DTYPES and 0 < send.numel() * send.element_size() <= TWO_SHOT_MAX

    def allreduce(self, send: torch.Tensor, recv: torch.Tensor, plan: Optional[str] = None) -> None:
        """Sum ``send`` over the ranks into ``recv`` (1-D, contiguous) on the current stream; ``plan``: force one_shot / two_shot."""
        n = send.numel()
        nbytes = n * send.element_size()
        plan = plan or ("one_shot" if nbytes <= ONE_SHOT_MAX else "two_shot")
        k = self._k
        buf = self.data[:nbytes].view(send.dtype)
        buf.copy_(send)
        k.barrier[(1,)](self.sig_ptrs, self.counter, self.rank, WORLD=self.size)
        if plan == "one_shot":
            k.one_shot[(triton_cdiv(n, BLOCK),)](self.data_ptrs, recv, n, WORLD=self.size, BLOCK=BLOCK)
        else:
            shard = -(-n // self.size)
            start, stop = min(self.rank * shard, n), min((self.rank + 1) * shard, n)
            if stop > start:
                k.reduce_shard[(triton_cdiv(stop - start, BLOCK),)](
                    self.data_ptrs, n, start, stop, self.rank, WORLD=self.size, BLOCK=BLOCK, DTYPE=k.TL_DTYPES[send.dtype]
                )
            k.barrier[(1,)](self.sig_ptrs, self.counter, self.rank, WORLD=self.size)
            k.gather_shards[(triton_cdiv(n, BLOCK),)](self.data_ptrs, recv, n, shard, BLOCK=BLOCK)
        k.barrier[(1,)](self.sig_ptrs, self.counter, self.rank, WORLD=self.size)

    def close(self) -> None:
        self._mapped.clear()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def open_ipc_allreduce(ctx: AdapterContext, enabled: bool) -> Optional[IpcAllreduce]:
    """The peer-mapped path for this communicator, or None; every rank gets the same answer (all or none map).

    Needs FLAGCX_FAST_ALLREDUCE on, two or more ranks on one host (same boot id), Triton, and
    CUDA IPC between the ranks' devices. The ranks first agree that all of them can try, and
    after mapping that all of them succeeded; a rank that failed logs why.
    """
    if ctx.size < 2:
        return None
    why = "" if enabled else "FLAGCX_FAST_ALLREDUCE=0"
    kernels = None
    if not why:
        try:
            from . import ipc_kernels as kernels_module

            kernels = kernels_module
        except Exception as exc:  # no Triton on this machine
            why = f"Triton is not usable ({type(exc).__name__}: {exc})"
    hosts = store_allgather(ctx.store, "ipc-hosts", ctx.rank, ctx.size, pickle.dumps((_host(), why)), ctx.timeout, "checking peer-mapped allreduce")
    answers = [pickle.loads(h) for h in hosts]
    if len({h for h, _ in answers}) > 1 or any(w for _, w in answers):
        reason = next((w for _, w in answers if w), "the ranks are on several hosts")
        log.info("%s: peer-mapped allreduce off (%s)", ctx.label, reason)
        return None
    engine: Optional[IpcAllreduce] = None
    failure = ""
    try:
        engine = IpcAllreduce(ctx, kernels)
    except (RuntimeError, FlagcxError) as exc:  # CUDA IPC refused (no peer access, containers without IPC)
        failure = f"{type(exc).__name__}: {exc}"
    outcomes = store_allgather(ctx.store, "ipc-mapped", ctx.rank, ctx.size, failure.encode(), ctx.timeout, "mapping peer buffers")
    if any(outcomes):
        log.warning("%s: peer-mapped allreduce off: %s", ctx.label, next(o.decode() for o in outcomes if o))
        if engine is not None:
            engine.close()
        return None
    return engine
