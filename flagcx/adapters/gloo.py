"""Gloo adapter: torch's ProcessGroupGloo (a C++ c10d Backend) built from the store.

Used for CPU tensors when ranks span hosts (TCP), and whenever forced with
FLAGCX_CPU_ADAPTER=gloo. Ops run on Gloo's own threads; the handle waits on the Gloo
Work and turns its errors into FlagcxError. After any failed op the adapter refuses
further calls (Gloo's pairs may be out of step: a later op could match the wrong
peer's data), and a failed collective names its missing peers through a roll call in
the store (:class:`flagcx.bootstrap.PeerReport`); only a caller's wait shorter than the
timeout that expires on a collective still running is not a failure (wait again).
``close`` and ``abort`` drop the ProcessGroupGloo, whose destructor joins Gloo's
threads and closes its sockets.

Interface: FLAGCX_SOCKET_IFNAME picks the one Gloo binds to; else GLOO_SOCKET_IFNAME
(torch's own variable) or the address the hostname resolves to; when that is loopback
or nothing (Debian's ``127.0.1.1 host`` line, a container without DNS), the address of
the route to the store's host, so that ranks on other hosts can connect.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroupGloo

from ..bootstrap import PeerReport, hostname_address, route_address, select_interface
from ..config import get as get_config
from ..errors import Cause, CommAborted, FlagcxError, FlagcxTimeout, InvalidArgument, RemoteError
from .base import AdapterContext, Capabilities, Handle
from .torch_pg import TorchPGAdapter, make_gloo, traits_of

log = logging.getLogger("flagcx.gloo")


def _gloo_cause(exc: BaseException) -> Optional[Cause]:
    """What a torch/Gloo error means (its text is all Gloo gives)."""
    lowered = str(exc).lower()
    if "timed out" in lowered or "timeout" in lowered:
        return Cause.TIMEOUT
    if "connection" in lowered or "closed" in lowered or "reset by peer" in lowered:
        return Cause.DISCONNECTED
    return None


def translate_error(
    exc: BaseException, what: str, timeout: float, rank: Optional[int] = None, peers: str = "", blamed: tuple[int, ...] = (), comm: Optional[str] = None
) -> FlagcxError:
    """Map a torch/Gloo error to the flagcx hierarchy (FlagcxTimeout, RemoteError for a lost peer); ``peers`` names the missing ones, ``blamed`` lists them."""
    text = str(exc).strip()
    note = f"; {peers}" if peers else ""
    cause = _gloo_cause(exc)
    if cause is Cause.TIMEOUT:
        return FlagcxTimeout(f"{what}: a peer did not arrive within {timeout:g} s ({text}){note}", rank=rank, peers=blamed, cause=cause, comm=comm)
    if cause is Cause.DISCONNECTED:
        return RemoteError(f"{what}: a peer disconnected ({text}){note}", rank=rank, peers=blamed, cause=cause, comm=comm)
    return FlagcxError(f"{what}: {text}{note}", rank=rank, peers=blamed, comm=comm)


def _store_host(store) -> Optional[str]:
    """Host of the TCPStore under ``store``'s prefixes (None for other stores)."""
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store.host if isinstance(store, dist.TCPStore) else None


def gloo_device(ctx: AdapterContext) -> Optional[ProcessGroupGloo.Device]:
    """The Gloo device (interface) to bind, or None for torch's default (see the module docstring)."""
    spec = get_config().socket_ifname
    if spec:
        name, addr = select_interface(spec, op=f"creating the Gloo transport of {ctx.where}", rank=ctx.rank)
        log.info("%s: rank %d binds Gloo to %s (%s) from FLAGCX_SOCKET_IFNAME", ctx.label, ctx.rank, name, addr)
        return ProcessGroupGloo.create_device(interface=name)
    if os.environ.get("GLOO_SOCKET_IFNAME") or hostname_address() is not None:
        return None
    host = _store_host(ctx.store)
    addr = route_address(host) if host else None
    if addr is None or addr.startswith("127."):
        return None
    log.info("%s: rank %d binds Gloo to %s, its route to the store at %s (the hostname gives no routable address)", ctx.label, ctx.rank, addr, host)
    return ProcessGroupGloo.create_device(hostname=addr)


class GlooHandle(Handle):
    """A Gloo Work; a failed wait is its adapter's failure (see GlooAdapter._failure)."""

    __slots__ = ("_work", "_what", "_timeout", "_finished", "_adapter", "_collective", "_error")

    def __init__(self, work: dist.Work, what: str, adapter: GlooAdapter, collective: bool) -> None:
        self._work = work
        self._what = what
        self._timeout = adapter.ctx.timeout
        self._finished = False
        self._adapter = adapter
        self._collective = collective
        self._error: Optional[FlagcxError] = None

    def wait(self, timeout: Optional[float] = None) -> None:
        if self._finished:
            return
        if self._error is not None:
            raise self._error
        limit = self._timeout if timeout is None else timeout
        try:
            self._work.wait(timedelta(seconds=limit))
        except Exception as exc:  # Gloo raises RuntimeError / DistBackendError
            if timeout is not None and timeout < self._timeout and not self._work.is_completed():
                # only the caller's shorter wait expired: the op goes on and may be waited for again
                raise translate_error(exc, self._what, limit, self._adapter.rank) from exc
            self._work = None  # the Work holds Gloo's connections open: release them before the roll call
            self._error = self._adapter._failure(exc, self._what, limit, self._collective)
            raise self._error from exc
        self._finished = True

    def done(self) -> bool:
        return self._finished or self._work is None or self._work.is_completed()

    def source(self) -> int:
        return int(self._work._source_rank())


class GlooAdapter(TorchPGAdapter):
    """Collectives over TCP through ProcessGroupGloo: the torch_pg adapter bound to "gloo", plus what Gloo needs.

    Overrides only what differs: the interface it binds (:func:`gloo_device`), and what a
    failure does (the adapter refuses every later call, drops its backend at once, and a
    failed collective names its missing peers through a roll call in the store).
    """

    name = "gloo"
    backend = "gloo"
    capabilities = Capabilities(  # what selection checks before creating it; an instance derives the same from the traits
        devices=frozenset({"cpu"}),
        reduce_dtypes=traits_of("gloo").reduce_dtypes,
        reduce_ops=traits_of("gloo").reduce_ops,
        any_source=traits_of("gloo").any_source,
    )

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        return None if dist.is_gloo_available() else "this torch build has no Gloo; use another CPU adapter (FLAGCX_CPU_ADAPTER=shm)"

    def __init__(self, ctx: AdapterContext) -> None:
        self._broken: Optional[str] = None
        self._peers = PeerReport(ctx.store, ctx.rank, ctx.size, ctx.timeout, ctx.peer_name)
        super().__init__(ctx)

    def _create(self) -> Any:
        ctx = self.ctx
        try:
            return make_gloo(ctx, gloo_device(ctx))
        except InvalidArgument:
            raise
        except Exception as exc:
            report = self._peers.explain()
            raise translate_error(exc, f"creating the Gloo transport of {ctx.where}", ctx.timeout, ctx.rank, report, self._peers.blamed, ctx.label) from exc

    def _call(self, op: str, method: str, *args: Any) -> Any:
        """Start an op on the backend; CommAborted once an op failed or the adapter was closed; failing to start (a peer gone) is the op's failure."""
        pg = self._pg
        if pg is None or self._broken is not None:
            raise CommAborted(self._broken or f"the Gloo transport of {self.ctx.where} is closed; create a new communicator", rank=self.rank)
        try:
            return getattr(pg, method)(*args)
        except Exception as exc:
            raise self._failure(exc, f"{op} on {self.ctx.where}", self.ctx.timeout, not op.startswith(("send", "recv"))) from exc

    def _post(self, op: str, work: Any) -> Handle:
        return GlooHandle(work, f"{op} on {self.ctx.where}", self, not op.startswith(("send", "recv")))

    def _failure(self, exc: BaseException, what: str, limit: float, collective: bool) -> FlagcxError:
        """The FlagcxError for a failed op (naming the missing peers of a collective).

        The adapter is unusable afterwards and drops its backend at once: its sockets
        close, so peers blocked on this rank fail now instead of at their timeout.
        """
        if self._broken is None:
            self._broken = f"the Gloo transport of {self.ctx.where} is unusable after '{what}' failed; abort this communicator and create a new one"
            self.abort()
        if not collective:
            return translate_error(exc, what, limit, self.rank, comm=self.ctx.label)
        report = self._peers.explain("timed out" if _gloo_cause(exc) is Cause.TIMEOUT else "failed")
        return translate_error(exc, what, limit, self.rank, report, self._peers.blamed, self.ctx.label)

    def abort(self) -> None:
        pg, self._pg = self._pg, None
        if pg is not None:
            try:
                pg.abort()
            except Exception:  # already broken: dropping it below releases what is left
                pass

    def close(self) -> None:
        pg, self._pg = self._pg, None
        if pg is not None:
            try:
                pg.shutdown()
            except Exception:
                pass
