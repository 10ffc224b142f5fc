"""Lowering the rich call forms onto the adapter contract: reductions, and block lists.

The adapter contract reduces flat contiguous buffers of its declared dtypes with its
declared ops. Everything else is emulated here, once, for every transport:

- complex tensors are reduced as pairs of reals (SUM, AVG, PREMUL_SUM only);
- bool tensors as uint8 with MAX (SUM, MAX: logical or) or MIN (PROD, MIN: logical and);
- AVG on an adapter without it (or on integers) is SUM followed by a division
  (truncating for integers) on the ranks that receive the result;
- PREMUL_SUM on an adapter without it (or with a tensor factor, which the host cannot
  read without a device sync) scales the input by the factor, then SUMs; an adapter that
  declares PREMUL_SUM receives the op and a float ``factor`` keyword (see
  :mod:`flagcx.adapters.base`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from ..adapters import Adapter, Handle, all_of, grouped
from ..errors import NotSupported
from ..tensors import as_bytes, flat, nbytes, overlaps
from ..types import FLOAT_DTYPES, ReduceOp
from ..work import Step
from .args import contig_in, contig_out, unpack

Factor = Union[None, float, torch.Tensor]


@dataclass
class Lowered:
    """A reduction as the adapter will run it."""

    send: torch.Tensor
    recv: torch.Tensor
    op: ReduceOp
    factor: Factor = None
    """PREMUL_SUM's factor, for an adapter that declares PREMUL_SUM."""
    steps: list[Step] = field(default_factory=list)
    """What runs after the adapter (the AVG division)."""

    def kwargs(self) -> dict:
        """Extra keyword arguments of the adapter call (the factor of a native PREMUL_SUM)."""
        return {"factor": self.factor} if self.op is ReduceOp.PREMUL_SUM else {}


def reduce_buffers(tensor: torch.Tensor, out: torch.Tensor, steps: list[Step], receives: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous send and recv buffers for a reduction of ``tensor`` into ``out`` (``receives``: whether this rank gets the result)."""
    if out is tensor and not tensor.is_contiguous():
        send = recv = tensor.contiguous()
        if receives:
            steps.append(lambda: tensor.copy_(recv))
        return send, recv
    send = contig_in(tensor)
    recv = contig_out(out, steps) if receives else send
    if send.data_ptr() != recv.data_ptr() and overlaps(send, recv):
        send = send.clone()
    return send, recv


def lower_reduction(
    op: str,
    rank: int,
    size: int,
    adapter: Adapter,
    send: torch.Tensor,
    recv: torch.Tensor,
    kind: ReduceOp,
    factor: Factor,
    divide_here: bool = True,
) -> Lowered:
    """Map (dtype, reduce op) of contiguous ``send``/``recv`` onto ``adapter``'s native ones (see the module docstring).

    ``divide_here`` is False on reduce's non-root ranks, whose recv is not written.
    """
    caps = adapter.capabilities
    steps: list[Step] = []
    dtype = send.dtype
    if dtype.is_complex:
        if kind not in (ReduceOp.SUM, ReduceOp.AVG, ReduceOp.PREMUL_SUM):
            raise NotSupported(f"{kind.name} is not defined on complex tensors; use SUM, AVG or PREMUL_SUM", op=op, rank=rank)
        send, recv = torch.view_as_real(send), torch.view_as_real(recv)
        dtype = send.dtype
    if dtype == torch.bool:
        if kind in (ReduceOp.AVG, ReduceOp.PREMUL_SUM):
            raise NotSupported(f"{kind.name} is not defined on bool tensors; use SUM (logical or) or PROD (logical and)", op=op, rank=rank)
        kind = ReduceOp.MAX if kind in (ReduceOp.SUM, ReduceOp.MAX) else ReduceOp.MIN
        send, recv = send.view(torch.uint8), recv.view(torch.uint8)
        dtype = torch.uint8
    if dtype not in caps.reduce_dtypes:
        raise NotSupported(
            f"adapter {adapter.name} cannot reduce {dtype}; supported: {', '.join(sorted(str(d) for d in caps.reduce_dtypes))}",
            op=op,
            rank=rank,
        )
    native = kind
    native_factor: Factor = None
    if kind is ReduceOp.PREMUL_SUM:
        if dtype not in FLOAT_DTYPES:
            raise NotSupported(f"PREMUL_SUM needs a floating dtype, got {dtype}", op=op, rank=rank)
        if ReduceOp.PREMUL_SUM in caps.reduce_ops and not isinstance(factor, torch.Tensor):
            native_factor = float(factor)  # type: ignore[arg-type]
        else:
            f = factor.to(device=send.device, dtype=dtype) if isinstance(factor, torch.Tensor) else float(factor or 0.0)
            send = torch.mul(send, f).to(dtype)
            native = ReduceOp.SUM
    elif kind is ReduceOp.AVG and (ReduceOp.AVG not in caps.reduce_ops or dtype not in FLOAT_DTYPES):
        native = ReduceOp.SUM
        if divide_here:
            if dtype in FLOAT_DTYPES:
                steps.append(lambda: recv.div_(size))
            else:
                steps.append(lambda: recv.div_(size, rounding_mode="trunc"))
    if native not in caps.reduce_ops:
        raise NotSupported(f"adapter {adapter.name} does not implement {native.name}", op=op, rank=rank)
    return Lowered(flat(send), flat(recv), native, native_factor, steps)


def native_as_called(lowered: Lowered, kind: ReduceOp, dtype: torch.dtype, copies: Optional[list[Step]]) -> bool:
    """Whether the adapter computes the call as made (no emulation, no dtype mapping, no copies): fast-path material."""
    return not (lowered.steps or copies) and lowered.op is kind and lowered.send.dtype == dtype


def broadcast_blocks(adapter: Adapter, bufs: Sequence[torch.Tensor]) -> Handle:
    """all_gather into blocks of different sizes: rank r broadcasts block r, all in one group."""
    return all_of(grouped(adapter, lambda: [adapter.broadcast(as_bytes(buf), root) for root, buf in enumerate(bufs) if buf.numel()]))


def concat_blocks(ins: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int], torch.Tensor, list[int], Step]:
    """all_to_all over tensor lists as one alltoallv: (send bytes, send counts, recv bytes, recv counts, the step that unpacks recv)."""
    send = torch.cat([flat(contig_in(t)) for t in ins])
    recv = torch.empty(sum(o.numel() for o in outs), dtype=send.dtype, device=send.device)
    return as_bytes(send), [nbytes(t) for t in ins], as_bytes(recv), [nbytes(o) for o in outs], lambda: unpack(recv, outs)
