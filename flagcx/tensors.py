"""Small tensor helpers shared by the core and the adapters (views, overlap tests)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def flat(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as 1-D: itself when it already is (a view costs ~0.9 us of dispatch), else a view (0-dim: 1 element)."""
    return t if t.dim() == 1 else t.reshape(-1)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's storage (always a new tensor object)."""
    if t.dtype == torch.uint8:
        return t.reshape(-1)
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    return flat(t).view(torch.uint8)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the memory of a and b intersects."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + nbytes(b) and b0 < a0 + nbytes(a)


def tensors_in(values: Sequence[object]) -> list[torch.Tensor]:
    """The tensors among ``values``, each a tensor, a list / tuple of tensors, or anything else (skipped)."""
    found: list[torch.Tensor] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            found.extend(t for t in v if isinstance(t, torch.Tensor))
    return found
