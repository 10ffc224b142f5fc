"""Which adapter carries which tensors: the one place that decides, creates and splits them.

The rules, first match wins (the README's "Which adapter carries my tensors" table):

- CPU tensors: ``FLAGCX_VENDOR_BACKEND=cpu:<backend>`` gives ``torch_pg:<backend>``;
  else ``FLAGCX_CPU_ADAPTER`` (a builtin in :data:`CPU_ADAPTERS` or a plugin name);
  ``auto`` (the default) is ``shm`` when every rank shares one host and the compiled
  transport loads, else ``gloo``. Every rank must ask for the same.
- tensors of an accelerator type (cuda, npu, ...): FLAGCX_VENDOR_BACKEND's c10d backend
  for it (``torch_pg:<backend>``); else FLAGCX_DEVICE_ADAPTER's adapter for it; else
  :data:`DEVICE_ADAPTERS`; else torch's default c10d backend of the device type (the one
  the vendor's torch extension registered, e.g. hccl for npu) through ``torch_pg``.
  The ranks compare their choices before creating it, so all raise on a mismatch.

A communicator whose ranks form several clusters uses the heterogeneous runner
(:mod:`flagcx.hetero`), which builds :class:`AdapterSet` s for its lanes; everything
else uses one :class:`AdapterSet`. Names of builtin adapters live in
:data:`flagcx.adapters.BUILTIN`; :func:`create` checks a class's declared devices and
availability once, for every route.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Optional, Union

import torch
import torch.distributed as dist

from .. import config
from ..adapters import Adapter, AdapterContext, adapter_class
from ..adapters.streams import current_device_index
from ..adapters.torch_pg import default_backend, vendor_backend
from ..bootstrap import agree, require_same, store_allgather
from ..config import CPU_ADAPTERS
from ..errors import NotSupported, invalid
from ..topology.detect import PeerRecord, local_record

log = logging.getLogger("flagcx.core")

DEVICE_ADAPTERS = {"cuda": "nccl"}
"""Builtin native adapter per accelerator device type (third rule for device tensors)."""

_CPU = torch.device("cpu")


def exchange_records(store: dist.Store, rank: int, size: int, timeout: float, what: str) -> list[PeerRecord]:
    """Every rank's topology record and requested CPU adapter, in rank order (one store exchange)."""
    mine = PeerRecord(local_record(), config.get().cpu_adapter)
    raw = store_allgather(store, "records", rank, size, json.dumps(mine.to_json()).encode(), timeout, what)
    return [PeerRecord.from_json(json.loads(r)) for r in raw]


def resolve_cpu(records: Sequence[PeerRecord], rank: int, override: Optional[str] = None) -> str:
    """The CPU adapter name for ranks with ``records`` (``override``: a caller's choice instead of the records')."""
    wanted = [override] * len(records) if override else [r.cpu_adapter for r in records]
    choice = require_same(
        wanted,
        rank,
        "FLAGCX_CPU_ADAPTER",
        "set the same value on every rank (torch_pg:<backend> comes from FLAGCX_VENDOR_BACKEND=cpu:<backend>, which wins over FLAGCX_CPU_ADAPTER)",
    )
    if choice != "auto":
        return choice
    if len({r.topo.host for r in records}) == 1:
        reason = adapter_class("shm").unavailable_reason(_CPU)
        if reason is None:
            return "shm"
        log.warning("all ranks share a host but the shm transport is unavailable (%s); using gloo", reason)
    return "gloo"


def resolve_device(kind: str, home_device_type: str) -> Optional[str]:
    """This rank's adapter name for ``kind`` tensors (the rules above); None when there is none."""
    backend = vendor_backend(kind, home_device_type)
    if backend:
        return f"torch_pg:{backend}"
    name = dict(config.get().device_adapters).get(kind) or DEVICE_ADAPTERS.get(kind)
    if name is not None:
        return name
    fallback = default_backend(kind)
    return f"torch_pg:{fallback}" if fallback else None


def create(name: str, ctx: AdapterContext, op: str) -> Adapter:
    """Adapter ``name`` over ``ctx``, after checking that it moves ``ctx.device``'s tensors and can run here."""
    cls = adapter_class(name)
    device = ctx.device
    caps = getattr(cls, "capabilities", None)
    where = "FLAGCX_CPU_ADAPTER to a CPU transport" if device.type == "cpu" else "FLAGCX_DEVICE_ADAPTER"
    if caps is not None and device.type not in caps.devices:
        raise NotSupported(f"adapter {name} moves {', '.join(sorted(caps.devices))} tensors, not {device.type} ones; set {where}", op=op, rank=ctx.rank)
    reason = cls.unavailable_reason(device)
    if reason is not None:
        raise NotSupported(f"adapter {name} cannot run on {device}: {reason}", op=op, rank=ctx.rank)
    adapter = cls(ctx)
    log.info("%s: rank %d/%d uses adapter %s for %s tensors", ctx.label, ctx.rank, ctx.size, name, device)
    return adapter


class AdapterSet(Mapping[str, Adapter]):
    """The adapters of one group of ranks, by device type: the CPU one from the start, the others on first use.

    A read-only mapping of the adapters created so far (``"cuda" in s``, ``s["cpu"]``).
    """

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        size: int,
        records: Sequence[PeerRecord],
        *,
        name: str,
        timeout: float,
        global_ranks: Sequence[int],
        cpu_adapter: Optional[str] = None,
        device_adapters: Optional[Mapping[str, Adapter]] = None,
        title: str = "",
    ) -> None:
        self.store = store
        self.rank = rank
        self.size = size
        self.records = list(records)
        self.name = name
        self.timeout = timeout
        self.global_ranks = list(global_ranks)
        self.title = title
        """The group as its user knows it (:attr:`AdapterContext.title`)."""
        self._seq = 0
        self._adapters: dict[str, Adapter] = {}
        self._adapters["cpu"] = create(resolve_cpu(self.records, rank, cpu_adapter), self.context("cpu", _CPU), "init")
        self._adapters.update(device_adapters or {})

    # ------------------------------------------------------------------ mapping
    def __getitem__(self, kind: str) -> Adapter:
        return self._adapters[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._adapters)

    def __len__(self) -> int:
        return len(self._adapters)

    # ------------------------------------------------------------------ choosing
    def context(self, kind: str, device: torch.device) -> AdapterContext:
        """A context over a store prefix of its own (every rank creates its adapters in the same order)."""
        self._seq += 1
        return AdapterContext(
            store=dist.PrefixStore(f"{kind}/{self._seq}/", self.store),
            rank=self.rank,
            size=self.size,
            timeout=self.timeout,
            device=device,
            label=self.name,
            global_ranks=self.global_ranks,
            title=self.title,
        )

    def retitle(self, title: str) -> None:
        """Name the group ``title`` in the messages of every adapter, present and future."""
        self.title = title
        for adapter in self._adapters.values():
            adapter.ctx.title = title

    def adapter(self, device: torch.device, op: str) -> Adapter:
        """The adapter for ``device``'s tensors, created on first use (every rank reaches the same op)."""
        adapter = self._adapters.get(device.type)
        if adapter is None:
            return self._create_device(device, op)
        if device.index is not None and device.index != adapter.ctx.device.index:
            raise invalid(
                op,
                self.rank,
                "tensor",
                f"is on {device} but this communicator drives {adapter.ctx.device}",
                f"move the tensor to {adapter.ctx.device} (one device per rank and communicator)",
            )
        return adapter

    def adapter_name(self, device: Union[str, torch.device] = "cpu") -> str:
        """Name of the adapter that carries tensors of ``device``."""
        return self.adapter(torch.device(device), "adapter_name").name

    def _create_device(self, device: torch.device, op: str) -> Adapter:
        kind = device.type
        name = resolve_device(kind, self.records[self.rank].topo.device_type)
        if name is None:
            raise NotSupported(
                f"no adapter for {kind} tensors (builtin: cpu, {', '.join(DEVICE_ADAPTERS)}); set FLAGCX_VENDOR_BACKEND={kind}:<c10d backend> "
                f"(one the vendor's torch extension registers) or FLAGCX_DEVICE_ADAPTER={kind}:<adapter>",
                op=op,
                rank=self.rank,
            )
        self._seq += 1
        agree(
            self.store,
            f"choice-{kind}/{self._seq}",
            self.rank,
            self.size,
            name,
            self.timeout,
            f"the adapter for {kind} tensors",
            "set the same FLAGCX_VENDOR_BACKEND / FLAGCX_DEVICE_ADAPTER on every rank",
            op=op,
        )
        dev = device if device.index is not None else torch.device(kind, current_device_index(kind))
        adapter = self._adapters[kind] = create(name, self.context(name, dev), op)
        return adapter

    # ------------------------------------------------------------------ children
    def can_split(self, kind: str) -> bool:
        """Whether the adapter for ``kind`` splits without a new bootstrap (created or not yet)."""
        adapter = self._adapters.get(kind)
        if adapter is None:
            name = resolve_device(kind, self.records[self.rank].topo.device_type)
            return name is not None and callable(getattr(adapter_class(name), "split", None))
        return callable(getattr(adapter, "split", None))

    def splittable(self) -> list[str]:
        """Device types whose created adapter can split (ncclCommSplit and the like)."""
        return [t for t, a in self._adapters.items() if t != "cpu" and callable(getattr(a, "split", None))]

    def split_device(self, kind: str, ranks: Optional[Sequence[int]]) -> Optional[Adapter]:
        """Split the adapter of ``kind`` (every rank calls; ``ranks=None`` joins no child): the child for members, else None."""
        split = self._adapters[kind].split  # type: ignore[attr-defined]  # splittable() checked it has one
        return split(list(ranks) if ranks is not None else -1)

    # ------------------------------------------------------------------ lifetime
    def abort(self) -> None:
        """Abort every adapter without waiting for peers (failures are logged, never raised)."""
        for adapter in self._adapters.values():
            try:
                adapter.abort()
            except Exception:
                log.warning("%s: aborting adapter %s failed", self.name, adapter.name, exc_info=True)

    def close(self) -> None:
        """Close every adapter; the first failure is raised after all were tried."""
        first: Optional[BaseException] = None
        for adapter in self._adapters.values():
            try:
                adapter.close()
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first


__all__ = ["AdapterSet", "CPU_ADAPTERS", "DEVICE_ADAPTERS", "create", "exchange_records", "resolve_cpu", "resolve_device"]
