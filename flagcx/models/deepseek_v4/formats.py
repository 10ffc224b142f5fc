"""The number formats of DeepSeek's published V4 checkpoints, dequantized window by window (pure tensor maths).

- FP8 block: ``float8_e4m3fn`` weight ``[out, in]`` with one scale per 128 x 128 block,
  ``scale[ceil(out/128), ceil(in/128)]``; the scale is ue8m0 (``float8_e8m0fnu`` or raw
  ``uint8`` exponent bytes: 2^(byte - 127)) in V4-Flash / V4-Pro, float32 in the *-Base
  checkpoints.
- FP4: e2m1 values packed two per byte (``int8`` or ``float4_e2m1fn_x2`` storage, low nibble
  = even column), ``[out, in/2]``, with one ue8m0 scale per 32 columns of a row,
  ``scale[out, in/32]``.

Every function takes the stored window (a few bytes per element, already cut from the file)
and returns float32 values times scales; the caller casts once to the parameter's dtype.
With power-of-two scales the products are exact in float32 and in BF16 (e4m3 carries 3
mantissa bits and e2m1 one; BF16 has 7 and float32's exponent range), so the cast loses
nothing; float32 scales (*-Base) round once, in the float32 product.
"""

from __future__ import annotations

import math

import torch

FP8_BLOCK = 128
"""Rows and columns of one FP8 scale block."""

FP4_GROUP = 32
"""Columns of one FP4 scale group (within a row)."""

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""e2m1 code -> value (bit 3 is the sign)."""

FP4_STORAGE = tuple(t for t in (torch.int8, torch.uint8, getattr(torch, "float4_e2m1fn_x2", None)) if t is not None)
"""Dtypes a packed FP4 weight may be stored as."""

FP8_STORAGE = (torch.float8_e4m3fn,)

SCALE_STORAGE = (torch.float8_e8m0fnu, torch.uint8, torch.float32)

QUANTIZED = (*FP8_STORAGE, *FP4_STORAGE, torch.float8_e5m2, torch.float8_e8m0fnu)
"""Dtypes that hold codes or scales, never values a floating parameter may take as they are."""


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """A stored scale window as float32: e8m0 (or its raw bytes) decoded to 2^(e - 127), float32 as is.

    Decoded with integer bit operations (exponent byte -> float32 exponent field), which
    every device runs; byte 0 is 2^-127 (a float32 subnormal), byte 255 is NaN.
    """
    if scale.dtype == torch.float32:
        return scale
    if scale.dtype not in (torch.float8_e8m0fnu, torch.uint8):
        raise TypeError(f"scale dtype {scale.dtype} is not one of {SCALE_STORAGE}")
    e = scale.view(torch.uint8).to(torch.int32)
    bits = torch.where(e == 0, torch.full_like(e, 1 << 22), e << 23)
    return torch.where(e == 255, torch.full_like(e, 0x7FC00000), bits).view(torch.float32)


def _pair_table(device: torch.device) -> torch.Tensor:
    """byte -> (value of its low nibble, value of its high nibble), float32 ``[256, 2]``."""
    values = torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
    return torch.stack([values.repeat(16), values.repeat_interleave(16)], dim=-1)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 ``[..., n/2]`` -> float32 ``[..., n]`` (low nibble first): one lookup per byte."""
    codes = packed.contiguous().view(torch.uint8)
    pairs = _pair_table(codes.device).index_select(0, codes.flatten().to(torch.int32))
    return pairs.reshape(*codes.shape[:-1], 2 * codes.shape[-1])


def fp8_grid(out: int, cols: int) -> tuple[int, int]:
    """The scale shape of an FP8 block weight ``[out, cols]``."""
    return math.ceil(out / FP8_BLOCK), math.ceil(cols / FP8_BLOCK)


def fp4_grid(out: int, cols: int) -> tuple[int, int]:
    """The scale shape of an FP4 weight of logical shape ``[out, cols]``."""
    return out, math.ceil(cols / FP4_GROUP)


def block_window(start: int, stop: int, block: int, size: int) -> tuple[int, int]:
    """The block-aligned window ``[a, b)`` of a dimension of ``size`` that covers ``[start, stop)``."""
    return (start // block) * block, min(-(-stop // block) * block, size)


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, row0: int, col0: int) -> torch.Tensor:
    """An FP8 window ``weight`` (starting at block-aligned ``row0, col0``) times its scale window, as float32."""
    assert row0 % FP8_BLOCK == 0 and col0 % FP8_BLOCK == 0, (row0, col0)
    rows, cols = weight.shape
    s = scale_values(scale)
    (br, bc), b = s.shape, FP8_BLOCK
    if rows == br * b and cols == bc * b:  # whole blocks: the scale broadcasts over each block
        return (weight.to(torch.float32).view(br, b, bc, b) * s.view(br, 1, bc, 1)).view(rows, cols)
    return weight.to(torch.float32) * s.repeat_interleave(b, 0).repeat_interleave(b, 1)[:rows, :cols]


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, col0: int) -> torch.Tensor:
    """An FP4 window (packed, starting at group-aligned logical column ``col0``) times its scales, as float32."""
    assert col0 % FP4_GROUP == 0, col0
    values = unpack_fp4(packed)
    rows, cols = values.shape
    s = scale_values(scale)
    if cols == s.shape[1] * FP4_GROUP:  # whole groups: the scale broadcasts over each group
        return (values.view(rows, -1, FP4_GROUP) * s.unsqueeze(-1)).view(rows, cols)
    return values * s.repeat_interleave(FP4_GROUP, 1)[:, :cols]
