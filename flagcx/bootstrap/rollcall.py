"""Who is missing after a failure: the roll call in the store (:class:`PeerReport`) and pid liveness on this host."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Optional

ROLLCALL_WAIT = 3.0
"""Seconds (at most the timeout) a rank that hit a transport failure waits for the others to report it too."""


def process_space() -> str:
    """This OS instance and pid namespace: processes with equal spaces see each other's pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{socket.gethostname()}/{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return f"{socket.gethostname()}/{os.getpid()}"  # no /proc: no pid checks across processes


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (in this pid namespace) exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


class PeerReport:
    """Names the ranks behind a transport failure, for adapters whose own errors cannot (Gloo, MPI, NCCL).

    At creation this rank publishes its process (host, pid namespace, pid) in the
    adapter's private store. After a failure :meth:`explain` reports this rank at a roll
    call, with how it failed, and waits up to ROLLCALL_WAIT seconds (never more than the
    timeout) for the others: a rank whose process is gone died; a live one that did not
    report was not in the failed call (blocked elsewhere, or never called it); ranks that
    reported a timeout are named too, so that a rank arriving after its peers gave up
    learns who did (its own error is only a closed connection). Computed once per
    adapter; "" when nobody is missing, a note when the store is unreachable. The store
    is used from a helper thread given ROLLCALL_WAIT + 2 s: a store whose host vanished
    (a pulled cable) can block a client far longer than its timeout.
    """

    def __init__(self, store, rank: int, size: int, timeout: float, name: Callable[[int], str]) -> None:
        self._store = store
        self._rank = rank
        self._size = size
        self._wait = min(ROLLCALL_WAIT, timeout)
        self._name = name
        self._verdict: Optional[str] = None
        self.blamed: tuple[int, ...] = ()
        """After :meth:`explain`: the ranks it names (missing or dead; else those that timed out before this rank)."""
        try:
            store.set(f"presence/{rank}", f"{os.getpid()}|{process_space()}".encode())
        except Exception:  # only the diagnosis depends on it
            pass

    def explain(self, cause: str = "failed") -> str:
        """Who is behind this rank's failure (``cause``: how it failed here, e.g. ``timed out``), as a sentence or ""."""
        if self._verdict is None:
            answer: list[str] = []

            def rollcall() -> None:
                try:
                    answer.append(self._rollcall(cause))
                except Exception as exc:
                    answer.append(f"the missing peers cannot be named: the store is unreachable ({type(exc).__name__})")

            limit = self._wait + 2.0
            helper = threading.Thread(target=rollcall, name="flagcx-rollcall", daemon=True)
            helper.start()
            helper.join(limit)
            self._verdict = answer[0] if answer else f"the missing peers cannot be named: the store did not answer within {limit:g} s"
        return self._verdict

    def _process(self, r: int) -> Optional[tuple[int, str]]:
        key = f"presence/{r}"
        if not self._store.check([key]):
            return None
        pid, _, space = bytes(self._store.get(key)).decode().partition("|")
        return int(pid), space

    def _rollcall(self, cause: str) -> str:
        store = self._store
        store.set(f"rollcall/{self._rank}", cause.encode())
        here = process_space()
        procs: dict[int, Optional[tuple[int, str]]] = {}
        waiting = [r for r in range(self._size) if r != self._rank]
        dead: list[int] = []
        deadline = time.monotonic() + self._wait
        while waiting:
            waiting = [r for r in waiting if not store.check([f"rollcall/{r}"])]
            for r in waiting:
                if r not in procs:
                    procs[r] = self._process(r)
            dead = [r for r in waiting if (p := procs[r]) is not None and p[1] == here and not pid_alive(p[0])]
            if len(dead) == len(waiting) or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        parts = []
        for r in waiting:
            proc = procs.get(r)
            who = self._name(r)
            if r in dead and proc is not None:
                parts.append(f"{who} died (pid {proc[0]})")
            elif proc is not None and proc[1] == here:
                parts.append(f"{who} (pid {proc[0]}) is alive but did not reach the failed call within {self._wait:g} s")
            else:
                parts.append(f"{who} did not report within {self._wait:g} s (it died, or is blocked in another call)")
        verdict = ("peers that did not arrive: " + "; ".join(parts)) if parts else ""
        self.blamed = tuple(waiting)
        if cause != "timed out":  # a rank that did not time out itself may have arrived after peers that did
            others = [r for r in range(self._size) if r != self._rank and r not in waiting]
            gave_up = [r for r in others if bytes(store.get(f"rollcall/{r}")).decode() == "timed out"]
            if gave_up:
                verdict += ("; " if verdict else "") + f"peers that timed out in this call before this rank arrived: {', '.join(map(self._name, gave_up))}"
                self.blamed = self.blamed or tuple(gave_up)
        return verdict
