"""flagcx-relay-plugin: a third-party flagcx adapter, as a vendor would package one (used by tests/test_plugins.py).

``RelayAdapter`` (entry point ``relay``) relays every op of the adapter contract to a
Gloo transport built from its own context, so data really moves between processes. It
declares narrower capabilities than Gloo (no PROD, no 8/16-bit reductions, no
any-source receive), which the core must honour, declares PREMUL_SUM (it receives the
factor and scales itself), and counts the ops it relays.
``OldRelayAdapter`` (entry point ``relay_old``) claims an older contract version and
must be refused when selected. ``EnvRelayAdapter`` has no entry point: it is reached
through FLAGCX_ADAPTER_PLUGIN=flagcx_relay:EnvRelayAdapter, and declares no gather.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import ClassVar, Optional

import torch

from flagcx import ReduceOp
from flagcx.adapters import ALL_OPS, Adapter, AdapterContext, Capabilities, Handle
from flagcx.adapters.gloo import GlooAdapter


class RelayAdapter(Adapter):
    """Every op relayed to Gloo, counted in ``calls``."""

    name = "relay"
    api_version = 1
    capabilities = Capabilities(
        devices=frozenset({"cpu"}),
        reduce_dtypes=frozenset({torch.float32, torch.float64, torch.int32, torch.int64}),
        reduce_ops=frozenset({ReduceOp.SUM, ReduceOp.MAX, ReduceOp.MIN, ReduceOp.PREMUL_SUM}),
        any_source=False,
    )
    calls: ClassVar[Counter] = Counter()

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        self._gloo = GlooAdapter(ctx)

    def _count(self, op: str) -> GlooAdapter:
        self.calls[op] += 1
        return self._gloo

    def _premul(self, send: torch.Tensor, op: ReduceOp, factor: Optional[float]) -> tuple[torch.Tensor, ReduceOp]:
        if op is not ReduceOp.PREMUL_SUM:
            return send, op
        assert isinstance(factor, float), f"PREMUL_SUM without a float factor: {factor!r}"
        self.calls["premul_sum"] += 1
        return torch.mul(send, factor).to(send.dtype), ReduceOp.SUM

    def allreduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, factor: Optional[float] = None) -> Handle:
        send, op = self._premul(send, op, factor)
        return self._count("allreduce").allreduce(send, recv, op)

    def allgather(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        return self._count("allgather").allgather(send, recv)

    def reducescatter(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, factor: Optional[float] = None) -> Handle:
        send, op = self._premul(send, op, factor)
        return self._count("reducescatter").reducescatter(send, recv, op)

    def broadcast(self, tensor: torch.Tensor, root: int) -> Handle:
        return self._count("broadcast").broadcast(tensor, root)

    def reduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, root: int, factor: Optional[float] = None) -> Handle:
        send, op = self._premul(send, op, factor)
        return self._count("reduce").reduce(send, recv, op, root)

    def gather(self, send: torch.Tensor, recv: Optional[torch.Tensor], root: int) -> Handle:
        return self._count("gather").gather(send, recv, root)

    def scatter(self, send: Optional[torch.Tensor], recv: torch.Tensor, root: int) -> Handle:
        return self._count("scatter").scatter(send, recv, root)

    def alltoall(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        return self._count("alltoall").alltoall(send, recv)

    def alltoallv(self, send: torch.Tensor, send_counts: list[int], recv: torch.Tensor, recv_counts: list[int]) -> Handle:
        return self._count("alltoallv").alltoallv(send, send_counts, recv, recv_counts)

    def send(self, tensor: torch.Tensor, peer: int) -> Handle:
        return self._count("send").send(tensor, peer)

    def recv(self, tensor: torch.Tensor, peer: Optional[int]) -> Handle:
        return self._count("recv").recv(tensor, peer)

    def barrier(self) -> Handle:
        return self._count("barrier").barrier()

    def abort(self) -> None:
        self._gloo.abort()

    def close(self) -> None:
        self._gloo.close()


class OldRelayAdapter(RelayAdapter):
    """The same adapter claiming contract version 0: flagcx must refuse it."""

    name = "relay_old"
    api_version = 0


class EnvRelayAdapter(RelayAdapter):
    """Reached only through FLAGCX_ADAPTER_PLUGIN (no entry point); implements every op but gather."""

    name = "envrelay"
    capabilities = replace(RelayAdapter.capabilities, ops=ALL_OPS - {"gather"})
