"""Deterministic per-rank inputs and exact references for collective checks.

Every rank can generate every other rank's input (seeded by check, rank), so each
rank computes the reference of an op locally and compares bit-exactly (integers,
bool, data movement) or within a dtype-matched tolerance (floating reductions).
"""

from __future__ import annotations

import zlib
from typing import Optional

import torch

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INTS = [torch.int8, torch.uint8, torch.int32, torch.int64]
REDUCE_DTYPES = FLOATS + INTS + [torch.bool]
MOVE_DTYPES = REDUCE_DTYPES + [torch.complex64]
REDUCE_OPS = ["sum", "prod", "max", "min", "avg", "premul_sum"]

TOLERANCE = {
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
    torch.complex64: (1e-5, 1e-5),
}
"""(rtol, atol) per floating dtype for reductions of a few ranks' values in [-2, 2]."""

PREMUL_FACTOR = 0.5


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def make(tag: str, rank: int, n: int, dtype: torch.dtype, op: Optional[str] = None, device: str = "cpu") -> torch.Tensor:
    """The input rank ``rank`` uses in check ``tag`` (n elements, values safe for ``op``)."""
    g = torch.Generator().manual_seed(_seed(tag, rank, n, str(dtype), op))
    if dtype == torch.bool:
        t = torch.randint(0, 2, (n,), generator=g).bool()
    elif dtype.is_complex:
        t = torch.complex(torch.rand(n, generator=g) * 4 - 2, torch.rand(n, generator=g) * 4 - 2).to(dtype)
    elif dtype.is_floating_point:
        if op == "prod":
            t = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(dtype)
        else:
            t = (torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2).to(dtype)
    else:
        info = torch.iinfo(dtype)
        if op == "prod":
            lo, hi = (-3, 4) if info.min < 0 else (0, 4)
        else:
            lo, hi = info.min, info.max + 1
            lo, hi = max(lo, -(2**31)), min(hi, 2**31)
        t = torch.randint(lo, hi, (n,), generator=g, dtype=torch.int64).to(dtype)
    return t.to(device)


def reduce_ref(inputs: list[torch.Tensor], op: str) -> torch.Tensor:
    """Exact reference of reducing ``inputs`` (wrap-around for integers, like the libraries)."""
    dtype = inputs[0].dtype
    n = len(inputs)
    if dtype == torch.bool:
        stack = torch.stack([x.cpu() for x in inputs])
        return stack.any(0) if op in ("sum", "max") else stack.all(0)
    if dtype.is_floating_point or dtype.is_complex:
        acc_dtype = torch.complex128 if dtype.is_complex else torch.float64
        stack = torch.stack([x.cpu().to(acc_dtype) for x in inputs])
        if op == "sum":
            r = stack.sum(0)
        elif op == "prod":
            r = stack.prod(0)
        elif op == "max":
            r = stack.max(0).values
        elif op == "min":
            r = stack.min(0).values
        elif op == "avg":
            r = stack.sum(0) / n
        elif op == "premul_sum":
            r = (stack * PREMUL_FACTOR).sum(0)
        else:
            raise ValueError(op)
        return r.to(dtype)
    stack = torch.stack([x.cpu().to(torch.int64) for x in inputs])
    if op == "sum":
        return stack.sum(0).to(dtype)
    if op == "prod":
        return stack.prod(0).to(dtype)
    if op == "max":
        return stack.max(0).values.to(dtype)
    if op == "min":
        return stack.min(0).values.to(dtype)
    if op == "avg":
        wrapped = stack.sum(0).to(dtype).to(torch.int64)
        return torch.div(wrapped, n, rounding_mode="trunc").to(dtype)
    raise ValueError(op)


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str, reduction: bool = False) -> None:
    """Bit-exact for integers / bool / data movement; dtype tolerance for floating reductions."""
    actual = actual.detach().cpu()
    expected = expected.detach().cpu()
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if reduction and (actual.dtype.is_floating_point or actual.dtype.is_complex):
        rtol, atol = TOLERANCE[actual.dtype]
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
    else:
        if not torch.equal(actual, expected):
            bad = (actual != expected).reshape(-1).nonzero()
            first = bad[0].item() if bad.numel() else -1
            raise AssertionError(
                f"{what}: {bad.numel()} of {actual.numel()} elements differ; first at {first}: "
                f"{actual.reshape(-1)[first].item()} != {expected.reshape(-1)[first].item()}"
            )


def supported(dtype: torch.dtype, op: str) -> bool:
    """Whether flagcx defines ``op`` on ``dtype`` (bool: no avg/premul_sum; ints: no premul_sum)."""
    if dtype == torch.bool:
        return op in ("sum", "prod", "max", "min")
    if op == "premul_sum":
        return dtype.is_floating_point
    return True
