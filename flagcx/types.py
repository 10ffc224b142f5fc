"""Reduce operations and data types shared by the core, the adapters and the frontends.

``ReduceOp`` is flagcx's own enum; :func:`to_reduce_op` also accepts torch's
``ReduceOp`` (both the 2.11 and 2.13 spellings), strings, and :class:`PremulSum`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Union

import torch

from .errors import InvalidArgument, NotSupported


class ReduceOp(enum.Enum):
    """The reductions flagcx implements."""

    SUM = "sum"
    PROD = "prod"
    MAX = "max"
    MIN = "min"
    AVG = "avg"
    PREMUL_SUM = "premul_sum"

    # Members are singletons compared by identity, so the identity hash is consistent with
    # equality; Enum's own hashes the name in Python, twice per call on the fast path.
    __hash__ = object.__hash__


@dataclass(frozen=True)
class PremulSum:
    """SUM of ``factor * x`` (NCCL's ncclRedOpCreatePreMulSum); factor is a float or a 1-element tensor."""

    factor: Union[float, torch.Tensor]


ReduceOpLike = Union[ReduceOp, PremulSum, str, Any]

_BY_NAME = {
    "sum": ReduceOp.SUM,
    "prod": ReduceOp.PROD,
    "product": ReduceOp.PROD,
    "max": ReduceOp.MAX,
    "min": ReduceOp.MIN,
    "avg": ReduceOp.AVG,
    "mean": ReduceOp.AVG,
    "premul_sum": ReduceOp.PREMUL_SUM,
}


def to_reduce_op(op: ReduceOpLike, opname: str = "reduce", rank: int | None = None) -> tuple[ReduceOp, Any]:
    """Normalise any reduce-op spelling to ``(ReduceOp, premul_factor_or_None)``."""
    if isinstance(op, ReduceOp):
        if op is ReduceOp.PREMUL_SUM:
            raise InvalidArgument("ReduceOp.PREMUL_SUM needs a factor; pass flagcx.PremulSum(factor)", op=opname, rank=rank)
        return op, None
    if isinstance(op, PremulSum):
        return ReduceOp.PREMUL_SUM, op.factor
    if isinstance(op, str):
        key = op.lower()
        if key in _BY_NAME and key != "premul_sum":
            return _BY_NAME[key], None
        raise InvalidArgument(f"unknown reduce op {op!r}; use one of sum, prod, max, min, avg", op=opname, rank=rank)
    # torch.distributed.ReduceOp instance or RedOpType value.
    kind = getattr(op, "op", op)
    name = getattr(kind, "name", None)
    if name == "PREMUL_SUM":
        factor = getattr(op, "factor", None)
        if factor is None:
            raise NotSupported(
                "PREMUL_SUM: this torch version gives no way to read the factor from Python "
                "(torch >= 2.13 exposes ReduceOp.factor); use ReduceOp.SUM and scale the tensor",
                op=opname,
                rank=rank,
            )
        return ReduceOp.PREMUL_SUM, factor
    if name is not None and name.lower() in _BY_NAME:
        return _BY_NAME[name.lower()], None
    if name in ("BAND", "BOR", "BXOR"):
        raise NotSupported(f"reduce op {name} is not supported; supported: SUM, PRODUCT, MAX, MIN, AVG, PREMUL_SUM", op=opname, rank=rank)
    raise InvalidArgument(f"unknown reduce op {op!r}", op=opname, rank=rank)


FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
INT_DTYPES = frozenset({torch.int8, torch.uint8, torch.int32, torch.int64})
REDUCE_DTYPES = FLOAT_DTYPES | INT_DTYPES
"""Dtypes the adapters reduce natively; bool and complex are mapped onto these by the core."""
