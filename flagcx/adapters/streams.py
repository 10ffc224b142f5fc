"""Device-generic streams and events for stream-ordered adapters (CUDA, and vendors' torch device modules).

The core runs asynchronous device ops on a side stream ordered with events, like
ProcessGroupNCCL: ``wait`` makes the caller's current stream wait, never the host.
Everything goes through ``torch.get_device_module(device.type)``, so any vendor whose
torch extension provides ``current_stream`` / ``Stream`` / ``stream`` / ``Event``
works; a device module without them gets a clear NotSupported.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..errors import NotSupported
from .base import Handle


def device_module(device: torch.device) -> Any:
    try:
        module = torch.get_device_module(device.type)
    except Exception as exc:
        raise NotSupported(f"torch has no device module for {device.type!r} ({exc})") from exc
    for attr in ("current_stream", "Stream", "stream", "Event"):
        if not hasattr(module, attr):
            raise NotSupported(f"torch.{device.type} has no {attr}(); flagcx needs streams and events for {device.type} tensors")
    return module


def current_device_index(device_type: str) -> int:
    return int(torch.get_device_module(device_type).current_device())


def is_capturing(device: torch.device) -> bool:
    """True while the current stream of ``device`` is being captured into a graph."""
    module = torch.get_device_module(device.type)
    fn = getattr(module, "is_current_stream_capturing", None)
    return bool(fn()) if fn is not None else False


class EventHandle(Handle):
    """Completion of device work recorded as an event: wait() orders the caller's stream after it."""

    __slots__ = ("_event",)

    def __init__(self, event: Any) -> None:
        self._event = event

    def wait(self, timeout: Optional[float] = None) -> None:
        self._event.wait()

    def done(self) -> bool:
        return bool(self._event.query())


class SideStream:
    """Enter a device's side stream after ordering it behind the current stream."""

    __slots__ = ("module", "stream", "_ctx")

    def __init__(self, device: torch.device) -> None:
        self.module = device_module(device)
        self.stream = self.module.Stream(device=device)
        self._ctx: Any = None

    def enter(self) -> None:
        self.stream.wait_stream(self.module.current_stream(self.stream.device))
        self._ctx = self.module.stream(self.stream)
        self._ctx.__enter__()

    def exit(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def record(self) -> EventHandle:
        event = self.module.Event()
        event.record(self.stream)
        return EventHandle(event)
