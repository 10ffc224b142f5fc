"""Shm adapter: flagcx's own shared-memory transport for the CPU tensors of ranks on one host.

The transport is C (``csrc/``, built as ``flagcx._shm`` by cffi at install). Rank 0
creates one POSIX shm segment per communicator (built unnamed, then named at random with
mode 0600 once its header is complete) and shares the name through the adapter's store;
the segment is unlinked as soon as every
rank has attached, so a crash leaves nothing in /dev/shm (if rank 0 and every rank still
to attach all die during init, the next communicator's rank 0 on the host removes the
orphan: ``fxs_sweep``). Each collective is a single
C call (the GIL is released) that returns when this rank's part is done; waits spin,
yield and then sleep on a futex, watch the peers' pids, and fail with FlagcxTimeout or
RemoteError naming the late or dead rank. send/recv complete in the caller's thread when
they can (at post, or while it waits); a progress thread in C advances what nobody waits on. Large copies and reductions of a collective (256 KiB and
up per step) are split over FLAGCX_SHM_THREADS threads per rank (default: the rank's
share of 3/4 of the cpus it may run on, at most 8; staging grows to 4 MiB per rank then), since
one core's memory bandwidth is a fraction of a many-core host's. From FLAGCX_SHM_SINGLE_COPY
bytes per message or block (default 64 KiB), send/recv and alltoall (allgather from
256 KiB at least) read the data straight out of the peer's memory (process_vm_readv: one copy
instead of two through the segment), where every rank may (probed at init; else the
segment carries everything). gather and scatter also take the root's blocks as a tensor
list, each at its own address (torch's list forms without a staging copy).
After a transport error the adapter only raises; ``close`` still works.
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Optional

import torch

from .. import config
from ..bootstrap import store_allgather, store_broadcast
from ..errors import BuildError, Cause, CommAborted, FlagcxError, FlagcxTimeout, InvalidArgument, RemoteError
from ..topology.detect import usable_cpus
from ..types import REDUCE_DTYPES, ReduceOp
from .base import DONE, Adapter, AdapterContext, Capabilities, Handle

try:
    from .. import _shm  # type: ignore[attr-defined]  # the compiled module (cffi)
except ImportError as _exc:  # not compiled at install time (no C compiler / Python headers)
    _shm = None
    _IMPORT_ERROR: Optional[BaseException] = _exc
else:
    _IMPORT_ERROR = None

log = logging.getLogger("flagcx.shm")

SEGMENT_PREFIX = "flagcx-"
"""Name prefix of the segments in /dev/shm (followed by 32 random hex digits)."""


def default_threads(ranks: int) -> int:
    """This rank's share of three quarters of the cpus it may run on, at most config.MAX_SHM_THREADS (1 when ranks fill them).

    The quarter left over keeps spinning helpers from taking the cores that the ranks'
    own threads (and torch's, and the OS's) need: with every core busy, a preempted
    helper stalls its whole step (measured: 1-4 MiB calls ranged over 15x on 16 cores).
    """
    return max(1, min(config.MAX_SHM_THREADS, usable_cpus() * 3 // 4 // max(ranks, 1)))


if _shm is not None:
    _ffi, _lib = _shm.ffi, _shm.lib
    _DTYPES = {
        torch.float32: _lib.FXS_DT_F32,
        torch.float64: _lib.FXS_DT_F64,
        torch.float16: _lib.FXS_DT_F16,
        torch.bfloat16: _lib.FXS_DT_BF16,
        torch.int8: _lib.FXS_DT_I8,
        torch.uint8: _lib.FXS_DT_U8,
        torch.int32: _lib.FXS_DT_I32,
        torch.int64: _lib.FXS_DT_I64,
    }
    _OPS = {
        ReduceOp.SUM: _lib.FXS_OP_SUM,
        ReduceOp.PROD: _lib.FXS_OP_PROD,
        ReduceOp.MAX: _lib.FXS_OP_MAX,
        ReduceOp.MIN: _lib.FXS_OP_MIN,
        ReduceOp.AVG: _lib.FXS_OP_AVG,
    }
    _ERRORS: dict[int, type[FlagcxError]] = {
        _lib.FXS_ETIMEOUT: FlagcxTimeout,
        _lib.FXS_EDEAD: RemoteError,
        _lib.FXS_EPEER: RemoteError,
        _lib.FXS_EINVAL: InvalidArgument,
    }
    _CAUSES: dict[int, Cause] = {
        _lib.FXS_ETIMEOUT: Cause.TIMEOUT,
        _lib.FXS_EDEAD: Cause.DIED,
        _lib.FXS_EPEER: Cause.PEER_LEFT,
        _lib.FXS_EINVAL: Cause.MISMATCH,
    }


def _text(ptr) -> str:
    return _ffi.string(ptr).decode("utf-8", "replace")


class ShmHandle(Handle):
    """A posted send or recv: ``wait()`` moves its data (and any other posted op's) itself; the progress thread does it meanwhile."""

    __slots__ = ("_op", "_adapter", "_tensor", "_is_recv", "_peer", "_finished", "__weakref__")

    def __init__(self, op, adapter: ShmAdapter, tensor: torch.Tensor, is_recv: int, peer: Optional[int]) -> None:
        self._op = op
        self._adapter = adapter
        self._tensor: Optional[torch.Tensor] = tensor  # kept alive while C may still touch it
        self._is_recv = is_recv
        self._peer = peer
        self._finished = False

    @property
    def what(self) -> str:
        """The op, as errors name it ("send to rank 1", "recv from any source")."""
        return self._adapter._p2p_what(self._is_recv, self._peer)

    def wait(self, timeout: Optional[float] = None) -> None:
        if self._finished:
            return
        limit = self._adapter.ctx.timeout if timeout is None else float(timeout)
        rc = _lib.fxs_op_wait(self._op, limit)
        if rc == _lib.FXS_OK:
            self._finished = True
            self._tensor = None
            return
        if rc == _lib.FXS_ETIMEOUT:
            moved = _lib.fxs_op_progress(self._op)
            raise FlagcxTimeout(
                f"{self.what} on {self._adapter.ctx.where} did not finish within {limit:g} s "
                f"({moved} of {self._tensor.nbytes if self._tensor is not None else 0} bytes moved); the peer is alive but has not posted "
                "the matching call (or is blocked elsewhere)",
                rank=self._adapter.rank,
            )
        raise self._adapter._op_error(rc, self._op, self.what)

    def done(self) -> bool:
        """Never blocks; moves whatever data is there first, so that a caller polling ``is_completed()`` makes progress."""
        return self._finished or _lib.fxs_op_poll(self._op) != _lib.FXS_EPENDING

    def source(self) -> int:
        return int(_lib.fxs_op_source(self._op))


class ShmAdapter(Adapter):
    """Collectives and send/recv through POSIX shared memory (ranks on one host)."""

    name = "shm"
    capabilities = Capabilities(
        devices=frozenset({"cpu"}),
        reduce_dtypes=REDUCE_DTYPES,
        reduce_ops=frozenset({ReduceOp.SUM, ReduceOp.PROD, ReduceOp.MAX, ReduceOp.MIN, ReduceOp.AVG}),
        any_source=True,
        typed_moves=True,
        alltoall_in_place=True,
        block_lists=True,
    )

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        if device.type != "cpu":
            return f"the shm transport moves CPU tensors only, not {device.type} tensors"
        if _shm is None:
            return (
                f"flagcx._shm was not built: {_IMPORT_ERROR} (install a C compiler and the Python "
                "headers, e.g. apt-get install gcc python3-dev, then reinstall flagcx)"
            )
        if not sys.platform.startswith("linux"):
            return f"the shm transport needs Linux (POSIX shm and futexes), not {sys.platform}"
        return None

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        reason = self.unavailable_reason(ctx.device)
        if reason is not None:
            raise BuildError(reason, op="init", rank=ctx.rank)
        cfg = config.get()
        threads = cfg.shm_threads or default_threads(ctx.size)
        slot = cfg.shm_buffer or (config.THREADED_SHM_BUFFER if threads > 1 else config.DEFAULT_SHM_BUFFER)
        ring = cfg.shm_p2p_buffer or max(16 << 10, min(config.DEFAULT_SHM_P2P_BUFFER, config.SHM_P2P_BUDGET // max(1, ctx.size - 1)))
        what = f"creating the shm transport of {ctx.where}"
        self._c = None
        self._inflight: list[ShmHandle] = []  # keeps tensors alive while the progress thread may use them
        self._sweep_at = 64
        self._blocks = _ffi.new("uint64_t[]", ctx.size)
        self.segment_name = self._open(ctx, slot, ring, what)
        c = self._c
        self.segment_mode = int(_lib.fxs_segment_mode(c))
        self.segment_bytes = int(_lib.fxs_segment_bytes(c))
        self.staging_bytes = int(_lib.fxs_slot_bytes(c))
        self.small_bytes = int(_lib.fxs_small_bytes(c))
        self.ring_bytes = int(_lib.fxs_ring_bytes(c))
        self.threads = int(_lib.fxs_set_threads(c, threads))
        self.single_copy = self._agree_single_copy(ctx, cfg.shm_single_copy, what)
        self._finalizer = weakref.finalize(self, _lib.fxs_close, c, 0)
        self._allreduce = _lib.fxs_allreduce

    def _open(self, ctx: AdapterContext, slot: int, ring: int, what: str) -> str:
        err = _ffi.new("char[]", 512)
        out = _ffi.new("fxs_comm **")
        name = None
        status = b"ok"
        if ctx.rank == 0:
            swept = _lib.fxs_sweep(SEGMENT_PREFIX.encode())
            if swept:
                log.info("%s: removed %d segment(s) left in /dev/shm by jobs whose ranks all died during init", ctx.label, swept)
            name = f"/{SEGMENT_PREFIX}{os.urandom(16).hex()}"
            rc = _lib.fxs_create(name.encode(), 0, ctx.size, slot, ring, ctx.timeout, out, err, len(err))
            if rc:
                status = b"!" + _ffi.string(err)
            store_broadcast(ctx.store, "shm/name", 0, 0, name.encode() if not rc else status, ctx.timeout, what)
        else:
            value = store_broadcast(ctx.store, "shm/name", ctx.rank, 0, None, ctx.timeout, what)
            if value.startswith(b"!"):
                status = b"!rank 0 could not create the segment: " + value[1:]
            else:
                name = value.decode()
                rc = _lib.fxs_attach(value, ctx.rank, ctx.size, ctx.timeout, out, err, len(err))
                if rc:
                    status = b"!" + _ffi.string(err)
        try:
            statuses = store_allgather(ctx.store, "shm/attached", ctx.rank, ctx.size, status, ctx.timeout, what)
        except BaseException:
            self._discard(out[0], name)
            raise
        if name is not None:
            _lib.fxs_unlink(name.encode())  # normally gone already: the last rank to attach unlinks
        bad = [(r, s[1:].decode("utf-8", "replace")) for r, s in enumerate(statuses) if s.startswith(b"!")]
        if bad:
            self._discard(out[0], None)
            detail = "; ".join(f"{ctx.peer_name(r)}: {msg}" for r, msg in bad)
            raise FlagcxError(f"{what} failed: {detail}", op="init", rank=ctx.rank)
        self._c = out[0]
        assert name is not None
        return name

    def _agree_single_copy(self, ctx: AdapterContext, wanted: int, what: str) -> int:
        """The single-copy threshold every rank uses: ``wanted`` where every rank can read every other's memory, else 0 (off)."""
        if not wanted or ctx.size == 1:
            return int(_lib.fxs_set_cma(self._c, 0))
        mine = b"1" if _lib.fxs_cma_probe(self._c) else b"0"
        verdicts = store_allgather(ctx.store, "shm/single_copy", ctx.rank, ctx.size, mine, ctx.timeout, what)
        if b"0" in verdicts:
            log.info(
                "%s: single copy off (rank(s) %s cannot read their peers' memory: ptrace scope or seccomp)",
                ctx.label,
                [r for r, v in enumerate(verdicts) if v == b"0"],
            )
            wanted = 0
        return int(_lib.fxs_set_cma(self._c, wanted))

    @staticmethod
    def _discard(c, name: Optional[str]) -> None:
        if c != _ffi.NULL:
            _lib.fxs_close(c, 1)
        if name is not None:
            _lib.fxs_unlink(name.encode())

    # ------------------------------------------------------------------ errors
    def _comm(self, op: str):
        c = self._c
        if c is None:
            raise CommAborted(f"the shm transport of {self.ctx.where} is closed", op=op, rank=self.rank)
        return c

    def _mapping_note(self, ranks: list[int]) -> str:
        g = self.ctx.global_ranks
        notes = [f"rank {r} is global rank {g[r]}" for r in ranks if g and 0 <= r < len(g) and g[r] != r]
        return f" ({'; '.join(notes)})" if notes else ""

    def _error(self, rc: int, op: str) -> FlagcxError:
        c = self._c
        text = _text(_lib.fxs_error(c))
        ranks = _ffi.new("int[]", 8)
        k = _lib.fxs_error_ranks(c, ranks, 8)
        peers = [ranks[i] for i in range(k)]
        note = self._mapping_note(peers)
        code = int(_lib.fxs_broken(c)) if rc == _lib.FXS_EBROKEN else rc
        cls = _ERRORS.get(code, FlagcxError)
        return cls(f"{self.ctx.where}: {text}{note}", op=op, rank=self.rank, peers=peers, cause=_CAUSES.get(code), comm=self.ctx.label)

    def _op_error(self, rc: int, op, what: str) -> FlagcxError:
        peer = int(_lib.fxs_op_error_peer(op))
        note = self._mapping_note([peer]) if peer >= 0 else ""
        cls = CommAborted if rc == _lib.FXS_EBROKEN else _ERRORS.get(rc, FlagcxError)
        return cls(
            f"{what} on {self.ctx.where}: {_text(_lib.fxs_op_error(op))}{note}",
            rank=self.rank,
            peers=[peer] if peer >= 0 else [],
            cause=_CAUSES.get(rc),
            comm=self.ctx.label,
        )

    # ------------------------------------------------------------------ collectives
    def allreduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        c = self._c
        if c is None:
            self._comm("all_reduce")
        rc = self._allreduce(c, send.data_ptr(), recv.data_ptr(), send.numel(), _DTYPES[send.dtype], _OPS[op])
        if rc:
            raise self._error(rc, "all_reduce")
        return DONE

    def _call(self, op: str, fn: Callable[..., int], *args: object) -> Handle:
        """Run C collective ``fn(comm, *args)`` (it completes before returning); raise its error as a FlagcxError."""
        rc = fn(self._comm(op), *args)
        if rc:
            raise self._error(rc, op)
        return DONE

    def reduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, root: int) -> Handle:
        return self._call("reduce", _lib.fxs_reduce, send.data_ptr(), recv.data_ptr(), send.numel(), _DTYPES[send.dtype], _OPS[op], root)

    def reducescatter(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        return self._call("reduce_scatter", _lib.fxs_reducescatter, send.data_ptr(), recv.data_ptr(), recv.numel(), _DTYPES[send.dtype], _OPS[op])

    def allgather(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        return self._call("all_gather", _lib.fxs_allgather, send.data_ptr(), recv.data_ptr(), send.nbytes)

    def broadcast(self, tensor: torch.Tensor, root: int) -> Handle:
        return self._call("broadcast", _lib.fxs_broadcast, tensor.data_ptr(), tensor.nbytes, root)

    def gather(self, send: torch.Tensor, recv: Optional[torch.Tensor], root: int) -> Handle:
        return self._call("gather", _lib.fxs_gather, send.data_ptr(), recv.data_ptr() if recv is not None else 0, send.nbytes, root)

    def scatter(self, send: Optional[torch.Tensor], recv: torch.Tensor, root: int) -> Handle:
        return self._call("scatter", _lib.fxs_scatter, send.data_ptr() if send is not None else 0, recv.data_ptr(), recv.nbytes, root)

    def gather_list(self, send: torch.Tensor, recvs: Optional[Sequence[torch.Tensor]], root: int) -> Handle:
        blocks = self._addresses(recvs) if recvs is not None else _ffi.NULL
        return self._call("gather", _lib.fxs_gather_list, send.data_ptr(), blocks, send.nbytes, root)

    def scatter_list(self, sends: Optional[Sequence[torch.Tensor]], recv: torch.Tensor, root: int) -> Handle:
        blocks = self._addresses(sends) if sends is not None else _ffi.NULL
        return self._call("scatter", _lib.fxs_scatter_list, blocks, recv.data_ptr(), recv.nbytes, root)

    def _addresses(self, tensors: Sequence[torch.Tensor]):
        """The tensors' addresses in this adapter's one uint64_t array (calls on a communicator run one at a time)."""
        blocks = self._blocks
        for i, t in enumerate(tensors):
            blocks[i] = t.data_ptr()
        return blocks

    def alltoall(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        return self._call("all_to_all", _lib.fxs_alltoall, send.data_ptr(), recv.data_ptr(), send.nbytes // self.size)

    def alltoallv(self, send: torch.Tensor, send_counts: list[int], recv: torch.Tensor, recv_counts: list[int]) -> Handle:
        sends = _ffi.new("uint64_t[]", [int(x) for x in send_counts])
        recvs = _ffi.new("uint64_t[]", [int(x) for x in recv_counts])
        return self._call("all_to_all", _lib.fxs_alltoallv, send.data_ptr(), sends, recv.data_ptr(), recvs)

    def barrier(self) -> Handle:
        return self._call("barrier", _lib.fxs_barrier)

    # ------------------------------------------------------------------ point to point
    def _post(self, is_recv: int, tensor: torch.Tensor, peer: Optional[int], waits: int = 0) -> ShmHandle:
        c = self._c
        if c is None:
            self._comm("recv" if is_recv else "send")
        if len(self._inflight) >= self._sweep_at:  # amortised: drop finished ops
            self._inflight = [h for h in self._inflight if not h._finished and _lib.fxs_op_test(h._op) == _lib.FXS_EPENDING]
            self._sweep_at = max(64, 2 * len(self._inflight))
        rc = _ffi.new("int *")
        op = _lib.fxs_post(c, is_recv, -1 if peer is None else peer, tensor.data_ptr(), tensor.nbytes, waits, rc)
        if op == _ffi.NULL:
            raise self._error(rc[0], self._p2p_what(is_recv, peer))
        handle = ShmHandle(_ffi.gc(op, _lib.fxs_op_release), self, tensor, is_recv, peer)
        self._inflight.append(handle)
        return handle

    def _p2p_what(self, is_recv: int, peer: Optional[int]) -> str:
        if not is_recv:
            return f"send to {self.ctx.peer_name(peer)}"  # type: ignore[arg-type]
        return "recv from any source" if peer is None else f"recv from {self.ctx.peer_name(peer)}"

    def send(self, tensor: torch.Tensor, peer: int) -> Handle:
        return self._post(0, tensor, peer)

    def recv(self, tensor: torch.Tensor, peer: Optional[int]) -> Handle:
        return self._post(1, tensor, peer)

    def send_wait(self, tensor: torch.Tensor, peer: int) -> None:
        self._post(0, tensor, peer, waits=1).wait()

    def recv_wait(self, tensor: torch.Tensor, peer: Optional[int]) -> int:
        handle = self._post(1, tensor, peer, waits=1)
        handle.wait()
        return peer if peer is not None else handle.source()

    # ------------------------------------------------------------------ lifetime
    def _shut(self, abort: int) -> None:
        c, self._c = self._c, None
        if c is None:
            return
        self._finalizer.detach()
        _lib.fxs_close(c, abort)  # joins the progress thread: no C access to tensors after this
        self._inflight = []

    def abort(self) -> None:
        self._shut(1)

    def close(self) -> None:
        self._shut(0)
