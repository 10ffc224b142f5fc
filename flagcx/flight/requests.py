"""Dumps asked for from outside the call that failed: by a peer that timed out (through the store) or by SIGUSR1.

A rank whose call times out dumps its own recorder at once, and its ``flagcx-flight``
thread adds 1 to the key :data:`REQUEST_KEY` in the store of each of its communicators,
as ProcessGroupNCCL signals its peers through the store (in that thread, never in the
failing call: a store cut off by the network would block the caller). The thread, one
per process while a communicator with a recorder is open, reads those counters every
:data:`POLL_SECONDS` and dumps when one grew: one timeout yields a dump from every live
rank, including a rank stuck in its own code, which never calls flagcx again. Closing the
last communicator wakes the thread, which ends; so does interpreter exit (an ``atexit``
hook joins it first: a daemon thread still inside a store call when Python finalizes
kills the process with "terminate called without an active exception").

SIGUSR1 dumps too (``kill -USR1 <pid>``), also while the main thread waits inside a
transport: the handler is installed only where SIGUSR1 has none, and the signal reaches
the thread through a wake-up pipe (``signal.set_wakeup_fd``), since Python runs signal
handlers only when the main thread returns to the interpreter. Where the application owns
the wake-up fd already, the handler dumps from the main thread instead.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import signal
import threading
import weakref
from typing import Optional

from ..errors import FlagcxTimeout
from .dump import dump_trace
from .ring import Recorder, live_recorders

log = logging.getLogger("flagcx.flight")

REQUEST_KEY = "flagcx_flight_dump"
"""Store key whose counter asks every member of the communicator to dump."""
POLL_SECONDS = 1.0
"""Seconds between two reads of the request counters."""

_lock = threading.Lock()
_thread: Optional[threading.Thread] = None
_seen: weakref.WeakKeyDictionary[Recorder, int] = weakref.WeakKeyDictionary()
_to_ask: list[Recorder] = []
_wakeup_read: Optional[int] = None
_wakeup_write: Optional[int] = None
_control: Optional[tuple[int, int]] = None
"""(read, write) ends of the pipe that wakes the thread (a timeout to pass on, a communicator closed)."""
_exiting = False
EXIT_JOIN_SECONDS = 5.0
"""At interpreter exit, how long the thread may take to pass on pending requests and end."""


def failed(rec: Recorder, index: int, exc: BaseException, started: bool = True) -> None:
    """Call ``index`` of ``rec`` raised ``exc``: the ring keeps it; a timeout also dumps this rank and asks the peers to."""
    rec.fail(index, exc, started)
    if isinstance(exc, FlagcxTimeout):
        on_timeout(exc)


def on_timeout(exc: BaseException) -> None:
    """A call of this process timed out: dump this rank now; the thread asks every peer of every communicator to dump."""
    try:
        dump_trace(reason=f"timeout: {exc}")
    except Exception:
        log.exception("flight recorder: the dump after a timeout failed")
    with _lock:
        _to_ask.extend(r for r in live_recorders() if r.store is not None and not r.closed)
    _wake()


def watch(rec: Recorder) -> None:
    """Serve dump requests for ``rec``'s communicator: start the thread (and the SIGUSR1 handler, once per process)."""
    global _thread, _control
    _install_signal()
    with _lock:
        _seen.setdefault(rec, 0)
        if _control is None:
            _control = os.pipe()
            os.set_blocking(_control[0], False)
            os.set_blocking(_control[1], False)
        if _thread is None:
            _thread = threading.Thread(target=_listen, name="flagcx-flight", daemon=True)
            _thread.start()


def close(rec: Recorder) -> None:
    """``rec``'s communicator is destroyed or aborted: stop reading its store; the thread ends with the last one."""
    rec.closed = True
    _wake()


def _wake() -> None:
    if _control is not None:
        try:
            os.write(_control[1], b"w")
        except BlockingIOError:  # the pipe is full: the thread is awake anyway
            pass


def _listen() -> None:
    global _thread
    while True:
        with _lock:
            asks, _to_ask[:] = list(_to_ask), []
        _ask(asks)
        with _lock:
            open_ = [r for r in live_recorders() if not r.closed]
            if _exiting or (not open_ and not _to_ask):
                _thread = None
                return
        asked = [r.name for r in open_ if r.store is not None and _asked(r)]
        signalled = _wait(POLL_SECONDS)
        if asked or signalled:
            try:
                dump_trace(reason="SIGUSR1" if signalled else f"asked by a peer of {', '.join(asked)}", level=logging.INFO if asked else logging.WARNING)
            except Exception:
                log.exception("flight recorder: the dump failed")


@atexit.register
def _end_at_exit() -> None:
    """Let the thread pass on pending requests, then end it, before Python finalizes (see the module docstring)."""
    global _exiting
    _exiting = True
    thread = _thread
    if thread is not None:
        _wake()
        thread.join(EXIT_JOIN_SECONDS)


def _ask(recorders: list[Recorder]) -> None:
    """Add 1 to the request counter in each of ``recorders``' stores (once per recorder)."""
    for rec in dict.fromkeys(recorders):
        store = rec.store
        if store is None:
            continue
        try:
            count = store.add(REQUEST_KEY, 1)
        except Exception as err:  # the store is gone with its host rank: nobody left to ask there
            log.info("flight recorder: cannot ask the peers of %s to dump (%s)", rec.name, err)
            continue
        with _lock:
            _seen[rec] = count


def _asked(rec: Recorder) -> bool:
    """Whether the request counter in ``rec``'s store grew since this process last looked."""
    try:
        count = rec.store.add(REQUEST_KEY, 0)
    except Exception as err:  # the store closed (its host rank left): stop reading it
        log.debug("flight recorder: stop reading %s's store (%s)", rec.name, err)
        rec.store = None
        return False
    with _lock:
        if count <= _seen.get(rec, 0):
            return False
        _seen[rec] = count
    return True


def _wait(seconds: float) -> bool:
    """Wait up to ``seconds`` for a signal or a wake-up; True when SIGUSR1 arrived."""
    assert _control is not None
    fds = [_control[0]] + ([_wakeup_read] if _wakeup_read is not None else [])
    ready, _, _ = select.select(fds, [], [], seconds)
    signalled = False
    for fd in ready:
        try:
            data = os.read(fd, 512)
        except BlockingIOError:
            continue
        signalled = signalled or (fd == _wakeup_read and signal.SIGUSR1 in data)
    return signalled


def _install_signal() -> None:
    """SIGUSR1 -> dump, where nobody handles SIGUSR1 yet (main thread only; once per process)."""
    global _wakeup_read, _wakeup_write
    if _wakeup_read is not None or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL:
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    if previous != -1:  # the application reads signals through its own fd: keep it, dump from the handler
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)
        signal.signal(signal.SIGUSR1, _dump_in_handler)
        return
    _wakeup_read, _wakeup_write = read, write
    signal.signal(signal.SIGUSR1, _on_sigusr1)


def _on_sigusr1(signum: int, frame: object) -> None:
    """The thread dumps (it saw the signal on the wake-up pipe), unless the application replaced the wake-up fd
    since (asyncio's loop does): then the thread saw nothing, and this handler dumps from the main thread."""
    current = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(current, warn_on_full_buffer=current != _wakeup_write)
    if current != _wakeup_write:
        _dump_in_handler(signum, frame)


def _dump_in_handler(signum: int, frame: object) -> None:
    try:
        dump_trace(reason="SIGUSR1")
    except Exception:
        log.exception("flight recorder: the dump on SIGUSR1 failed")
