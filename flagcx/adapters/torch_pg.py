"""torch_pg adapter: any torch.distributed c10d backend (gloo, nccl, xccl, or a vendor's: hccl, cncl, mccl...) as a transport.

The intra-cluster path for vendors whose collectives exist only as a c10d backend in
their torch extension (hccl in torch_npu, cncl in torch_mlu...). ``adapter_class("torch_pg:<backend>")``
gives the class bound to one backend (:func:`bound`); the backend object is built from
the adapter's private store, rank, size and timeout: torch's builtins directly
(gloo -> ProcessGroupGloo, nccl -> ProcessGroupNCCL, xccl -> ProcessGroupXCCL), any
other name through the creator registered with ``dist.Backend.register_backend``
(extended API or not). Every contract op maps onto the backend's methods; an op the
backend lacks or rejects when called raises NotSupported naming backend and op.

Streams. CPU tensors: ops run on the backend's threads and the handle waits on the c10d
Work, like the gloo adapter. Accelerator tensors: the backend's ``Work.wait()`` is
assumed to order the caller's current stream after the op without blocking the host
(WorkNCCL does, and the vendor backends modelled on ProcessGroupNCCL); every op calls
it at once and returns DONE (``stream_ordered``). Accelerator send/recv outside a group
are queued and launched together inside the backend's coalescing (NCCL's group), when
one of their handles is waited or polled or another op is issued, so two ranks that
both post recv before send do not deadlock; group_start/group_end map onto
``_start_coalescing`` / ``_end_coalescing`` where the backend supports coalescing.

Capabilities: the reduce dtypes / ops of a conservative per-backend table
(:func:`declare_backend` adds or refines an entry, e.g. from a vendor's plugin); what
the table allows but the backend refuses at call time becomes NotSupported.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any, ClassVar, Optional

import torch
import torch._C._distributed_c10d as c10d
import torch.distributed as dist

from ..config import get as get_config
from ..errors import FlagcxError, FlagcxTimeout, NotSupported
from ..tensors import overlaps
from ..types import FLOAT_DTYPES, INT_DTYPES, ReduceOp
from .base import ALL_OPS, DONE, Adapter, AdapterContext, Capabilities, Handle
from .streams import device_module

_C10D_OPS = {
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.PROD: dist.ReduceOp.PRODUCT,
    ReduceOp.MAX: dist.ReduceOp.MAX,
    ReduceOp.MIN: dist.ReduceOp.MIN,
    ReduceOp.AVG: dist.ReduceOp.AVG,
}
_BASIC_OPS = frozenset({ReduceOp.SUM, ReduceOp.PROD, ReduceOp.MAX, ReduceOp.MIN})
_BUILTIN_CLASSES = {"gloo": "ProcessGroupGloo", "nccl": "ProcessGroupNCCL", "xccl": "ProcessGroupXCCL"}
_NOT_WRAPPABLE = frozenset({"flagcx", "fake", "undefined", "gloo"})
"""Default c10d backends of a device type that are no vendor path (flagcx itself, test fakes, CPU fallbacks such as mps -> gloo)."""


@dataclass(frozen=True)
class BackendTraits:
    """What a c10d backend is declared to reduce, and whether it receives from any source."""

    reduce_dtypes: frozenset[torch.dtype]
    reduce_ops: frozenset[ReduceOp]
    any_source: bool = False


_TRAITS: dict[str, BackendTraits] = {
    "gloo": BackendTraits(FLOAT_DTYPES | INT_DTYPES, _BASIC_OPS, any_source=True),
    "nccl": BackendTraits(FLOAT_DTYPES | INT_DTYPES, _BASIC_OPS | {ReduceOp.AVG}),
}
DEFAULT_TRAITS = BackendTraits(frozenset({torch.float16, torch.bfloat16, torch.float32, torch.int32}), _BASIC_OPS)
"""Declared for backends without an entry: the dtypes and ops every vendor library of the NCCL family reduces."""


def declare_backend(name: str, traits: BackendTraits) -> None:
    """Declare what c10d backend ``name`` reduces (before a communicator creates its adapter)."""
    if not all(op in _C10D_OPS for op in traits.reduce_ops):
        raise FlagcxError(f"declare_backend({name!r}): reduce_ops must be among {', '.join(o.name for o in _C10D_OPS)}")
    _TRAITS[name.lower()] = traits


def traits_of(name: str) -> BackendTraits:
    return _TRAITS.get(name, DEFAULT_TRAITS)


def default_backend(device_type: str) -> Optional[str]:
    """torch's default c10d backend for ``device_type`` (a vendor's extension registers its own), when it is a vendor path."""
    name = dist.Backend.default_device_backend_map.get(device_type)
    return None if name is None or name in _NOT_WRAPPABLE else str(name)


def _registered(name: str) -> bool:
    return name in _BUILTIN_CLASSES and hasattr(c10d, _BUILTIN_CLASSES[name]) or name.upper() in dist.Backend._plugins


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _wait_error(exc: BaseException, what: str, timeout: float, rank: int) -> FlagcxError:
    """An error seen while completing a posted op: a failed or absent peer, never NotSupported."""
    text = _first_line(exc)
    if "timed out" in text.lower() or "timeout" in text.lower():
        return FlagcxTimeout(f"{what}: a peer did not arrive within {timeout:g} s ({text})", rank=rank)
    return FlagcxError(f"{what}: {text}", rank=rank)


class WorkHandle(Handle):
    """A c10d Work of a host (CPU) backend; wait translates its errors into the flagcx hierarchy."""

    __slots__ = ("_work", "_what", "_timeout", "_rank", "_finished")

    def __init__(self, work: Any, what: str, timeout: float, rank: int) -> None:
        self._work = work
        self._what = what
        self._timeout = timeout
        self._rank = rank
        self._finished = False

    def wait(self, timeout: Optional[float] = None) -> None:
        if self._finished:
            return
        limit = self._timeout if timeout is None else timeout
        try:
            self._work.wait(timedelta(seconds=limit))
        except FlagcxError:
            raise
        except Exception as exc:
            raise _wait_error(exc, self._what, limit, self._rank) from exc
        self._finished = True

    def done(self) -> bool:
        return self._finished or bool(self._work.is_completed())

    def source(self) -> int:
        return int(self._work._source_rank())


class _Batch:
    """Queued device send/recv: the event of their launch, or the launch error."""

    __slots__ = ("event", "error")

    def __init__(self) -> None:
        self.event: Any = None
        self.error: Optional[FlagcxError] = None


class QueuedHandle(Handle):
    """A queued device send/recv: waiting launches the queue, then orders the caller's stream after it."""

    __slots__ = ("_adapter", "_batch")

    def __init__(self, adapter: TorchPGAdapter, batch: _Batch) -> None:
        self._adapter = adapter
        self._batch = batch

    def _launched(self) -> Any:
        if self._batch.event is None and self._batch.error is None:
            self._adapter._flush()
        if self._batch.error is not None:
            raise self._batch.error
        return self._batch.event

    def wait(self, timeout: Optional[float] = None) -> None:
        self._launched().wait()

    def done(self) -> bool:
        return bool(self._launched().query())


class TorchPGAdapter(Adapter):
    """Collectives through one registered c10d backend (subclassed per backend by :func:`bound`)."""

    name = "torch_pg"
    backend: ClassVar[str] = ""

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        name = cls.backend
        if name in ("flagcx", "mpi"):
            return f"c10d backend {name!r} cannot be wrapped; " + (
                "use the mpi adapter (FLAGCX_CPU_ADAPTER=mpi)" if name == "mpi" else "name the vendor's backend"
            )
        if not _registered(name):
            known = sorted({*(n for n in _BUILTIN_CLASSES if hasattr(c10d, _BUILTIN_CLASSES[n])), *(p.lower() for p in dist.Backend._plugins)} - {"flagcx"})
            return (
                f"c10d backend {name!r} is not registered with torch.distributed (registered: {', '.join(known)}); "
                "import the vendor's torch extension (torch_npu, torch_mlu, ...) before creating the communicator"
            )
        claimed = dist.Backend.backend_capability.get(name)
        if claimed is not None and device.type not in claimed:
            return f"c10d backend {name!r} declares devices {', '.join(claimed)}, not {device.type}"
        if device.type != "cpu":
            try:
                device_module(device)
            except NotSupported as exc:
                return str(exc)
        return None

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        if not self.backend:
            raise FlagcxError("the torch_pg adapter needs a c10d backend; create it through adapter_class('torch_pg:<backend>')", op="init")
        self._device = ctx.device
        self._on_device = ctx.device.type != "cpu"
        self._module = device_module(ctx.device) if self._on_device else None
        traits = traits_of(self.backend)
        self._any_source = traits.any_source
        self.capabilities = Capabilities(
            devices=frozenset({ctx.device.type}),
            reduce_dtypes=traits.reduce_dtypes,
            reduce_ops=traits.reduce_ops,
            ops=ALL_OPS,
            any_source=traits.any_source,
            stream_ordered=self._on_device,
        )
        self._depth = 0
        self._pending: list[tuple[bool, torch.Tensor, int, Any]] = []
        self._batch = _Batch()
        try:
            self._pg = self._create()
        except FlagcxError:
            raise
        except Exception as exc:
            raise FlagcxError(f"creating c10d backend {self.backend!r} for {ctx.where} failed: {_first_line(exc)}", op="init", rank=ctx.rank) from exc
        if not isinstance(self._pg, (c10d.Backend, c10d.ProcessGroup)):
            raise FlagcxError(
                f"the creator registered for c10d backend {self.backend!r} returned {type(self._pg).__name__}, not a c10d Backend or ProcessGroup",
                op="init",
                rank=ctx.rank,
            )
        self._coalescing = self._on_device and bool(getattr(self._pg, "supports_coalescing", False))

    def _create(self) -> Any:
        ctx, name = self.ctx, self.backend
        timeout = timedelta(seconds=ctx.timeout)
        if name == "gloo":
            return make_gloo(ctx)
        if name in _BUILTIN_CLASSES:
            cls = getattr(c10d, _BUILTIN_CLASSES[name])
            opts = cls.Options()
            if hasattr(opts, "is_high_priority_stream"):
                opts.is_high_priority_stream = False
            opts._timeout = timeout
            opts.global_ranks_in_group = ctx.global_ranks or list(range(ctx.size))
            return cls(ctx.store, ctx.rank, ctx.size, opts)
        plugin = dist.Backend._plugins[name.upper()]
        if not plugin.extended_api:
            return plugin.creator_fn(ctx.store, ctx.rank, ctx.size, timeout)
        opts = c10d._DistributedBackendOptions()
        opts.store = ctx.store
        opts.group_rank = ctx.rank
        opts.group_size = ctx.size
        opts.timeout = timeout
        opts.group_id = f"{ctx.label}/torch_pg"
        opts.global_ranks_in_group = ctx.global_ranks or list(range(ctx.size))
        return plugin.creator_fn(opts, None)

    # ------------------------------------------------------------------ calling the backend
    def _call(self, op: str, method: str, *args: Any) -> Any:
        fn = getattr(self._pg, method, None)
        if fn is None:
            raise NotSupported(f"c10d backend {self.backend!r} has no {method}(), which {op} needs; use another adapter for {op}", op=op, rank=self.rank)
        try:
            return fn(*args)
        except FlagcxError:
            raise
        except dist.DistError as exc:
            raise _wait_error(exc, f"{op} on {self.ctx.where} (c10d backend {self.backend!r})", self.ctx.timeout, self.rank) from exc
        except Exception as exc:
            raise NotSupported(
                f"c10d backend {self.backend!r} rejected {op} ({_first_line(exc)}); use dtypes / ops it supports or another adapter",
                op=op,
                rank=self.rank,
            ) from exc

    def _post(self, op: str, work: Any) -> Handle:
        """The handle of a posted op: host backends wait on the Work; device backends order the current stream now."""
        if work is None:  # an op inside the backend's coalescing; the group's work covers it
            return DONE
        if not self._on_device:
            return WorkHandle(work, f"{op} on {self.ctx.where}", self.ctx.timeout, self.rank)
        if self._depth and self._coalescing:
            return DONE
        self._device_wait(work, op)
        return DONE

    def _device_wait(self, work: Any, op: str) -> None:
        try:
            work.wait()
        except FlagcxError:
            raise
        except Exception as exc:
            raise _wait_error(exc, f"{op} on {self.ctx.where} (c10d backend {self.backend!r})", self.ctx.timeout, self.rank) from exc

    def _coalesce(self, op: str, method: str) -> Any:
        """``_start_coalescing`` / ``_end_coalescing``: a c10d Backend takes no argument, a ProcessGroup the device."""
        return self._call(op, method, *((self._device,) if isinstance(self._pg, c10d.ProcessGroup) else ()))

    def _begin(self) -> None:
        if self._pending:
            self._flush()

    # ------------------------------------------------------------------ collectives
    def allreduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        self._begin()
        if send.data_ptr() != recv.data_ptr():
            recv.copy_(send)
        opts = c10d.AllreduceOptions()
        opts.reduceOp = _C10D_OPS[op]
        return self._post("allreduce", self._call("allreduce", "allreduce", [recv], opts))

    def allgather(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        self._begin()
        if overlaps(send, recv):
            send = send.clone()
        return self._post("allgather", self._call("allgather", "_allgather_base", recv, send, c10d.AllgatherOptions()))

    def reducescatter(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        self._begin()
        if overlaps(send, recv):
            send = send.clone()
        opts = c10d.ReduceScatterOptions()
        opts.reduceOp = _C10D_OPS[op]
        return self._post("reducescatter", self._call("reducescatter", "_reduce_scatter_base", recv, send, opts))

    def broadcast(self, tensor: torch.Tensor, root: int) -> Handle:
        self._begin()
        opts = c10d.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        return self._post("broadcast", self._call("broadcast", "broadcast", [tensor], opts))

    def reduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, root: int) -> Handle:
        self._begin()
        # Backends reduce in place and may write non-root buffers: non-roots work on a copy.
        buf = recv if self.rank == root else torch.empty_like(send)
        if buf.data_ptr() != send.data_ptr():
            buf.copy_(send)
        opts = c10d.ReduceOptions()
        opts.reduceOp = _C10D_OPS[op]
        opts.rootRank = root
        opts.rootTensor = 0
        return self._post("reduce", self._call("reduce", "reduce", [buf], opts))

    def gather(self, send: torch.Tensor, recv: Optional[torch.Tensor], root: int) -> Handle:
        self._begin()
        opts = c10d.GatherOptions()
        opts.rootRank = root
        outputs: list[list[torch.Tensor]] = []
        if self.rank == root:
            assert recv is not None
            outputs = [list(recv.view(self.size, -1).unbind(0))] if recv.numel() else [[recv.new_empty(0) for _ in range(self.size)]]
        return self._post("gather", self._call("gather", "gather", outputs, [send], opts))

    def scatter(self, send: Optional[torch.Tensor], recv: torch.Tensor, root: int) -> Handle:
        self._begin()
        opts = c10d.ScatterOptions()
        opts.rootRank = root
        inputs: list[list[torch.Tensor]] = []
        if self.rank == root:
            assert send is not None
            inputs = [list(send.view(self.size, -1).unbind(0))]
        return self._post("scatter", self._call("scatter", "scatter", [recv], inputs, opts))

    def alltoall(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        self._begin()
        if overlaps(send, recv):
            send = send.clone()
        return self._post("alltoall", self._call("alltoall", "alltoall_base", recv, send, [], [], c10d.AllToAllOptions()))

    def alltoallv(self, send: torch.Tensor, send_counts: list[int], recv: torch.Tensor, recv_counts: list[int]) -> Handle:
        self._begin()
        if overlaps(send, recv):
            send = send.clone()
        work = self._call("alltoallv", "alltoall_base", recv, send, list(recv_counts), list(send_counts), c10d.AllToAllOptions())
        return self._post("alltoallv", work)

    def barrier(self) -> Handle:
        self._begin()
        opts = c10d.BarrierOptions()
        if self._on_device and self._device.index is not None:
            opts.device_ids = [self._device.index]
        return self._post("barrier", self._call("barrier", "barrier", opts))

    # ------------------------------------------------------------------ point to point
    def send(self, tensor: torch.Tensor, peer: int) -> Handle:
        return self._p2p(True, tensor, peer)

    def recv(self, tensor: torch.Tensor, peer: Optional[int]) -> Handle:
        if peer is None:
            if not self._any_source:
                raise NotSupported(f"c10d backend {self.backend!r} cannot receive from any source; pass the sending rank", op="recv", rank=self.rank)
            return self._post("recv from any source", self._call("recv", "recv_anysource", [tensor], 0))
        return self._p2p(False, tensor, peer)

    def _p2p(self, is_send: bool, tensor: torch.Tensor, peer: int) -> Handle:
        op = "send" if is_send else "recv"
        if not self._coalescing or self._depth:
            what = f"{op} {'to' if is_send else 'from'} {self.ctx.peer_name(peer)}"
            return self._post(what, self._call(op, op, [tensor], peer, 0))
        assert self._module is not None
        self._pending.append((is_send, tensor, peer, self._module.current_stream(self._device)))
        return QueuedHandle(self, self._batch)

    def _flush(self) -> None:
        """Launch every queued device send/recv in one coalesced group, on the stream of the first, ordered after all posting streams."""
        assert self._module is not None
        pending, self._pending = self._pending, []
        batch, self._batch = self._batch, _Batch()
        streams = list(dict.fromkeys(stream for *_, stream in pending))
        main = streams[0]
        for other in streams[1:]:
            main.wait_stream(other)
        try:
            with self._module.stream(main):
                self._coalesce("send/recv", "_start_coalescing")
                try:
                    for is_send, tensor, peer, _ in pending:
                        op = "send" if is_send else "recv"
                        self._call(op, op, [tensor], peer, 0)
                finally:
                    work = self._coalesce("send/recv", "_end_coalescing")
                self._device_wait(work, "send/recv")
                event = self._module.Event()
                event.record(main)
        except FlagcxError as exc:
            batch.error = exc
            raise
        for other in streams[1:]:
            other.wait_stream(main)
        batch.event = event

    def group_start(self) -> None:
        self._begin()
        if self._coalescing and not self._depth:
            self._coalesce("group_start", "_start_coalescing")
        self._depth += 1

    def group_end(self) -> None:
        if self._depth == 0:
            raise FlagcxError("group_end without group_start", op="group_end", rank=self.rank)
        self._depth -= 1
        if self._coalescing and not self._depth:
            self._device_wait(self._coalesce("group_end", "_end_coalescing"), "group_end")

    # ------------------------------------------------------------------ lifetime
    def abort(self) -> None:
        try:
            self._pg.abort()
        except Exception:  # already broken, or no abort(): nothing more to release
            pass

    def close(self) -> None:
        try:
            self._pg.shutdown()
        except Exception:
            pass


def make_gloo(ctx: AdapterContext, device: Any = None) -> Any:
    """A ProcessGroupGloo over ``ctx`` (its options type differs from the other builtin backends'); ``device``: the interface to bind."""
    timeout = timedelta(seconds=ctx.timeout)
    if device is None:
        return c10d.ProcessGroupGloo(ctx.store, ctx.rank, ctx.size, timeout)
    opts = c10d.ProcessGroupGloo._Options()
    opts._devices = [device]
    opts._timeout = timeout
    opts._threads = 2
    return c10d.ProcessGroupGloo(ctx.store, ctx.rank, ctx.size, opts)


@cache
def bound(backend: str) -> type[TorchPGAdapter]:
    """The torch_pg adapter class for c10d backend ``backend`` (what ``adapter_class("torch_pg:<backend>")`` returns)."""
    name = backend.lower()
    if not name.replace("_", "").isalnum() or not name[:1].isalpha():
        raise FlagcxError(f"{backend!r} is not a c10d backend name; write e.g. FLAGCX_VENDOR_BACKEND=npu:hccl")
    return type(f"TorchPGAdapter_{name}", (TorchPGAdapter,), {"backend": name, "name": f"torch_pg:{name}", "__module__": __name__})


def vendor_backend(device_type: str, home_device_type: str) -> Optional[str]:
    """The c10d backend FLAGCX_VENDOR_BACKEND names for ``device_type`` (a bare name applies to the rank's accelerator)."""
    chosen = dict(get_config().vendor_backends)
    if device_type in chosen:
        return chosen[device_type]
    if device_type == home_device_type and device_type != "cpu":
        return chosen.get("")
    return None
