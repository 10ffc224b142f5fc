"""The interface every library under test implements for the shared timing loop (see :mod:`.backends`).

``prepare`` turns (collective, buffers, op, root) into a zero-argument call and the
tensor validation reads; it returns None when the backend has no such mode (N/A) and
raises NotSupported for combinations it cannot do. Everything that can be built
before the timed loop (option objects, chunk lists) is built in ``prepare``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import NotSupported
from .colls import Buffers, Collective


@dataclass
class Prepared:
    """One ready-to-time call and the tensor that holds its result."""

    fn: Callable[[], None]
    result: torch.Tensor


class Backend(abc.ABC):
    """A collective library bound to the ranks of this job."""

    name: str = ""

    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device, timeout: float) -> None:
        self.rank = rank
        self.size = size

    @abc.abstractmethod
    def prepare(self, coll: Collective, bufs: Buffers, op: str, root: int) -> Optional[Prepared]:
        """The call for one (size, mode); None when the mode does not exist for this backend."""

    def describe(self) -> str:
        """One line for the preamble."""
        return self.name

    def close(self) -> None:
        """Release the library's resources."""

    def _peers(self) -> tuple[int, int]:
        if self.size < 2:
            raise NotSupported(f"{self.name} cannot send to its own rank; sendrecv needs 2 or more ranks")
        return (self.rank + 1) % self.size, (self.rank - 1) % self.size
