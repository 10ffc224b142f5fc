"""The heterogeneous runner: every op of the adapter contract as a hierarchical plan over clusters.

A communicator whose ranks form several clusters (see :mod:`flagcx.topology.clusters`)
gets one :class:`HeteroAdapter`. It builds three kinds of homogeneous
sub-communicators and never sends data any other way:

- ``intra`` lanes: the ranks of this rank's cluster, on the cluster's native adapters
  (its requested CPU adapter for host tensors, NCCL & co. for device tensors);
- ``peer`` lanes: the ranks at the same position j < m in every cluster (m = the
  smallest cluster size), on the host transport (shm when they share a host, else gloo);
- ``world``: every rank on the host transport, for point-to-point traffic between
  clusters (send/recv, alltoall(v), gather, scatter) and barrier.

Large ops are cut into chunks (FLAGCX_HETERO_CHUNK) and chunk k travels on lane
k % FLAGCX_HETERO_LANES, the lanes (one intra and one peer communicator each) working
in parallel threads: the host side of a transfer is memory-bound per thread, and lanes
use more of the host's cores. Device tensors are staged through pinned host memory:
the copy of chunk k+1 to the host overlaps the transfer of chunk k and the copy of
chunk k-1 back to the device (two copy streams); the device's own intra steps stay on
the caller's stream, driven by the calling thread. Clusters need not be contiguous in
rank order and may differ in size: rank (c, l) is represented in peer group ``l % m``
of its cluster. Every op completes on the host before it returns (``stream_ordered=False``).

Plans (n = elements, k = clusters):

- allreduce, per chunk: intra reduce-scatter into m shards (or reduces to positions
  0..m-1 when shards and cluster do not line up) -> allreduce of shard j over peer
  group j -> intra all-gather (or broadcasts from positions 0..m-1). Below some size the
  *flat* plan is faster (every rank's whole buffer to the host, one allreduce over
  ``world``, back): with FLAGCX_HETERO_ALLREDUCE=auto each size class (power of two)
  is timed both ways on its first calls (:class:`PlanChooser`; results exact either way)
  and the faster plan, by the slowest rank's time, serves every later call;
- reducescatter: the input is permuted so that peer group j's outputs are contiguous;
  intra reduce-scatter (or reduces) of those blocks -> reduce-scatter (or reduces) over
  peer group j -> intra sends to members at positions >= m;
- allgather: the reverse (intra sends to representatives -> all-gather over peer
  groups -> intra all-gather or broadcasts -> permute into rank order);
- broadcast / reduce: m shards, moved (chunked, on the lanes) over peer groups between
  the root's cluster and the others, with intra broadcasts / reduces / sends around them;
- gather / scatter: intra gather / scatter to each cluster's first rank, which trades
  its cluster's blocks with the root over ``world``;
- alltoall(v), send, recv: same-cluster blocks over ``intra``, the rest over ``world``.

A transport failure inside any op aborts every sub-communicator at once (the plan is
broken anyway): peers blocked on this rank in another sub-communicator then fail
immediately instead of at their timeout. Errors name ranks in this communicator's own
numbering (never a sub-communicator's), and every failing rank records its error in the
store, so a rank that only waited on a live peer (or saw it abort) appends what that
peer was failing on, down to the rank that died or stalled.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from .adapters.base import ALL_OPS, DONE, Adapter, Capabilities, Handle
from .bootstrap import store_allgather, store_poll
from .config import get as get_config
from .errors import FlagcxError, FlagcxTimeout, InvalidArgument, NotSupported
from .tensors import as_bytes
from .types import ReduceOp

if TYPE_CHECKING:
    from .communicator import Communicator

log = logging.getLogger("flagcx.hetero")

DEFAULT_CHUNK = 4 << 20
"""Bytes per staged chunk when some cluster drives devices and FLAGCX_HETERO_CHUNK is unset."""
DEFAULT_LANES = 4
"""Peer communicators moving chunks in parallel when some cluster drives devices and FLAGCX_HETERO_LANES is unset."""

_HIERARCHICAL_OPS = (ReduceOp.SUM, ReduceOp.PROD, ReduceOp.MAX, ReduceOp.MIN)
_CPU = torch.device("cpu")


class PlanChooser:
    """Per size class, which allreduce plan is faster, measured on the first calls of that class.

    The first ``len(ORDER)`` calls of a class run the plans in ``ORDER``: one untimed
    call of each (connections, pinned buffers), then each plan twice, alternating. The
    ranks then agree on the slowest rank's best time of each plan (one 2-element host
    allreduce) and the faster plan serves every later call. Every rank sees the same
    sequence of sizes (collectives are matched), so all pick the same plan at the same call.
    """

    PLANS = ("hierarchical", "flat")
    ORDER = ("hierarchical", "flat", "hierarchical", "flat", "hierarchical", "flat")
    WARMUP = 2
    """The first calls of ORDER are not timed."""

    def __init__(self, fixed: Optional[str]) -> None:
        self.fixed = fixed
        self._samples: dict[int, list[float]] = {}
        self.chosen: dict[int, str] = {}
        """Size class (bit length of the byte count) -> plan, once decided."""
        self.timings: dict[int, tuple[float, float]] = {}
        """Size class -> (hierarchical, flat): the slowest rank's best seconds, as agreed."""

    def plan(self, nbytes: int) -> tuple[str, bool]:
        """(plan for this call, whether to time it)."""
        if self.fixed is not None:
            return self.fixed, False
        cls = nbytes.bit_length()
        if cls in self.chosen:
            return self.chosen[cls], False
        calls = len(self._samples.setdefault(cls, []))
        return self.ORDER[calls], calls >= self.WARMUP

    def record(self, nbytes: int, seconds: Optional[float], agree: Callable[[list[float]], list[float]]) -> None:
        """Count a call of the class (``seconds`` when it was timed); after the last, agree with the other ranks and choose.

        Nothing to count with a fixed plan or a class already decided.
        """
        cls = nbytes.bit_length()
        if self.fixed is not None or cls in self.chosen:
            return
        samples = self._samples[cls]
        samples.append(float("inf") if seconds is None else seconds)
        if len(samples) < len(self.ORDER):
            return
        best = [min(t for t, p in zip(samples[self.WARMUP :], self.ORDER[self.WARMUP :]) if p == plan) for plan in self.PLANS]
        hier, flat = agree(best)
        self.timings[cls] = (hier, flat)
        self.chosen[cls] = "flat" if flat < hier else "hierarchical"
        del self._samples[cls]
        log.info("hetero allreduce, %d-%d bytes: hierarchical %.3g ms, flat %.3g ms: %s", 1 << (cls - 1), (1 << cls) - 1, hier * 1e3, flat * 1e3, self.chosen[cls])


def _shards(n: int, m: int) -> list[tuple[int, int]]:
    """m contiguous shards of n elements (the last ones may be short or empty)."""
    q = -(-n // m)
    return [(min(j * q, n), min((j + 1) * q, n)) for j in range(m)]


def _wait_all(handles: Sequence[Handle]) -> None:
    for h in handles:
        h.wait()


class _Pending(Handle):
    """Handles of posted transfers plus what must follow them (copy-back to the device, stream sync)."""

    __slots__ = ("_handles", "_after", "_finished")

    def __init__(self, handles: list[Handle], after: Sequence[Callable[[], None]] = ()) -> None:
        self._handles = handles
        self._after = list(after)
        self._finished = False

    def wait(self, timeout: Optional[float] = None) -> None:
        if self._finished:
            return
        for h in self._handles:
            h.wait(timeout)
        for step in self._after:
            step()
        self._finished = True

    def done(self) -> bool:
        return self._finished or all(h.done() for h in self._handles)


class HeteroAdapter(Adapter):
    """Hierarchical collectives over the clusters of one communicator (see the module docstring)."""

    name = "hetero"

    def __init__(self, comm: "Communicator") -> None:
        super().__init__(comm._adapter_context("hetero", _CPU))
        self.comm = comm
        self.clusters = list(comm.clusters)
        sizes = [c.size for c in self.clusters]
        self.k = len(sizes)
        self.m = min(sizes)
        self.sizes = sizes
        self.cluster_of = [0] * comm.size
        self.pos_of = [0] * comm.size
        for ci, cluster in enumerate(self.clusters):
            for li, r in enumerate(cluster.ranks):
                self.cluster_of[r], self.pos_of[r] = ci, li
        self.ci = self.cluster_of[comm.rank]
        self.li = self.pos_of[comm.rank]
        self.mine = self.clusters[self.ci]
        self._layout()

        intra_cpu = self._check_agreement()
        # creation order (intra lanes, peer lanes, world) is the same on every rank: no member waits on a non-member
        self.intras: list[Optional["Communicator"]] = [
            comm._subcomm(self.mine.ranks, f"hetero/intra{self.ci}.{lane}", cpu_adapter=intra_cpu) if self.mine.size > 1 else None
            for lane in range(self.nlanes)
        ]
        self.intra = self.intras[0]
        self.lanes: list["Communicator"] = []
        if self.li < self.m:
            members = [c.ranks[self.li] for c in self.clusters]
            self.lanes = [comm._subcomm(members, f"hetero/peer{self.li}.{lane}", cpu_adapter="auto") for lane in range(self.nlanes)]
        self.peer = self.lanes[0] if self.lanes else None
        self._pool = ThreadPoolExecutor(self.nlanes, thread_name_prefix="flagcx-hetero") if self.nlanes > 1 else None
        self.world = comm._subcomm(range(comm.size), "hetero/world", cpu_adapter="auto")
        caps = [self.world._adapter(_CPU, "init").capabilities]
        if self.peer is not None:
            caps.append(self.peer._adapter(_CPU, "init").capabilities)
        if self.intra is not None:
            caps.append(self.intra._adapter(_CPU, "init").capabilities)
            if self.mine.device_type != "cpu":  # created now, while every member is here (p2p may come first)
                caps.append(self.intra._adapter(torch.device(self.mine.device_type), "init").capabilities)
        self._streams: dict[torch.device, tuple[object, object]] = {}
        self._pinned_bytes: Optional[torch.Tensor] = None
        self._agree_capabilities(caps)
        log.info(
            "%s: rank %d in cluster %s (%d of %d clusters, sizes %s), chunk %s, lanes %d",
            comm.name, comm.rank, self.mine.label, self.ci + 1, self.k, sizes, self.chunk or "off", self.nlanes,
        )

    # ------------------------------------------------------------------ setup
    def _check_agreement(self) -> str:
        """Checks every rank makes alike (so all raise, none waits): one CPU adapter per cluster, one chunk size and lane count.

        Returns this cluster's CPU adapter; sets ``self.chunk``, ``self.nlanes`` and ``self.plans``.
        """
        records = self.comm._records
        for cluster in self.clusters:
            wanted = {records[r]["cpu_adapter"] for r in cluster.ranks}
            if len(wanted) > 1:
                detail = ", ".join(f"rank {r}: {records[r]['cpu_adapter']}" for r in cluster.ranks)
                raise InvalidArgument(
                    f"the ranks of cluster {cluster.label!r} disagree on FLAGCX_CPU_ADAPTER ({detail}); set one value per cluster",
                    op="init",
                    rank=self.rank,
                )
        has_devices = any(c.device_type != "cpu" for c in self.clusters)
        cfg = get_config()
        mine = {
            "FLAGCX_HETERO_CHUNK": cfg.hetero_chunk or (DEFAULT_CHUNK if has_devices else 0),
            "FLAGCX_HETERO_LANES": cfg.hetero_lanes or (DEFAULT_LANES if has_devices else 1),
            "FLAGCX_HETERO_ALLREDUCE": cfg.hetero_allreduce,
        }
        raw = self._allgather_json(mine, "hetero-config")
        for key, value in mine.items():
            if len({a[key] for a in raw}) > 1:
                detail = ", ".join(f"rank {r}: {a[key]}" for r, a in enumerate(raw))
                raise InvalidArgument(f"ranks disagree on {key} ({detail}); set the same value on every rank", op="init", rank=self.rank)
        self.chunk = mine["FLAGCX_HETERO_CHUNK"]
        self.nlanes = mine["FLAGCX_HETERO_LANES"]
        self.plans = PlanChooser(None if mine["FLAGCX_HETERO_ALLREDUCE"] == "auto" else mine["FLAGCX_HETERO_ALLREDUCE"])
        return records[self.mine.ranks[0]]["cpu_adapter"]

    def _allgather_json(self, value: dict, what: str) -> list[dict]:
        raw = store_allgather(
            self.comm._store, self.comm._next_key(what), self.rank, self.size,
            json.dumps(value).encode(), self.ctx.timeout, f"heterogeneous init of {self.comm.name}",
        )
        return [json.loads(r) for r in raw]

    def _layout(self) -> None:
        """Peer-group layout of reducescatter / allgather blocks (rank (c, l) belongs to peer group l % m)."""
        m, k = self.m, self.k
        self.group_ranks: list[list[int]] = []  # peer group j's represented ranks, cluster by cluster
        self.group_counts: list[list[int]] = []  # [j][c]: how many of cluster c's ranks peer group j represents
        for j in range(m):
            counts = [len(range(j, self.sizes[c], m)) for c in range(k)]
            self.group_counts.append(counts)
            self.group_ranks.append([self.clusters[c].ranks[l] for c in range(k) for l in range(j, self.sizes[c], m)])
        self.p_order = [r for ranks in self.group_ranks for r in ranks]
        self.p_offset = [sum(len(g) for g in self.group_ranks[:j]) for j in range(m)]
        self.p_identity = self.p_order == list(range(self.comm.size))
        self._p_index: dict[torch.device, torch.Tensor] = {}

    def _agree_capabilities(self, caps: list[Capabilities]) -> None:
        """Declare the reduce dtypes / ops that every rank's transports support (every rank declares the same)."""
        dtypes = frozenset.intersection(*(c.reduce_dtypes for c in caps))
        ops = frozenset(_HIERARCHICAL_OPS).intersection(*(c.reduce_ops for c in caps))
        raw = self._allgather_json({"dtypes": sorted(str(d) for d in dtypes), "ops": sorted(o.name for o in ops)}, "hetero-caps")
        names = set.intersection(*(set(a["dtypes"]) for a in raw))
        op_names = set.intersection(*(set(a["ops"]) for a in raw))
        self.capabilities = Capabilities(
            devices=frozenset({"cpu"} | {c.device_type for c in self.clusters}),
            reduce_dtypes=frozenset(d for d in dtypes if str(d) in names),
            reduce_ops=frozenset(o for o in ops if o.name in op_names),
            ops=ALL_OPS,
            any_source=False,
            stream_ordered=False,
        )

    # ------------------------------------------------------------------ transports and staging
    def _intra(self, t: torch.Tensor, op: str, lane: int = 0) -> Adapter:
        intra = self.intras[lane]
        assert intra is not None
        return intra._adapter(t.device, op)

    def _host(self, sub: "Communicator", op: str) -> Adapter:
        return sub._adapter(_CPU, op)

    def _check_device(self, t: torch.Tensor, op: str) -> None:
        kind = t.device.type
        if kind != "cpu" and kind != self.mine.device_type:
            raise NotSupported(
                f"rank {self.comm.rank} is in cluster {self.mine.label!r} ({self.mine.device_type}); it cannot move {t.device} tensors. "
                f"Pass cpu or {self.mine.device_type} tensors, or set FLAGCX_CLUSTER_ID so that each device type has its own cluster",
                op=op,
                rank=self.rank,
            )

    def _copy_streams(self, device: torch.device) -> tuple:
        pair = self._streams.get(device)
        if pair is None:
            module = torch.get_device_module(device.type)
            pair = self._streams[device] = (module.Stream(device=device), module.Stream(device=device))
        return pair

    def _finish_device(self, t: torch.Tensor) -> None:
        """Complete the op on the host: wait (at most the timeout) for the device work on the current stream."""
        if t.device.type == "cpu":
            return
        module = torch.get_device_module(t.device.type)
        event = module.Event()
        event.record(module.current_stream(t.device))
        start = time.monotonic()
        deadline = start + self.ctx.timeout
        delay = 1e-5
        while not event.query():
            now = time.monotonic()
            if now - start < 5e-4:  # the first half millisecond: yield only (a sleep's wake-up costs 50-100 us)
                time.sleep(0)
                continue
            if now > deadline:
                raise FlagcxTimeout(
                    f"device work of a heterogeneous op on {self.comm.name} not finished after {self.ctx.timeout:g} s "
                    "(a peer of the device cluster did not arrive); abort the communicator and create a new one",
                    rank=self.rank,
                )
            time.sleep(delay)
            delay = min(delay * 2, 2e-4)

    def _to_host(self, t: torch.Tensor, with_data: bool = True) -> torch.Tensor:
        """``t`` itself on the host, else a pinned host buffer (holding t's data when ``with_data``)."""
        if t.device.type == "cpu":
            return t
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        if with_data:
            h.copy_(t)
        return h

    def _pinned(self, like: torch.Tensor) -> torch.Tensor:
        """A pinned host buffer shaped like 1-D ``like``, reused across allreduce calls (pinning costs more than small copies)."""
        nbytes = like.numel() * like.element_size()
        if self._pinned_bytes is None or self._pinned_bytes.numel() < nbytes:
            self._pinned_bytes = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8, pin_memory=True)
        return self._pinned_bytes[:nbytes].view(like.dtype)

    def _to_device(self, h: torch.Tensor, t: torch.Tensor) -> None:
        """Copy host buffer ``h`` back into ``t`` (enqueued on the current stream; nothing when t is on the host)."""
        if h.data_ptr() != t.data_ptr() or t.device.type != "cpu":
            t.copy_(h, non_blocking=t.device.type != "cpu")

    def _staged(self, buf: torch.Tensor, fn: Callable[[Adapter, torch.Tensor], None], reads: bool, writes: bool, name: str) -> None:
        """Run the host transfer ``fn(lane adapter, chunk)`` over peer group ``li`` on ``buf``, chunk by chunk, in place.

        ``buf`` is 1-D; every member runs the same chunks (same FLAGCX_HETERO_CHUNK and
        element count) and chunk k always travels on lane k % FLAGCX_HETERO_LANES, the
        lanes in parallel threads (their transports release the GIL). Device buffers go
        through pinned host memory: the copies to the host are queued at once on one
        stream (chunk k+1 goes down while chunk k travels), each chunk is copied back on
        a second stream as soon as its transfer is done. ``reads`` / ``writes``: whether
        this rank's data is sent / its buffer receives a result.
        """
        n = buf.numel()
        bounds = self._chunks(buf)
        lanes = [self._host(lane, name) for lane in self.lanes]
        if buf.device.type == "cpu":
            self._run_lanes(bounds, lambda i, lane: fn(lanes[lane], buf[bounds[i][0] : bounds[i][1]]))
            return
        module = torch.get_device_module(buf.device.type)
        d2h, h2d = self._copy_streams(buf.device)
        current = module.current_stream(buf.device)
        host = torch.empty(n, dtype=buf.dtype, pin_memory=True)
        ready = []
        if reads:
            d2h.wait_stream(current)
            with module.stream(d2h):
                for a, b in bounds:
                    host[a:b].copy_(buf[a:b], non_blocking=True)
                    event = module.Event()
                    event.record(d2h)
                    ready.append(event)
        if writes:
            h2d.wait_stream(current)

        def one(i: int, lane: int) -> None:
            a, b = bounds[i]
            if reads:
                ready[i].synchronize()
            fn(lanes[lane], host[a:b])
            if writes:
                with module.stream(h2d):
                    buf[a:b].copy_(host[a:b], non_blocking=True)

        self._run_lanes(bounds, one)
        if writes:
            current.wait_stream(h2d)
        if reads:
            current.wait_stream(d2h)

    def _start_lanes(self, bounds: list[tuple[int, int]], one: Callable[[int, int], None]) -> list:
        """Start ``one(k, lane)`` for every chunk k, lane = k % lanes: each lane takes its chunks in order, the lanes in parallel.

        Returns per-lane lists of (chunk, done flag, error holder) for :meth:`_lane_result`.
        """
        nlanes = min(self.nlanes, len(bounds))
        progress = [[] for _ in range(nlanes)]
        for k in range(len(bounds)):
            progress[k % nlanes].append(k)
        done = [threading.Event() for _ in bounds]
        errors: list[Optional[BaseException]] = [None] * len(bounds)

        def lane_work(lane: int) -> None:
            for k in progress[lane]:
                try:
                    one(k, lane)
                except BaseException as exc:  # handed to the caller by _lane_result
                    errors[k] = exc
                    for rest in progress[lane]:
                        errors[rest] = errors[rest] or exc
                        done[rest].set()
                    return
                done[k].set()

        if self._pool is None or nlanes == 1:
            for lane in range(nlanes):
                lane_work(lane)
        else:
            for lane in range(nlanes):
                self._pool.submit(lane_work, lane)
        return [done, errors]

    def _lane_result(self, started: list, k: Optional[int]) -> None:
        """Wait for chunk k (every chunk when k is None) of :meth:`_start_lanes`; re-raise its error."""
        done, errors = started
        for i in range(len(done)) if k is None else (k,):
            if not done[i].wait(self.ctx.timeout * 2):
                raise FlagcxTimeout(f"a transfer between clusters did not finish within {2 * self.ctx.timeout:g} s", rank=self.rank)
            if errors[i] is not None:
                raise errors[i]

    def _run_lanes(self, bounds: list[tuple[int, int]], one: Callable[[int, int], None]) -> None:
        self._lane_result(self._start_lanes(bounds, one), None)

    def _p2p(self, adapter: Adapter, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> list[Handle]:
        """Post sends and receives together (one group for adapters that need it)."""
        handles: list[Handle] = []
        adapter.group_start()
        try:
            for t, peer in recvs:
                if t.numel():
                    handles.append(adapter.recv(as_bytes(t), peer))
            for t, peer in sends:
                if t.numel():
                    handles.append(adapter.send(as_bytes(t), peer))
        finally:
            adapter.group_end()
        return handles

    def _perm_index(self, device: torch.device) -> torch.Tensor:
        idx = self._p_index.get(device)
        if idx is None:
            idx = self._p_index[device] = torch.tensor(self.p_order, dtype=torch.long, device=device)
        return idx

    # ------------------------------------------------------------------ shard phases (allreduce, reduce, broadcast)
    def _native_shards(self, n: int) -> bool:
        return self.mine.size == self.m and n % self.m == 0

    def _reduce_to_positions(self, send: torch.Tensor, work: torch.Tensor, op: ReduceOp, name: str, lane: int = 0) -> None:
        """Intra phase: position j < m ends with the cluster's reduction of shard j in ``work``."""
        n = send.numel()
        if self.intra is None:
            if work.data_ptr() != send.data_ptr():
                work.copy_(send)
            return
        adapter = self._intra(send, name, lane)
        if self._native_shards(n):
            q = n // self.m
            adapter.reducescatter(send, work[self.li * q : (self.li + 1) * q], op).wait()
            return
        handles = []
        adapter.group_start()
        try:
            for j, (a, b) in enumerate(_shards(n, self.m)):
                if b > a:
                    handles.append(adapter.reduce(send[a:b], work[a:b] if j == self.li else send[a:b], op, j))
        finally:
            adapter.group_end()
        _wait_all(handles)

    def _spread_from_positions(self, work: torch.Tensor, name: str, lane: int = 0) -> None:
        """Intra phase: every member gets every shard j from position j."""
        if self.intra is None:
            return
        n = work.numel()
        adapter = self._intra(work, name, lane)
        if self._native_shards(n):
            q = n // self.m
            adapter.allgather(as_bytes(work[self.li * q : (self.li + 1) * q]), as_bytes(work)).wait()
            return
        handles = []
        adapter.group_start()
        try:
            for j, (a, b) in enumerate(_shards(n, self.m)):
                if b > a:
                    handles.append(adapter.broadcast(as_bytes(work[a:b]), j))
        finally:
            adapter.group_end()
        _wait_all(handles)

    def _my_shard(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        if self.li >= self.m:
            return None
        a, b = _shards(t.numel(), self.m)[self.li]
        return t[a:b] if b > a else None

    # ------------------------------------------------------------------ collectives
    def _chunks(self, t: torch.Tensor) -> list[tuple[int, int]]:
        n = t.numel()
        step = max(1, self.chunk // t.element_size()) if self.chunk else n
        return [(a, min(a + step, n)) for a in range(0, n, step)]

    def allreduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        """The hierarchical or the flat plan, whichever :class:`PlanChooser` measured faster for this size."""
        self._check_device(send, "allreduce")
        plan, timed = self.plans.plan(send.nbytes)
        start = time.perf_counter()
        if plan == "flat":
            self._allreduce_flat(send, recv, op)
        else:
            self._allreduce_hierarchical(send, recv, op)
        self.plans.record(send.nbytes, time.perf_counter() - start if timed else None, self._slowest)
        return DONE

    def _slowest(self, seconds: list[float]) -> list[float]:
        """Element-wise maximum over every rank (a tiny host allreduce over ``world``)."""
        t = torch.tensor(seconds, dtype=torch.float64)
        self._host(self.world, "allreduce").allreduce(t, t, ReduceOp.MAX).wait()
        return t.tolist()

    def _allreduce_flat(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> None:
        """Every rank's whole buffer through the host: one allreduce over ``world`` (device buffers staged in pinned memory)."""
        world = self._host(self.world, "allreduce")
        if send.device.type == "cpu":
            world.allreduce(send, recv, op).wait()
            return
        host = self._pinned(send)
        host.copy_(send)  # waits for the caller's stream (the data is there once it returns)
        world.allreduce(host, host, op).wait()
        recv.copy_(host)  # synchronous: nothing else is queued before it, so it cannot wait on a peer

    def _allreduce_hierarchical(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> None:
        """Chunk by chunk (chunk k on lane k % lanes): intra reduce to positions -> peer allreduce -> intra spread."""
        name = "allreduce"
        bounds = self._chunks(send)
        if send.device.type != "cpu":
            self._allreduce_device(send, recv, op, bounds)
            return

        def one(k: int, lane: int) -> None:
            a, b = bounds[k]
            self._reduce_to_positions(send[a:b], recv[a:b], op, name, lane)
            shard = self._my_shard(recv[a:b])
            if shard is not None:
                self._host(self.lanes[lane], name).allreduce(shard, shard, op).wait()
            self._spread_from_positions(recv[a:b], name, lane)

        self._run_lanes(bounds, one)

    def _allreduce_device(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, bounds: list[tuple[int, int]]) -> None:
        """The device side of allreduce: this thread drives the native adapter, lane threads the host transfers.

        Every chunk's intra phase is queued on the current stream at once; the host copy
        of this rank's shard of chunk k follows it on the D2H stream; a lane thread
        waits for that copy, all-reduces the shard over its peer lane and queues the copy
        back on the H2D stream; this thread then queues chunk k's intra spread behind it.
        """
        name = "allreduce"
        module = torch.get_device_module(send.device.type)
        d2h, h2d = self._copy_streams(send.device)
        current = module.current_stream(send.device)
        host = self._pinned(send) if self.lanes else None
        down: list = [None] * len(bounds)
        up: list = [None] * len(bounds)
        shards: list[Optional[tuple[int, int]]] = [None] * len(bounds)
        for k, (a, b) in enumerate(bounds):
            self._reduce_to_positions(send[a:b], recv[a:b], op, name)
            if host is None:
                continue
            sa, sb = _shards(b - a, self.m)[self.li]
            if sb > sa:
                shards[k] = (a + sa, a + sb)
                d2h.wait_stream(current)
                with module.stream(d2h):
                    host[a + sa : a + sb].copy_(recv[a + sa : a + sb], non_blocking=True)
                    down[k] = module.Event()
                    down[k].record(d2h)
        if host is not None:
            h2d.wait_stream(current)

            def one(k: int, lane: int) -> None:
                if shards[k] is None:
                    return
                sa, sb = shards[k]
                down[k].synchronize()
                h = host[sa:sb]
                self._host(self.lanes[lane], name).allreduce(h, h, op).wait()
                with module.stream(h2d):
                    recv[sa:sb].copy_(h, non_blocking=True)
                    event = module.Event()
                    event.record(h2d)
                up[k] = event

            futures = self._start_lanes(bounds, one)
        for k, (a, b) in enumerate(bounds):
            if host is not None and shards[k] is not None:
                self._lane_result(futures, k)
                current.wait_event(up[k])
            self._spread_from_positions(recv[a:b], name)
        if host is not None:
            self._lane_result(futures, None)
            current.wait_stream(d2h)
        self._finish_device(recv)

    def broadcast(self, tensor: torch.Tensor, root: int) -> Handle:
        name = "broadcast"
        self._check_device(tensor, name)
        rc, lr = self.cluster_of[root], self.pos_of[root]
        if self.ci == rc and self.intra is not None:
            self._intra(tensor, name).broadcast(tensor, lr).wait()
        shard = self._my_shard(tensor)
        if shard is not None:
            self._staged(shard, lambda lane, h: lane.broadcast(h, rc).wait(), reads=self.ci == rc, writes=self.ci != rc, name=name)
        if self.ci != rc:
            self._spread_from_positions(tensor, name)
        self._finish_device(tensor)
        return DONE

    def reduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, root: int) -> Handle:
        name = "reduce"
        self._check_device(send, name)
        rc, lr = self.cluster_of[root], self.pos_of[root]
        is_root = self.comm.rank == root
        work = recv if is_root else torch.empty_like(send)
        self._reduce_to_positions(send, work, op, name)
        shard = self._my_shard(work)
        if shard is not None:
            self._staged(shard, lambda lane, h: lane.reduce(h, h, op, rc).wait(), reads=True, writes=self.ci == rc, name=name)
        if self.ci == rc and self.intra is not None:
            shards = _shards(work.numel(), self.m)
            adapter = self._intra(work, name)
            if is_root:
                recvs = [(work[a:b], j) for j, (a, b) in enumerate(shards) if j != lr]
                _wait_all(self._p2p(adapter, [], recvs))
            elif self.li < self.m:
                a, b = shards[self.li]
                _wait_all(self._p2p(adapter, [(work[a:b], lr)], []))
        self._finish_device(send)
        return DONE

    def reducescatter(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        name = "reducescatter"
        self._check_device(send, name)
        n = recv.numel()
        size = self.comm.size
        if self.p_identity:
            perm = send
        else:
            perm = send.view(size, n).index_select(0, self._perm_index(send.device)).reshape(-1)
        # intra: position j < m gets the cluster's partial sums of peer group j's blocks
        j = self.li
        mine = None
        if j < self.m:
            mine = torch.empty(len(self.group_ranks[j]) * n, dtype=send.dtype, device=send.device)
        if self.intra is None:  # a one-rank cluster: m == 1 and peer group 0 holds every block
            mine.copy_(perm)
        else:
            adapter = self._intra(send, name)
            lengths = [len(g) for g in self.group_ranks]
            if self.mine.size == self.m and len(set(lengths)) == 1:
                adapter.reducescatter(perm, mine, op).wait()
            else:
                handles = []
                adapter.group_start()
                try:
                    for g in range(self.m):
                        a, b = self.p_offset[g] * n, (self.p_offset[g] + lengths[g]) * n
                        handles.append(adapter.reduce(perm[a:b], mine if g == j else perm[a:b], op, g))
                finally:
                    adapter.group_end()
                _wait_all(handles)
        # peer group j: cluster c's member gets the totals of the blocks of its cluster's ranks in group j
        out = None
        if mine is not None:
            counts = self.group_counts[j]
            peer = self._host(self.peer, name)
            host = self._to_host(mine)
            if len(set(counts)) == 1:
                out_h = torch.empty(counts[self.ci] * n, dtype=host.dtype, device=host.device, pin_memory=host.is_pinned())
                peer.reducescatter(host, out_h, op).wait()
            else:
                handles = []
                starts = [sum(counts[:c]) * n for c in range(self.k)]
                for c in range(self.k):
                    seg = host[starts[c] : starts[c] + counts[c] * n]
                    handles.append(peer.reduce(seg, seg, op, c))
                _wait_all(handles)
                out_h = host[starts[self.ci] : starts[self.ci] + counts[self.ci] * n]
            out = out_h
        # intra: the representative hands each member at position >= m its block
        if out is not None:
            self._to_device(out[:n], recv)
        if self.intra is not None and self.mine.size > self.m:
            adapter = self._intra(send, name)
            if j < self.m:
                extra = list(range(j + self.m, self.mine.size, self.m))
                dev_out = out if send.device.type == "cpu" else out.to(send.device, non_blocking=True)
                sends = [(dev_out[(i + 1) * n : (i + 2) * n], l) for i, l in enumerate(extra)]
                _wait_all(self._p2p(adapter, sends, []))
            else:
                _wait_all(self._p2p(adapter, [], [(recv, j % self.m)]))
        self._finish_device(recv)
        return DONE

    def allgather(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        name = "allgather"
        self._check_device(send, name)
        n = send.numel()
        j = self.li
        # intra: position j < m collects the blocks of its cluster's ranks in peer group j
        pack = send
        if self.intra is not None and self.mine.size > self.m:
            adapter = self._intra(send, name)
            if j < self.m:
                extra = list(range(j + self.m, self.mine.size, self.m))
                pack = torch.empty((1 + len(extra)) * n, dtype=send.dtype, device=send.device)
                pack[:n].copy_(send)
                recvs = [(pack[(i + 1) * n : (i + 2) * n], l) for i, l in enumerate(extra)]
                _wait_all(self._p2p(adapter, [], recvs))
            else:
                _wait_all(self._p2p(adapter, [(send, j % self.m)], []))
        # peer group j: every member gets every cluster's pack, cluster by cluster
        size = self.comm.size
        gathered = recv if self.p_identity else torch.empty(size * n, dtype=send.dtype, device=send.device)
        if j < self.m:
            off, cnt = self.p_offset[j] * n, len(self.group_ranks[j]) * n
            counts = self.group_counts[j]
            peer = self._host(self.peer, name)
            host_in = self._to_host(pack)
            dest = gathered[off : off + cnt]
            host_out = self._to_host(dest, with_data=False)
            if len(set(counts)) == 1:
                peer.allgather(host_in, host_out).wait()
            else:
                starts = [sum(counts[:c]) * n for c in range(self.k)]
                host_out[starts[self.ci] : starts[self.ci] + counts[self.ci] * n].copy_(host_in)
                handles = []
                for c in range(self.k):
                    handles.append(peer.broadcast(host_out[starts[c] : starts[c] + counts[c] * n], c))
                _wait_all(handles)
            self._to_device(host_out, dest)
        # intra: everyone gets every peer group's blocks
        if self.intra is not None:
            adapter = self._intra(send, name)
            lengths = [len(g) for g in self.group_ranks]
            if self.mine.size == self.m and len(set(lengths)) == 1:
                off = self.p_offset[j] * n
                adapter.allgather(gathered[off : off + lengths[j] * n], gathered).wait()
            else:
                handles = []
                adapter.group_start()
                try:
                    for g in range(self.m):
                        a = self.p_offset[g] * n
                        handles.append(adapter.broadcast(gathered[a : a + lengths[g] * n], g))
                finally:
                    adapter.group_end()
                _wait_all(handles)
        if not self.p_identity:
            recv.view(size, n).index_copy_(0, self._perm_index(send.device), gathered.view(size, n))
        self._finish_device(recv)
        return DONE

    def gather(self, send: torch.Tensor, recv: Optional[torch.Tensor], root: int) -> Handle:
        name = "gather"
        self._check_device(send, name)
        n = send.numel()
        rc, lr = self.cluster_of[root], self.pos_of[root]
        is_root = self.comm.rank == root
        # intra: gather to the root (root's cluster) or to position 0 (other clusters)
        target = lr if self.ci == rc else 0
        pack = None
        if self.li == target:
            pack = send if self.intra is None else torch.empty(self.mine.size * n, dtype=send.dtype, device=send.device)
        if self.intra is not None:
            self._intra(send, name).gather(send, pack, target).wait()
        world = self._host(self.world, name)
        if is_root:
            recv.view(-1, n).index_copy_(0, torch.tensor(self.mine.ranks, device=send.device), pack.view(-1, n))
            others = [c for c in range(self.k) if c != rc]
            bufs = {c: self._to_host(torch.empty(self.sizes[c] * n, dtype=send.dtype, device=send.device), with_data=False) for c in others}
            _wait_all(self._p2p(world, [], [(bufs[c], self.clusters[c].ranks[0]) for c in others]))
            for c in others:
                idx = torch.tensor(self.clusters[c].ranks, device=send.device)
                recv.view(-1, n).index_copy_(0, idx, bufs[c].view(-1, n).to(send.device, non_blocking=True))
        elif self.ci != rc and self.li == 0:
            _wait_all(self._p2p(world, [(self._to_host(pack), root)], []))
        self._finish_device(send)
        return DONE

    def scatter(self, send: Optional[torch.Tensor], recv: torch.Tensor, root: int) -> Handle:
        name = "scatter"
        self._check_device(recv, name)
        n = recv.numel()
        rc, lr = self.cluster_of[root], self.pos_of[root]
        is_root = self.comm.rank == root
        world = self._host(self.world, name)
        pack = None
        if is_root:
            blocks = send.view(-1, n)
            sends = []
            for c in range(self.k):
                if c != rc:
                    part = blocks.index_select(0, torch.tensor(self.clusters[c].ranks, device=send.device)).reshape(-1)
                    sends.append((self._to_host(part), self.clusters[c].ranks[0]))
            handles = self._p2p(world, sends, [])
            pack = blocks.index_select(0, torch.tensor(self.mine.ranks, device=send.device)).reshape(-1)
            _wait_all(handles)
        elif self.ci != rc and self.li == 0:
            pack = torch.empty(self.mine.size * n, dtype=recv.dtype, device=recv.device)
            host = self._to_host(pack, with_data=False)
            _wait_all(self._p2p(world, [], [(host, root)]))
            self._to_device(host, pack)
        source = lr if self.ci == rc else 0
        if self.intra is None:
            recv.copy_(pack)
        else:
            self._intra(recv, name).scatter(pack, recv, source).wait()
        self._finish_device(recv)
        return DONE

    def alltoall(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        counts = [send.numel() // self.comm.size] * self.comm.size
        return self._exchange("alltoall", send, counts, recv, counts)

    def alltoallv(self, send: torch.Tensor, send_counts: list[int], recv: torch.Tensor, recv_counts: list[int]) -> Handle:
        return self._exchange("alltoallv", send, list(send_counts), recv, list(recv_counts))

    def _exchange(self, name: str, send: torch.Tensor, send_counts: list[int], recv: torch.Tensor, recv_counts: list[int]) -> Handle:
        self._check_device(send, name)
        me = self.comm.rank
        soff = [sum(send_counts[:p]) for p in range(self.comm.size)]
        roff = [sum(recv_counts[:p]) for p in range(self.comm.size)]
        sblock = lambda t, p: t[soff[p] : soff[p] + send_counts[p]]  # noqa: E731
        rblock = lambda t, p: t[roff[p] : roff[p] + recv_counts[p]]  # noqa: E731
        if send.data_ptr() == recv.data_ptr() and send.numel():
            send = send.clone()
        others = [r for r in range(self.comm.size) if self.cluster_of[r] != self.ci]
        host_send = self._to_host(send)  # before the intra exchange is queued on the same stream
        host_recv = self._to_host(recv, with_data=False)
        handles: list[Handle] = []
        if self.intra is not None:
            peers = [r for r in self.mine.ranks if r != me]
            sends = [(sblock(send, p), self.pos_of[p]) for p in peers]
            recvs = [(rblock(recv, p), self.pos_of[p]) for p in peers]
            handles += self._p2p(self._intra(send, name), sends, recvs)
        rblock(recv, me).copy_(sblock(send, me))
        world = self._host(self.world, name)
        cross = self._p2p(world, [(sblock(host_send, p), p) for p in others], [(rblock(host_recv, p), p) for p in others])
        _wait_all(cross)
        if recv.device.type != "cpu":
            for p in others:
                if recv_counts[p]:
                    rblock(recv, p).copy_(rblock(host_recv, p), non_blocking=True)
        _wait_all(handles)
        self._finish_device(recv)
        return DONE

    # ------------------------------------------------------------------ point to point, barrier
    def send(self, tensor: torch.Tensor, peer: int) -> Handle:
        self._check_device(tensor, "send")
        if self.cluster_of[peer] == self.ci:
            handle = self._intra(tensor, "send").send(tensor, self.pos_of[peer])
            return _Pending([handle], [lambda: self._finish_device(tensor)])
        return self._host(self.world, "send").send(self._to_host(tensor), peer)

    def recv(self, tensor: torch.Tensor, peer: Optional[int]) -> Handle:
        if peer is None:
            raise NotSupported("a heterogeneous communicator cannot receive from any source; pass the sending rank", op="recv", rank=self.rank)
        self._check_device(tensor, "recv")
        if self.cluster_of[peer] == self.ci:
            handle = self._intra(tensor, "recv").recv(tensor, self.pos_of[peer])
            return _Pending([handle], [lambda: self._finish_device(tensor)])
        host = self._to_host(tensor, with_data=False)
        handle = self._host(self.world, "recv").recv(host, peer)
        if host is tensor:
            return handle
        return _Pending([handle], [lambda: tensor.copy_(host)])

    def barrier(self) -> Handle:
        return self._host(self.world, "barrier").barrier()

    # ------------------------------------------------------------------ lifetime
    def _subs(self) -> list["Communicator"]:
        return [c for c in (*self.intras, *self.lanes, self.world) if c is not None]

    def abort(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        for sub in self._subs():
            sub.abort()

    def close(self) -> None:
        for sub in self._subs():
            sub.destroy()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


_RANK = re.compile(r"\brank (\d+)( \(global \d+\))?")
FAILURE_WAIT = 2.0
"""Seconds a failing rank waits for the record of a live peer it blames (see _fail_fast)."""


def _in_comm_ranks(self: HeteroAdapter, text: str) -> str:
    """``text`` with the ranks of the sub-communicator it names rewritten as this communicator's ranks."""
    for sub in sorted(self._subs(), key=lambda c: -len(c.name)):
        at = text.find(sub.name)
        if at < 0:
            continue
        head, tail = text[: at + len(sub.name)], text[at + len(sub.name) :]

        def mapped(m: "re.Match[str]") -> str:
            r = int(m.group(1))
            if r >= len(sub.global_ranks):
                return m.group(0)
            g = sub.global_ranks[r]
            mine = self.comm.global_ranks.index(g)
            return f"rank {mine}" if mine == g else f"rank {mine} (global {g})"

        return head.replace(sub.name, f"{self.comm.name} ({sub.name[len(self.comm.name) + 1 :]})") + _RANK.sub(mapped, tail)
    return text


def _with_peer_failures(self: HeteroAdapter, exc: FlagcxError, text: str) -> tuple[str, type]:
    """``text`` plus what the live peers it blames were failing on (one peer's wait is often another's stall).

    Every failing rank records its error (class and text) under ``failure/<rank>`` in the
    store; a rank that blames a live peer (timed out waiting for it, or saw it abort) waits
    up to FAILURE_WAIT for that peer's record and follows the chain, so the rank that
    really died or stalled is named even by ranks that only waited on its victims. A rank
    whose own news is only a peer's abort takes the class of the failure that caused it
    (a peer that timed out makes it a FlagcxTimeout here too).
    """
    store = self.ctx.store
    try:
        store.compare_set(f"failure/{self.rank}", "", f"{type(exc).__name__}:{text}")  # a rank's first failure explains it
    except Exception:  # the store is gone: report what this rank saw
        return text, type(exc)
    cls: type = type(exc)
    cascade = "aborted its communicator" in text or "closed its communicator" in text
    notes, seen, todo = [], {self.rank}, [text]
    deadline = time.monotonic() + min(FAILURE_WAIT, self.ctx.timeout)
    while todo and len(seen) <= self.comm.size:
        current = todo.pop(0)
        if " died" in current and "alive" not in current:
            continue
        for m in _RANK.finditer(current):
            peer = int(m.group(1))
            if peer in seen or peer >= self.comm.size:
                continue
            seen.add(peer)
            try:
                record = store_poll(store, f"failure/{peer}", max(deadline - time.monotonic(), 0.0))
            except Exception:
                return text + "".join(notes), cls
            if record is None:
                continue
            kind, _, theirs = record.decode(errors="replace").partition(":")
            notes.append(f"; rank {peer} was failing too: {theirs}")
            todo.append(theirs)
            if cascade and kind == FlagcxTimeout.__name__:
                cls = FlagcxTimeout
    return text + "".join(notes), cls


def _refuse_capture(self: HeteroAdapter, op: str) -> None:
    """A heterogeneous op completes on the host before it returns, so a CUDA graph cannot hold it."""
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        raise NotSupported(
            f"{op} on heterogeneous communicator {self.comm.name} cannot be captured in a CUDA graph: it moves data "
            "through host memory and completes on the host before it returns; call it outside the capture "
            "(or capture only the device clusters' own communicators)",
            op=op,
            rank=self.rank,
        )


def _fail_fast(fn: Callable) -> Callable:
    """Wrap an op of HeteroAdapter: refuse a CUDA graph capture; a transport failure aborts every sub-communicator before it propagates."""

    @functools.wraps(fn)
    def op(self: HeteroAdapter, *args, **kwargs):
        _refuse_capture(self, fn.__name__)
        try:
            return fn(self, *args, **kwargs)
        except (InvalidArgument, NotSupported):
            raise
        except FlagcxError as exc:
            self.abort()
            text, cls = _with_peer_failures(self, exc, _in_comm_ranks(self, exc.detail))
            raise cls(text, op=exc.op, rank=exc.rank) from exc

    return op


for _name in sorted(ALL_OPS):
    setattr(HeteroAdapter, _name, _fail_fast(getattr(HeteroAdapter, _name)))
