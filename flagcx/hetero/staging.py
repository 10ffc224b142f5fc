"""Host staging of device tensors for the heterogeneous runner: pinned buffers, copy streams, the host-side wait.

Device data crosses clusters through pinned host memory. Copies to the host go on one
copy stream and copies back on another, so that chunk k+1 goes down while chunk k
travels and chunk k-1 comes back; the device's own intra steps stay on the caller's
stream. Every heterogeneous op completes on the host before it returns
(:meth:`Staging.finish_device`), so its buffers can be reused at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Optional

import torch

from ..adapters import Adapter
from ..errors import FlagcxTimeout
from .lanes import Lanes


class Staging:
    """Pinned buffers and copy streams of one heterogeneous communicator."""

    def __init__(self, rank: int, timeout: float, name: str) -> None:
        self.rank = rank
        self.timeout = timeout
        self.name = name
        self._streams: dict[torch.device, tuple] = {}
        self._pinned: Optional[torch.Tensor] = None

    def copy_streams(self, device: torch.device) -> tuple:
        """(device-to-host, host-to-device) streams of ``device`` (created once)."""
        pair = self._streams.get(device)
        if pair is None:
            module = torch.get_device_module(device.type)
            pair = self._streams[device] = (module.Stream(device=device), module.Stream(device=device))
        return pair

    def finish_device(self, t: torch.Tensor) -> None:
        """Complete the op on the host: wait (at most the timeout) for the device work on the current stream."""
        if t.device.type == "cpu":
            return
        module = torch.get_device_module(t.device.type)
        event = module.Event()
        event.record(module.current_stream(t.device))
        start = time.monotonic()
        deadline = start + self.timeout
        delay = 1e-5
        while not event.query():
            now = time.monotonic()
            if now - start < 5e-4:  # the first half millisecond: yield only (a sleep's wake-up costs 50-100 us)
                time.sleep(0)
                continue
            if now > deadline:
                raise FlagcxTimeout(
                    f"device work of a heterogeneous op on {self.name} not finished after {self.timeout:g} s "
                    "(a peer of the device cluster did not arrive); abort the communicator and create a new one",
                    rank=self.rank,
                )
            time.sleep(delay)
            delay = min(delay * 2, 2e-4)

    @staticmethod
    def to_host(t: torch.Tensor, with_data: bool = True) -> torch.Tensor:
        """``t`` itself on the host, else a pinned host buffer (holding t's data when ``with_data``)."""
        if t.device.type == "cpu":
            return t
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        if with_data:
            h.copy_(t)
        return h

    def pinned(self, like: torch.Tensor) -> torch.Tensor:
        """A pinned host buffer shaped like 1-D ``like``, reused across calls (pinning costs more than small copies)."""
        nbytes = like.numel() * like.element_size()
        if self._pinned is None or self._pinned.numel() < nbytes:
            self._pinned = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8, pin_memory=True)
        return self._pinned[:nbytes].view(like.dtype)

    @staticmethod
    def to_device(h: torch.Tensor, t: torch.Tensor) -> None:
        """Copy host buffer ``h`` back into ``t`` (enqueued on the current stream; nothing when t is on the host)."""
        if h.data_ptr() != t.data_ptr() or t.device.type != "cpu":
            t.copy_(h, non_blocking=t.device.type != "cpu")

    def staged(self, lanes: Lanes, buf: torch.Tensor, fn: Callable[[Adapter, torch.Tensor], None], reads: bool, writes: bool, name: str) -> None:
        """Run the host transfer ``fn(peer lane adapter, chunk)`` on 1-D ``buf``, chunk by chunk, in place.

        Every member of the peer group runs the same chunks (same FLAGCX_HETERO_CHUNK and
        element count), chunk k on lane k % FLAGCX_HETERO_LANES. Device buffers go through
        pinned host memory: the copies to the host are queued at once on one stream, each
        chunk is copied back on a second stream as soon as its transfer is done.
        ``reads`` / ``writes``: whether this rank's data is sent / its buffer receives a result.
        """
        n = buf.numel()
        bounds = lanes.chunks(buf)
        adapters = [lanes.host(lane, name) for lane in lanes.peers]
        if buf.device.type == "cpu":
            lanes.run(bounds, lambda i, lane: fn(adapters[lane], buf[bounds[i][0] : bounds[i][1]]))
            return
        module = torch.get_device_module(buf.device.type)
        d2h, h2d = self.copy_streams(buf.device)
        current = module.current_stream(buf.device)
        host = torch.empty(n, dtype=buf.dtype, pin_memory=True)
        ready = []
        if reads:
            d2h.wait_stream(current)
            with module.stream(d2h):
                for a, b in bounds:
                    host[a:b].copy_(buf[a:b], non_blocking=True)
                    event = module.Event()
                    event.record(d2h)
                    ready.append(event)
        if writes:
            h2d.wait_stream(current)

        def one(i: int, lane: int) -> None:
            a, b = bounds[i]
            if reads:
                ready[i].synchronize()
            fn(adapters[lane], host[a:b])
            if writes:
                with module.stream(h2d):
                    buf[a:b].copy_(host[a:b], non_blocking=True)

        lanes.run(bounds, one)
        if writes:
            current.wait_stream(h2d)
        if reads:
            current.wait_stream(d2h)
