"""The watchdog: one daemon thread per process that bounds stream-ordered ops (NCCL) by their communicator's timeout.

A stream-ordered adapter returns as soon as its op is enqueued, so no host wait notices
a peer that never arrives (the kernel just never finishes) or an error NCCL reports
asynchronously. Such adapters register here while they live. Every ``interval``
seconds the thread asks each one for its asynchronous error (ncclCommGetAsyncError)
and for the launch time of its oldest op that has not finished on the device. An
error, or an op older than the adapter's timeout, makes the watchdog *fail* the
adapter: the adapter stores the error (its next call or wait raises it) and aborts its
communicator (ncclCommAbort), which also ends kernels stuck waiting for a peer.

The thread starts with the first registration and ends once nothing is registered, so
a process whose communicators are all destroyed has no watchdog thread left. It runs
in CUDA's thread-local stream-capture mode where the CUDA runtime can be found, so its
event queries never invalidate a graph capture running in another thread.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Optional, Protocol

from .errors import FlagcxError, FlagcxTimeout
from .flight import on_timeout

log = logging.getLogger("flagcx.watchdog")

MAX_INTERVAL = 1.0
"""Seconds between two passes at most; shorter (a tenth of the smallest timeout, 50 ms at least) for short timeouts."""


class Watched(Protocol):
    """What the watchdog needs from an adapter (the NCCL adapter implements it)."""

    rank: int

    @property
    def watch_timeout(self) -> float:
        """Seconds an op may stay unfinished on the device."""

    @property
    def watch_label(self) -> str:
        """The communicator's name, for messages."""

    def check_async_error(self) -> None:
        """Raise the FlagcxError the library reports for in-flight work, if any."""

    def oldest_pending(self) -> Optional[tuple[float, str]]:
        """(launch time on the watchdog's clock, op name) of the oldest op not finished on the device, or None."""

    def peer_report(self) -> str:
        """Which peers are missing (a sentence, or "" when unknown); may wait a few seconds."""

    def fail(self, exc: FlagcxError) -> None:
        """Store ``exc`` for the next call or wait and abort the communicator."""


class Watchdog:
    """Registry of watched adapters plus the thread that polls them (``clock`` is injectable for tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_interval: float = MAX_INTERVAL) -> None:
        self._clock = clock
        self._max_interval = max_interval
        self._lock = threading.Lock()
        self._watched: weakref.WeakSet[Watched] = weakref.WeakSet()
        self._thread: Optional[threading.Thread] = None
        self._wake = threading.Event()

    def register(self, adapter: Watched, *, start: bool = True) -> None:
        """Watch ``adapter`` (held weakly) and start the thread if it is not running."""
        with self._lock:
            self._watched.add(adapter)
            if start and self._thread is None:
                self._wake.clear()
                self._thread = threading.Thread(target=self._run, name="flagcx-watchdog", daemon=True)
                self._thread.start()

    def unregister(self, adapter: Watched) -> None:
        """Stop watching ``adapter``; the last one out ends the thread (joined unless called from it)."""
        with self._lock:
            self._watched.discard(adapter)
            thread = self._thread if not self._watched else None
        if thread is not None:
            self._wake.set()
            if thread is not threading.current_thread():
                thread.join(timeout=10)

    def watched(self) -> list[Watched]:
        with self._lock:
            return list(self._watched)

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def interval(self) -> float:
        """Seconds until the next pass: a tenth of the smallest timeout, within [50 ms, max_interval]."""
        timeouts = [a.watch_timeout for a in self.watched()]
        return max(0.05, min([self._max_interval] + [t / 10 for t in timeouts]))

    def poll(self) -> list[tuple[Watched, FlagcxError]]:
        """One pass: fail every adapter with an asynchronous error or an op past its timeout; returns them."""
        failed = []
        for adapter in self.watched():
            exc = self._verdict(adapter)
            if exc is None:
                continue
            with self._lock:
                self._watched.discard(adapter)
            try:
                adapter.fail(exc)
            except Exception:  # the abort itself failed: the error is stored all the same
                log.exception("%s: aborting after %s failed", adapter.watch_label, type(exc).__name__)
            log.error("%s", exc)
            if isinstance(exc, FlagcxTimeout):
                on_timeout(exc)
            failed.append((adapter, exc))
        return failed

    def _verdict(self, adapter: Watched) -> Optional[FlagcxError]:
        try:
            adapter.check_async_error()
        except FlagcxError as exc:
            return exc.with_traceback(None)  # the adapter keeps it: its traceback would pin this thread's frames (and adapters)
        oldest = adapter.oldest_pending()
        if oldest is None:
            return None
        launched, op = oldest
        age = self._clock() - launched
        limit = adapter.watch_timeout
        if age <= limit:
            return None
        peers = adapter.peer_report()
        return FlagcxTimeout(
            f"{op} on {adapter.watch_label} has not finished on the device {age:.1f} s after its launch (timeout {limit:g} s)"
            f"{'; ' + peers if peers else ': a peer did not arrive or is blocked'}; the watchdog aborted this communicator: "
            "abort() it and create a new one",
            op=op,
            rank=adapter.rank,
        )

    def _run(self) -> None:
        _thread_local_capture_mode()
        while True:
            with self._lock:
                if not self._watched:
                    self._thread = None
                    return
            try:
                self.poll()
            except Exception:  # never let the thread die while adapters rely on it
                log.exception("watchdog pass failed")
            self._wake.wait(self.interval())
            self._wake.clear()


def _thread_local_capture_mode() -> None:
    """Switch this thread to cudaStreamCaptureModeThreadLocal (best effort: needs the CUDA runtime torch loaded)."""
    try:
        import ctypes

        paths = set()
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "libcudart.so" in path:
                    paths.add(path)
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            mode = ctypes.c_int(1)  # cudaStreamCaptureModeThreadLocal
            if lib.cudaThreadExchangeStreamCaptureMode(ctypes.byref(mode)) == 0:
                return
        log.info("watchdog: no CUDA runtime library mapped; event queries use the default stream-capture mode")
    except Exception as exc:  # not Linux, no CUDA: nothing to protect
        log.debug("watchdog: cannot set the thread-local capture mode (%s)", exc)


_WATCHDOG = Watchdog()


def watch(adapter: Watched) -> None:
    """Register ``adapter`` with the process's watchdog."""
    _WATCHDOG.register(adapter)


def unwatch(adapter: Watched) -> None:
    """Unregister ``adapter`` (on close / abort)."""
    _WATCHDOG.unregister(adapter)


def process_watchdog() -> Watchdog:
    """The process's watchdog (for tests and diagnostics)."""
    return _WATCHDOG
