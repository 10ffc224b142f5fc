"""Adapter classes that break the plugin contract in one way each (tests/test_plugins.py expects each refused)."""

from __future__ import annotations

from typing import Optional

import torch

from flagcx import NotSupported, ReduceOp
from flagcx.adapters import Adapter, Capabilities, Handle

CAPS = Capabilities(devices=frozenset({"cpu"}), reduce_dtypes=frozenset({torch.float32}), reduce_ops=frozenset({ReduceOp.SUM}))


class _Refusing(Adapter):
    """Implements every op by refusing it; the cases below differ only in their declarations."""

    def _no(self, op: str) -> Handle:
        raise NotSupported(f"{op}: this class only tests plugin validation", op=op, rank=self.rank)

    def allreduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        return self._no("allreduce")

    def allgather(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        return self._no("allgather")

    def reducescatter(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        return self._no("reducescatter")

    def broadcast(self, tensor: torch.Tensor, root: int) -> Handle:
        return self._no("broadcast")

    def reduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp, root: int) -> Handle:
        return self._no("reduce")

    def gather(self, send: torch.Tensor, recv: Optional[torch.Tensor], root: int) -> Handle:
        return self._no("gather")

    def scatter(self, send: Optional[torch.Tensor], recv: torch.Tensor, root: int) -> Handle:
        return self._no("scatter")

    def alltoall(self, send: torch.Tensor, recv: torch.Tensor) -> Handle:
        return self._no("alltoall")

    def alltoallv(self, send: torch.Tensor, send_counts: list[int], recv: torch.Tensor, recv_counts: list[int]) -> Handle:
        return self._no("alltoallv")

    def send(self, tensor: torch.Tensor, peer: int) -> Handle:
        return self._no("send")

    def recv(self, tensor: torch.Tensor, peer: Optional[int]) -> Handle:
        return self._no("recv")

    def barrier(self) -> Handle:
        return self._no("barrier")


class NotAnAdapter:
    name = "notanadapter"
    api_version = 1


class NoVersion(_Refusing):
    name = "noversion"
    capabilities = CAPS


class WrongVersion(_Refusing):
    name = "wrongversion"
    api_version = 2
    capabilities = CAPS


class NoName(_Refusing):
    api_version = 1
    capabilities = CAPS


class BuiltinName(_Refusing):
    name = "gloo"
    api_version = 1
    capabilities = CAPS


class NoCapabilities(_Refusing):
    name = "nocapabilities"
    api_version = 1


class UnknownOps(_Refusing):
    name = "unknownops"
    api_version = 1
    capabilities = Capabilities(
        devices=frozenset({"cpu"}), reduce_dtypes=CAPS.reduce_dtypes, reduce_ops=CAPS.reduce_ops, ops=frozenset({"allreduce", "teleport"})
    )


class PremulWithoutFactor(_Refusing):
    name = "premulwithoutfactor"
    api_version = 1
    capabilities = Capabilities(devices=frozenset({"cpu"}), reduce_dtypes=CAPS.reduce_dtypes, reduce_ops=frozenset({ReduceOp.SUM, ReduceOp.PREMUL_SUM}))


class HalfDone(Adapter):
    """Implements allreduce only: the other contract methods stay abstract."""

    name = "halfdone"
    api_version = 1
    capabilities = CAPS

    def allreduce(self, send: torch.Tensor, recv: torch.Tensor, op: ReduceOp) -> Handle:
        raise NotSupported("this class only tests plugin validation", op="allreduce")
