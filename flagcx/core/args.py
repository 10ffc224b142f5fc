"""Argument checks and flat buffers: the first two steps of every Communicator op.

:class:`Args` checks what one rank can see of a call (types, layouts, devices, dtypes,
sizes, roots, peers, writable outputs) and raises :class:`~flagcx.errors.InvalidArgument`
or :class:`~flagcx.errors.NotSupported` naming the op, the argument and the fix. The
buffer helpers turn the rich call forms (tensor lists, non-contiguous tensors, split
sizes) into the flat contiguous buffers of the adapter contract, with the steps that
copy results back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

from ..errors import NotSupported, invalid
from ..tensors import flat, nbytes
from ..work import Step

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


class Args:
    """The checks of one rank in a group of ``size``."""

    __slots__ = ("rank", "size")

    def __init__(self, rank: int, size: int) -> None:
        self.rank = rank
        self.size = size

    def tensor(self, op: str, arg: str, t: object) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise invalid(op, self.rank, arg, f"expected a torch.Tensor, got {type(t).__name__}", "pass a tensor")
        if t.layout != torch.strided:
            raise NotSupported(f"argument '{arg}': {t.layout} tensors are not supported; pass a dense tensor", op=op, rank=self.rank)
        return t

    def writable(self, op: str, arg: str, t: torch.Tensor) -> None:
        """An output whose elements share memory (an ``expand``-ed view) cannot hold one result per element."""
        if isinstance(t, torch.Tensor) and t.layout is torch.strided and not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1:
            raise invalid(
                op,
                self.rank,
                arg,
                f"is a view whose elements share memory (shape {tuple(t.shape)}, strides {t.stride()}; e.g. from expand())",
                "pass a tensor with its own storage, e.g. t.clone() or torch.empty(shape)",
            )

    def like(self, op: str, arg: str, t: torch.Tensor, ref: torch.Tensor, numel: Optional[int] = None) -> None:
        if t.device != ref.device:
            raise invalid(op, self.rank, arg, f"is on {t.device} but the input is on {ref.device}", "put every tensor of one call on the same device")
        if t.dtype != ref.dtype:
            raise invalid(op, self.rank, arg, f"has dtype {t.dtype} but the input has {ref.dtype}", "use the same dtype for input and output")
        if numel is not None and t.numel() != numel:
            raise invalid(op, self.rank, arg, f"has {t.numel()} elements, expected {numel}", "size the tensor as the op requires")

    def out(self, op: str, out: Optional[torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
        """``out`` checked against ``tensor`` (same device, dtype and size), or ``tensor`` itself when None (in place)."""
        if out is None:
            return tensor
        self.tensor(op, "out", out)
        self.like(op, "out", out, tensor, tensor.numel())
        return out

    def root(self, op: str, arg: str, root: int) -> int:
        if not isinstance(root, int) or isinstance(root, bool) or not 0 <= root < self.size:
            raise invalid(op, self.rank, arg, f"{root!r} is not a rank of this group (size {self.size})", f"pass a group rank in [0, {self.size})")
        return root

    def peer(self, op: str, peer: int) -> None:
        self.root(op, "peer", peer)
        if peer == self.rank:
            raise invalid(op, self.rank, "peer", f"is this rank ({peer})", "send/recv to another rank, or copy the tensor locally")

    def tensors(self, op: str, arg: str, items: object, ref: torch.Tensor, numel: Optional[int] = None, writable: bool = False) -> list[torch.Tensor]:
        """A list of ``size`` tensors like ``ref``."""
        if not isinstance(items, (list, tuple)):
            raise invalid(op, self.rank, arg, f"expected a tensor or a list of {self.size} tensors, got {type(items).__name__}", "pass a list")
        if len(items) != self.size:
            raise invalid(op, self.rank, arg, f"has {len(items)} tensors but the group has {self.size} ranks", f"pass exactly {self.size} tensors")
        for i, t in enumerate(items):
            self.tensor(op, f"{arg}[{i}]", t)
            self.like(op, f"{arg}[{i}]", t, ref, numel)
            if writable:
                self.writable(op, f"{arg}[{i}]", t)
        return list(items)

    def blocks_out(self, op: str, out: TensorOrList, like: torch.Tensor, steps: list[Step]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Flat receive buffer for ``out`` (size * like.numel() elements, or a list of size blocks like ``like``) and the tensors it fills."""
        if isinstance(out, torch.Tensor):
            self.like(op, "out", out, like, like.numel() * self.size)
            self.writable(op, "out", out)
            return contig_out(out, steps), [out]
        outs = self.tensors(op, "out", out, like, like.numel(), writable=True)
        recv = torch.empty(like.numel() * self.size, dtype=like.dtype, device=like.device)
        steps.append(lambda: unpack(recv, outs))
        return recv, outs

    def blocks_in(self, op: str, tensor: TensorOrList, like: torch.Tensor) -> torch.Tensor:
        """Flat send buffer for ``tensor`` (size * like.numel() elements, or a list of size blocks like ``like``)."""
        if isinstance(tensor, torch.Tensor):
            self.like(op, "tensor", tensor, like, like.numel() * self.size)
            return contig_in(tensor)
        blocks = self.tensors(op, "tensor", tensor, like, like.numel())
        return torch.cat([flat(b) for b in blocks]) if like.numel() else like.new_empty(0)

    def split_bytes(self, op: str, arg: str, t: torch.Tensor, splits: Optional[Sequence[int]]) -> list[int]:
        """Bytes per rank of ``t`` cut along dim 0 by ``splits`` (rows per rank; None or empty: evenly)."""
        rows = t.shape[0] if t.dim() else 1
        row_bytes = (nbytes(t) // rows) if rows else 0
        if splits is None or len(splits) == 0:
            if rows % self.size:
                raise invalid(op, self.rank, arg, f"is empty but dim 0 ({rows}) is not divisible by {self.size}", "pass split sizes")
            return [rows // self.size * row_bytes] * self.size
        sizes = [int(x) for x in splits]
        if len(sizes) != self.size or any(x < 0 for x in sizes) or sum(sizes) != rows:
            raise invalid(op, self.rank, arg, f"{sizes} must be {self.size} non-negative sizes summing to dim 0 ({rows})", "fix the split sizes")
        return [x * row_bytes for x in sizes]


def contig_in(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def contig_out(t: torch.Tensor, steps: list[Step]) -> torch.Tensor:
    """A contiguous buffer to write ``t``'s result into (copied back by a step when needed)."""
    if t.is_contiguous():
        return t
    buf = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    steps.append(lambda: t.copy_(buf))
    return buf


def contig_inout(t: torch.Tensor, steps: list[Step], write_back: bool = True) -> torch.Tensor:
    """A contiguous buffer holding ``t``'s data whose result goes back into ``t`` (in-place ops)."""
    if t.is_contiguous():
        return t
    buf = t.contiguous()
    if write_back:
        steps.append(lambda: t.copy_(buf))
    return buf


def unpack(flat_buf: torch.Tensor, outs: Sequence[torch.Tensor]) -> None:
    """Copy consecutive blocks of ``flat_buf`` into ``outs``."""
    offset = 0
    for o in outs:
        n = o.numel()
        o.copy_(flat_buf[offset : offset + n].view(o.shape))
        offset += n
