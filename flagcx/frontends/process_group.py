"""The torch.distributed frontend: a Python ProcessGroup registered as backend "flagcx".

``import flagcx`` registers it, after which ``init_process_group(backend="flagcx")``,
``"cpu:gloo,cuda:flagcx"``, ``new_group(backend="flagcx")``, DeviceMesh, DDP, FSDP2 and
functional collectives use it. Each method translates torch's call form (both the
torch 2.11 and 2.13 method names) into a Communicator call and returns a real
``dist.Work``. The group routes tensors by their device itself: torch hands a Python
ProcessGroup every tensor whatever the backend string says.
"""

from __future__ import annotations

import atexit
import gc
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from ..core.communicator import Communicator
from ..errors import invalid
from ..types import ReduceOp
from ..work import Work, merge
from .torch_work import FlagcxWork, completed

BACKEND_NAME = "flagcx"
DEVICES = ["cpu", "cuda", "npu", "mlu", "musa", "xpu", "hpu", "mtia"]
"""Device types accepted in backend strings ("cpu:gloo,npu:flagcx"); tensors of other vendors' types reach their adapter (see DEVICE_ADAPTERS)."""


_PLAIN_OPS = {
    dist.ReduceOp.SUM.value: ReduceOp.SUM,
    dist.ReduceOp.PRODUCT.value: ReduceOp.PROD,
    dist.ReduceOp.MIN.value: ReduceOp.MIN,
    dist.ReduceOp.MAX.value: ReduceOp.MAX,
    dist.ReduceOp.AVG.value: ReduceOp.AVG,
}
"""torch's reductions by ``RedOpType`` value, as flagcx's own members (all but PREMUL_SUM, which carries a factor)."""


def _op_of(opts: Any) -> Any:
    """Reduce op from an options struct, a bare torch ReduceOp, or nothing (SUM).

    torch hands a fresh ``ReduceOp`` object per call; the flagcx member it maps to is
    what the Communicator's fast path caches on (a lookup by the enum's integer value:
    reading the pybind enum's ``name`` alone costs ~0.7 us). PREMUL_SUM travels as the
    torch object (its factor is in it), BAND/BOR/BXOR too (the Communicator refuses them).
    """
    if opts is None:
        return ReduceOp.SUM
    try:
        op = opts.reduceOp
    except AttributeError:  # a bare ReduceOp
        op = opts
    try:
        return _PLAIN_OPS[op.op.value]
    except (AttributeError, KeyError):
        return op


def _async(opts: Any) -> bool:
    return bool(getattr(opts, "asyncOp", True))


def _tensors(x: Any) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


class _BackendView:
    """What ``pg._get_backend(device)`` gives torch.distributed for a flagcx group.

    torch asks a group's C++ backend whether it can split (eager init with
    ``init_process_group(device_id=...)``, ``new_group``, ``split_group`` /
    DeviceMesh) and calls it to connect or to join a split as a non-member; this
    object answers for the group's Communicator.
    """

    supports_coalescing = False
    options = None

    def __init__(self, pg: ProcessGroupFlagcx, device: torch.device) -> None:
        self._pg = pg
        self._device = device

    @property
    def supports_splitting(self) -> bool:
        return self._device.type != "cpu" and self._pg.comm.can_split(self._device.type)

    def name(self) -> str:
        return BACKEND_NAME

    def supports_tensor_alloc(self, device: torch.device) -> bool:
        return False

    def eager_connect_single_device(self, device: torch.device) -> None:
        self._pg.comm.connect(device)
        self._pg.bound_device_id = device

    def perform_nocolor_split(self, device: torch.device) -> None:
        """Join a device split as a non-member (torch calls this on ranks outside a new group)."""
        self._pg.comm.split_device(device.type, None)

    def _set_sequence_number_for_group(self) -> None:
        """flagcx keeps no c10d sequence numbers (FLAGCX_CHECK fingerprints calls instead)."""


class ProcessGroupFlagcx(dist.ProcessGroup):
    """torch ProcessGroup whose every op runs on a flagcx Communicator."""

    def __init__(self, comm: Communicator) -> None:
        super().__init__(comm.rank, comm.size)
        self.comm = comm
        self._group_name = comm.name
        self._group_desc = ""
        self._coalescing = False

    # ---------------------------------------------------------------- identity (C++ trampolines)
    def getBackendName(self) -> str:
        return BACKEND_NAME

    def getGroupName(self) -> str:
        return self._group_name

    def setGroupName(self, name: str) -> None:
        self._group_name = name
        if self.comm.recorder is not None:  # dumps name the group as torch does
            self.comm.recorder.name = name

    def getGroupDesc(self) -> str:
        return self._group_desc

    def setGroupDesc(self, desc: str) -> None:
        self._group_desc = desc
        if self.comm.recorder is not None:
            self.comm.recorder.desc = desc or "undefined"
        self.comm.retitle(group_title(self.comm.global_ranks, desc))

    @property
    def group_name(self) -> str:
        return self._group_name

    def __repr__(self) -> str:
        return f"ProcessGroupFlagcx(name={self._group_name!r}, rank={self.rank()}, size={self.size()})"

    # ---------------------------------------------------------------- helpers
    def _work(self, works: Sequence[Union[Work, int, None]], outputs: Sequence[torch.Tensor], op: str, async_op: bool = True) -> FlagcxWork:
        """One torch Work over the calls' Works; a synchronous call that finished shares the completed one."""
        real = [w for w in works if isinstance(w, Work)]
        if not real:
            return FlagcxWork(None, outputs) if async_op else completed()
        return FlagcxWork(real[0] if len(real) == 1 else merge(op, real), outputs)

    def _grouped(self, op: str, calls, outputs: Sequence[torch.Tensor], async_op: bool) -> FlagcxWork:
        """Run several comm calls as one group (one Work)."""
        if len(calls) == 1:
            return self._work([calls[0](async_op)], outputs, op, async_op)
        self.comm.group_start()
        try:
            for call in calls:
                call(True)
        finally:
            work = self.comm.group_end()
        if not async_op:
            work.wait()
        return FlagcxWork(work, outputs)

    # ---------------------------------------------------------------- collectives
    def allreduce(self, tensors, opts=None) -> FlagcxWork:
        tensors = _tensors(tensors)
        op, a = _op_of(opts), _async(opts)
        if len(tensors) == 1:  # the common case, kept short: it is on every training and decode step
            work = self.comm.all_reduce(tensors[0], op, async_op=a)
            return FlagcxWork(work, tensors) if work is not None or a else completed()
        return self._grouped("allreduce", [lambda x, t=t: self.comm.all_reduce(t, op, async_op=x) for t in tensors], tensors, a)

    def allreduce_coalesced(self, tensors, opts=None) -> FlagcxWork:
        return self.allreduce(tensors, opts)

    def allgather(self, output_tensors, input_tensors, opts=None) -> FlagcxWork:
        ins = _tensors(input_tensors)
        outs = list(output_tensors)
        a = _async(opts)
        calls = [lambda x, o=o, i=i: self.comm.all_gather(list(o), i, async_op=x) for o, i in zip(outs, ins)]
        return self._grouped("allgather", calls, [t for o in outs for t in o], a)

    def allgather_coalesced(self, output_lists, input_list, opts=None) -> FlagcxWork:
        """``output_lists[r][i]`` receives rank r's ``input_list[i]`` (one list per rank, unlike allgather's one per input)."""
        ins = _tensors(input_list)
        for r, outs in enumerate(output_lists):
            if len(outs) != len(ins):
                raise invalid(
                    "all_gather_coalesced",
                    self.comm.rank,
                    f"output_tensor_lists[{r}]",
                    f"has {len(outs)} tensors but there are {len(ins)} inputs",
                    "give every rank's list one tensor per input",
                )
        per_input = [[outs[i] for outs in output_lists] for i in range(len(ins))]
        return self.allgather(per_input, ins, opts)

    def all_gather_single(self, output, input, opts=None) -> FlagcxWork:
        a = _async(opts)
        return self._work([self.comm.all_gather(output, input, async_op=a)], [output], "allgather", a)

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(self, outputs, inputs, opts=None) -> FlagcxWork:
        calls = [lambda x, o=o, i=i: self.comm.all_gather(o, i, async_op=x) for o, i in zip(outputs, inputs)]
        return self._grouped("allgather", calls, list(outputs), _async(opts))

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def reduce_scatter(self, output_tensors, input_lists, opts=None) -> FlagcxWork:
        outs = _tensors(output_tensors)
        op = _op_of(opts)
        calls = [lambda x, o=o, i=i: self.comm.reduce_scatter(o, list(i), op, async_op=x) for o, i in zip(outs, input_lists)]
        return self._grouped("reduce_scatter", calls, outs, _async(opts))

    def reduce_scatter_single(self, output, input, opts=None) -> FlagcxWork:
        a = _async(opts)
        return self._work([self.comm.reduce_scatter(output, input, _op_of(opts), async_op=a)], [output], "reduce_scatter", a)

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None) -> FlagcxWork:
        op = _op_of(opts)
        calls = [lambda x, o=o, i=i: self.comm.reduce_scatter(o, i, op, async_op=x) for o, i in zip(outputs, inputs)]
        return self._grouped("reduce_scatter", calls, list(outputs), _async(opts))

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def broadcast(self, tensors, opts=None) -> FlagcxWork:
        tensors = _tensors(tensors)
        root = opts if isinstance(opts, int) else (0 if opts is None else opts.rootRank)
        calls = [lambda x, t=t: self.comm.broadcast(t, root, async_op=x) for t in tensors]
        return self._grouped("broadcast", calls, tensors, _async(opts))

    def reduce(self, tensors, opts=None) -> FlagcxWork:
        tensors = _tensors(tensors)
        root = 0 if opts is None else opts.rootRank
        op = _op_of(opts)
        calls = [lambda x, t=t: self.comm.reduce(t, root, op, async_op=x) for t in tensors]
        return self._grouped("reduce", calls, tensors, _async(opts))

    def gather(self, output_tensors, input_tensors, opts=None) -> FlagcxWork:
        ins = _tensors(input_tensors)
        root = 0 if opts is None else opts.rootRank
        outs = list(output_tensors[0]) if output_tensors and len(output_tensors[0]) else None
        if self.comm.rank != root:
            outs = None
        return self._work([self.comm.gather(ins[0], outs, root, async_op=_async(opts))], outs or [], "gather")

    def scatter(self, output_tensors, input_tensors, opts=None) -> FlagcxWork:
        outs = _tensors(output_tensors)
        root = 0 if opts is None else opts.rootRank
        ins = list(input_tensors[0]) if input_tensors and len(input_tensors[0]) else None
        if self.comm.rank != root:
            ins = None
        return self._work([self.comm.scatter(outs[0], ins, root, async_op=_async(opts))], outs, "scatter")

    def alltoall(self, output_tensors, input_tensors, opts=None) -> FlagcxWork:
        outs = list(output_tensors)
        return self._work([self.comm.all_to_all(outs, list(input_tensors), async_op=_async(opts))], outs, "alltoall")

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts=None) -> FlagcxWork:
        out_splits = list(output_split_sizes) or None
        in_splits = list(input_split_sizes) or None
        work = self.comm.all_to_all(output, input, out_splits, in_splits, async_op=_async(opts))
        return self._work([work], [output], "alltoall")

    alltoall_base = all_to_all_single

    def barrier(self, opts=None) -> FlagcxWork:
        return self._work([self.comm.barrier(async_op=_async(opts))], [], "barrier")

    def monitored_barrier(self, timeout: Optional[timedelta] = None, wait_all_ranks: bool = False) -> None:
        """Gloo's ``monitored_barrier`` on this group (see Communicator.monitored_barrier)."""
        self.comm.monitored_barrier(timeout, wait_all_ranks)

    # ---------------------------------------------------------------- point to point
    def send(self, tensors, dst: int, tag: int = 0) -> FlagcxWork:
        tensors = _tensors(tensors)
        return self._work([self.comm.send(t, dst, async_op=True) for t in tensors], tensors, "send")

    def recv(self, tensors, src: int, tag: int = 0) -> FlagcxWork:
        tensors = _tensors(tensors)
        return self._work([self.comm.recv(t, src, async_op=True) for t in tensors], tensors, "recv")

    def recv_anysource(self, tensors, tag: int = 0) -> FlagcxWork:
        tensors = _tensors(tensors)
        return self._work([self.comm.recv(tensors[0], None, async_op=True)], tensors, "recv")

    # ---------------------------------------------------------------- coalescing manager, lifetime
    def _start_coalescing(self, device: torch.device) -> None:
        self.comm.group_start()
        self._coalescing = True

    def _end_coalescing(self, device: torch.device) -> FlagcxWork:
        self._coalescing = False
        return FlagcxWork(self.comm.group_end())

    def _get_backend(self, device: torch.device) -> _BackendView:
        return _BackendView(self, torch.device(device))

    def split_group(
        self,
        ranks: list[int],
        timeout: Optional[timedelta] = None,
        opts: Any = None,
        group_name: Optional[str] = None,
        group_desc: Optional[str] = None,
        device_types: Any = None,
    ) -> Optional[ProcessGroupFlagcx]:
        """torch's ``split_group`` (DeviceMesh with a bound device): every rank calls, members get the child."""
        child = self.comm.split(list(ranks), name=group_name)
        if child is None:
            return None
        pg = ProcessGroupFlagcx(child)
        if group_name:
            pg.setGroupName(group_name)
        if group_desc:
            pg.setGroupDesc(group_desc)
        return pg

    def abort(self) -> None:
        self.comm.abort()

    def shutdown(self) -> None:
        try:
            self.comm.destroy()
        finally:
            if dist.is_initialized() and self is dist.distributed_c10d._world.default_pg:
                _drain_torch_groups()


DRAIN_SECONDS = 0.05
"""How long destroying a flagcx world lets torch's own groups' worker threads settle (see _drain_torch_groups)."""


def _drain_torch_groups() -> None:
    """Let the worker threads of torch's own groups under a flagcx world release their finished works.

    A Gloo subgroup's worker thread drops its last reference to a finished work a moment
    after the caller's wait returned. If that happens once interpreter finalisation has
    begun, freeing a tensor that owns a Python object aborts the process ("terminate
    called without an active exception"). torch's own destroy gives the threads that
    moment while it joins its default group's threads; flagcx's destroy is much quicker,
    so it waits for their pending works and gives them the moment here.
    """
    world = dist.distributed_c10d._world
    foreign = [pg for pg in list(world.pg_map) if not isinstance(pg, ProcessGroupFlagcx)]
    if not foreign:
        return
    for pg in foreign:
        try:
            pg._wait_for_pending_works()
        except Exception:  # a group torch already shut down, or one without that hook
            pass
    gc.collect()
    time.sleep(DRAIN_SECONDS)


def _drain_at_exit() -> None:
    """At interpreter exit, the destroy path's drain for a flagcx world the user did not destroy (see _drain_torch_groups)."""
    if dist.is_initialized() and isinstance(dist.distributed_c10d._world.default_pg, ProcessGroupFlagcx):
        _drain_torch_groups()


def _rank_list(ranks: Sequence[int]) -> str:
    """``ranks 0-7``, ``ranks 0, 2, 4``, ``ranks 0, 1, 2, 3, 5, 6, 7, 8, ... (16 ranks)``."""
    if len(ranks) > 2 and list(ranks) == list(range(ranks[0], ranks[0] + len(ranks))):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    shown = ", ".join(map(str, ranks[:8]))
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}" + (f", ... ({len(ranks)} ranks)" if len(ranks) > 8 else "")


def group_title(global_ranks: Sequence[int], desc: str = "") -> str:
    """How a torch user knows a group: the default group, ``group 'tp' (ranks 0-3)``, ``the group of ranks 0, 2``."""
    if desc == "default_pg":
        return "the default group"
    if desc and desc != "undefined":
        return f"group {desc!r} ({_rank_list(global_ranks)})"
    return f"the group of {_rank_list(global_ranks)}"


def _split_parent(global_ranks: list[int]) -> Optional[tuple[Communicator, str]]:
    """The default group's communicator and device type when a new group must be split from it.

    torch makes non-members of a new group call ``perform_nocolor_split`` exactly when
    the default group has a bound device whose backend supports splitting; members
    must then split too, under the same condition.
    """
    if not global_ranks or not dist.is_initialized():
        return None
    default = dist.distributed_c10d._get_default_group()
    device = getattr(default, "bound_device_id", None)
    if not isinstance(default, ProcessGroupFlagcx) or device is None:
        return None
    if not default.comm.can_split(device.type):
        return None
    return default.comm, device.type


def _create_process_group(opts: Any, backend_options: Any = None) -> ProcessGroupFlagcx:
    """Creator given to ``dist.Backend.register_backend`` (extended API)."""
    global_ranks = list(opts.global_ranks_in_group)
    devices = {}
    parent = _split_parent(global_ranks)
    if parent is not None:
        comm, device_type = parent
        child = comm.split_device(device_type, [comm.global_ranks.index(g) for g in global_ranks])
        if child is not None:
            devices[device_type] = child
    comm = Communicator(
        opts.store,
        opts.group_rank,
        opts.group_size,
        timeout=opts.timeout,
        name=str(opts.group_id) or "default",
        global_ranks=global_ranks or None,
        title=group_title(global_ranks or range(opts.group_size)),
        _device_adapters=devices,
    )
    return ProcessGroupFlagcx(comm)


_torch_monitored_barrier = dist.monitored_barrier


def monitored_barrier(group: Optional[dist.ProcessGroup] = None, timeout: Optional[timedelta] = None, wait_all_ranks: bool = False) -> None:
    """``dist.monitored_barrier`` for flagcx groups (torch's own refuses every backend but gloo).

    Same arguments and semantics: rank 0 of the group raises naming the rank(s) that did
    not arrive within ``timeout`` (default: the group's timeout); the others raise naming
    rank 0; ranks outside ``group`` return at once. Groups of other backends are passed
    to ``dist.monitored_barrier``.
    """
    pg = dist.distributed_c10d._get_default_group() if group is None else group
    if pg is dist.GroupMember.NON_GROUP_MEMBER:
        return
    if not isinstance(pg, ProcessGroupFlagcx):
        _torch_monitored_barrier(group, timeout, wait_all_ranks)
        return
    pg.monitored_barrier(timeout, wait_all_ranks)


def register() -> None:
    """Register backend "flagcx" with torch.distributed (idempotent)."""
    if BACKEND_NAME.upper() in dist.Backend._plugins:
        return
    unclaimed = [d for d in DEVICES if d not in dist.Backend.default_device_backend_map]
    dist.Backend.register_backend(BACKEND_NAME, _create_process_group, extended_api=True, devices=DEVICES)
    atexit.register(_drain_at_exit)
    # flagcx is chosen by name only: it never becomes a device type's implicit default, so a
    # vendor's extension imported later (torch_npu -> hccl for npu) still claims its device.
    for device in unclaimed:
        if dist.Backend.default_device_backend_map.get(device) == BACKEND_NAME:
            del dist.Backend.default_device_backend_map[device]


def communicator_of(group: Any) -> Communicator:
    """The :class:`Communicator` under a torch.distributed group whose backend is flagcx (for engines that call it directly)."""
    if isinstance(group, ProcessGroupFlagcx):
        return group.comm
    for device in ("cpu", "cuda"):
        try:
            backend = group._get_backend(torch.device(device))
        except Exception:  # no backend for this device type in the group
            continue
        if isinstance(backend, ProcessGroupFlagcx):
            return backend.comm
    raise invalid("communicator_of", None, "group", f"is {type(group).__name__}, not a flagcx process group", 'create it with backend="flagcx"')
