"""Rendezvous through a torch Store: all-gathers of small records, and the job's rank/size.

Every rank-to-rank exchange at init (topology records, shm segment names, NCCL unique
ids) goes through :func:`store_allgather` / :func:`store_broadcast`. The launch
environment is read from torchrun, mpiexec (MPICH / Open MPI) or ``flagcx.launch``.
The network helpers at the end find this host's interfaces and addresses: the one
FLAGCX_SOCKET_IFNAME names, the hostname's, the route to a peer.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, TypeVar

import torch.distributed as dist

from .config import get as get_config
from .errors import FlagcxError, FlagcxTimeout, InvalidArgument

T = TypeVar("T")


def _missing(store, keys: list[str]) -> list[int]:
    """Indexes of the keys not in the store (raises the store's error when it is unreachable)."""
    return [i for i, key in enumerate(keys) if not store.check([key])]


def store_poll(store, key: str, timeout: float) -> Optional[bytes]:
    """The value of ``key`` once it exists, or None after ``timeout`` seconds (polls, so a dead writer never hangs it)."""
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while True:
        if store.check([key]):
            return store.get(key)
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.01)


def store_wait(store, keys: list[str], timeout: float, what: str, ranks: Optional[list[int]] = None) -> None:
    """Wait until every key exists, or raise FlagcxTimeout naming the ranks that never wrote theirs."""
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except Exception as exc:
        text = str(exc).lower()
        if "timeout" in text or "timed out" in text or "wait timeout" in text:
            try:
                late = _missing(store, keys)
            except Exception as down:
                raise FlagcxError(f"{what}: the store failed ({down}); is the store server (rank 0 / the launcher) still running?") from exc
            who = [ranks[i] if ranks else i for i in late]
            raise FlagcxTimeout(
                f"{what}: rank(s) {who} did not arrive within {timeout:g} s (a rank crashed, was not started, or is blocked in another call)"
            ) from exc
        raise FlagcxError(f"{what}: the store failed ({exc}); is the store server (rank 0 / the launcher) still running?") from exc


def store_allgather(store, key: str, rank: int, size: int, value: bytes, timeout: float, what: str) -> list[bytes]:
    """Every rank contributes ``value``; every rank gets the list in rank order.

    Each record carries its writer's group size. A rank that sees another size raises
    InvalidArgument naming both, and first fills the keys of the ranks that only the
    larger size has with a note, so that a rank waiting for them raises at once too
    (a rank started with WORLD_SIZE off by one fails fast on every rank, not by timeout).
    """
    try:
        store.set(f"{key}/{rank}", b"%d:" % size + value)
    except Exception as exc:
        raise FlagcxError(f"{what}: cannot write to the store ({exc}); is the store server (rank 0 / the launcher) still running?") from exc
    keys = [f"{key}/{r}" for r in range(size)]
    store_wait(store, keys, timeout, what)
    try:
        raw = [bytes(v) for v in store.multi_get(keys)]
    except Exception as exc:
        raise FlagcxError(f"{what}: the store failed ({exc}); is the store server (rank 0 / the launcher) still running?") from exc
    values = []
    sizes: dict[int, int] = {}
    for r, record in enumerate(raw):
        head, sep, body = record.partition(b":")
        if record.startswith(b"!"):  # another rank's note: the group sizes differ
            raise InvalidArgument(record[1:].decode(errors="replace"), op="init", rank=rank)
        if not sep or not head.isdigit():
            raise InvalidArgument(
                f"{what}: a foreign record sits at store key {keys[r]!r}; use a store (or prefix) of its own for every group", op="init", rank=rank
            )
        sizes[r] = int(head)
        values.append(body)
    if len(set(sizes.values()) | {size}) > 1:
        detail = ", ".join(f"rank {r}: {s}" for r, s in sizes.items())
        note = f"{what}: the ranks were started with different world / group sizes ({detail}); start every rank with the same WORLD_SIZE (or group size)"
        for r in range(size, max(sizes.values())):
            try:
                store.set(f"{key}/{r}", b"!" + note.encode())
            except Exception:  # the note only speeds up the other ranks' failure
                break
        raise InvalidArgument(note, op="init", rank=rank)
    return values


def store_broadcast(store, key: str, rank: int, root: int, value: Optional[bytes], timeout: float, what: str) -> bytes:
    """Root publishes ``value``; every rank returns it."""
    try:
        if rank == root:
            assert value is not None
            store.set(key, value)
            return value
        store_wait(store, [key], timeout, what, ranks=[root])
        return bytes(store.get(key))
    except FlagcxError:
        raise
    except Exception as exc:
        raise FlagcxError(f"{what}: the store failed ({exc}); is the store server (rank 0 / the launcher) still running?") from exc


def require_same(values: Sequence[T], rank: int, what: str, fix: str, *, op: str = "init", ranks: Optional[Sequence[int]] = None) -> T:
    """The one value every rank holds (``values[i]`` is rank ``ranks[i]``'s), else InvalidArgument listing each rank's.

    Every rank holds the same list, so all of them raise together and none is left waiting.
    """
    if len(set(values)) > 1:
        names = ranks if ranks is not None else range(len(values))
        detail = ", ".join(f"rank {r}: {v}" for r, v in zip(names, values))
        raise InvalidArgument(f"ranks disagree on {what} ({detail}); {fix}", op=op, rank=rank)
    return values[0]


def agree(store, key: str, rank: int, size: int, value: str, timeout: float, what: str, fix: str, *, op: str = "init") -> str:
    """Exchange ``value`` through the store and return it once every rank holds the same (see :func:`require_same`)."""
    raw = store_allgather(store, key, rank, size, value.encode(), timeout, f"comparing {what}")
    return require_same([r.decode() for r in raw], rank, what, fix, op=op)


# ---------------------------------------------------------------- naming the peers behind a failure
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


@dataclass(frozen=True)
class LaunchEnv:
    """Rank layout of the running job as its launcher described it."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    launcher: str


def _int_env(*names: str) -> Optional[int]:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def detect_launch_env() -> Optional[LaunchEnv]:
    """Rank and size from mpiexec (Open MPI OMPI_*, MPICH/PMIx PMI_*) or torchrun / flagcx.launch (RANK...).

    MPI variables are checked first: ``prepare_env`` copies them into RANK/WORLD_SIZE,
    and the launcher must still read as mpiexec afterwards.
    """
    rank = _int_env("OMPI_COMM_WORLD_RANK")
    if rank is not None:
        size = _int_env("OMPI_COMM_WORLD_SIZE")
        return LaunchEnv(
            rank,
            size or 1,
            _int_env("OMPI_COMM_WORLD_LOCAL_RANK") or 0,
            _int_env("OMPI_COMM_WORLD_LOCAL_SIZE") or 1,
            "mpiexec",
        )
    rank = _int_env("PMI_RANK", "PMIX_RANK")
    if rank is not None:
        size = _int_env("PMI_SIZE", "PMIX_SIZE") or 1
        return LaunchEnv(rank, size, _int_env("MPI_LOCALRANKID") or 0, _int_env("MPI_LOCALNRANKS") or size, "mpiexec")
    rank = _int_env("RANK")
    size = _int_env("WORLD_SIZE")
    if rank is not None and size is not None:
        local_rank = _int_env("LOCAL_RANK")
        local_size = _int_env("LOCAL_WORLD_SIZE")
        launcher = "flagcx" if os.environ.get("FLAGCX_LAUNCHER") else "torchrun"
        return LaunchEnv(rank, size, rank if local_rank is None else local_rank, size if local_size is None else local_size, launcher)
    return None


def prepare_env() -> LaunchEnv:
    """Make ``init_process_group(backend="flagcx")`` (env://) work under any supported launcher.

    Under mpiexec, RANK/WORLD_SIZE/LOCAL_RANK are copied from the MPI environment and,
    when MASTER_ADDR/MASTER_PORT are unset, rank 0 picks a free port and shares it
    through MPI (needs mpi4py: ``pip install flagcx[mpi]``).
    """
    env = detect_launch_env()
    if env is None:
        raise FlagcxError(
            "no launcher environment found: start the job with torchrun, mpiexec or "
            "'python -m flagcx.launch --nproc N', or set RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT"
        )
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(env.local_size))
    if env.launcher == "mpiexec" and not os.environ.get("MASTER_PORT"):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise FlagcxError("under mpiexec set MASTER_ADDR/MASTER_PORT, or install mpi4py (pip install flagcx[mpi])") from exc
        addr = port = None
        if env.rank == 0:
            addr = os.environ.get("MASTER_ADDR") or advertised_address()
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
        addr, port = MPI.COMM_WORLD.bcast((addr, port), root=0)
        os.environ["MASTER_ADDR"] = os.environ.get("MASTER_ADDR") or addr
        os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    return env


_served: dict[tuple[str, int], dist.TCPStore] = {}
"""The store server this process runs (rank 0 when no launcher serves one), reused by every later communicator."""


def store_from_env(timeout: float) -> dist.Store:
    """A TCPStore client/server from MASTER_ADDR/MASTER_PORT (rank 0 serves unless a launcher does).

    Rank 0 starts the server once per address and port; later calls (a second
    ``Communicator.from_env``) get the same server instead of a second bind of the port.
    """
    env = prepare_env()
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    serve = env.rank == 0 and not agent
    if serve and (addr, port) in _served:
        server = _served[(addr, port)]
        server.set_timeout(timedelta(seconds=timeout))
        return server
    store = dist.TCPStore(addr, port, env.size, is_master=serve, timeout=timedelta(seconds=timeout), wait_for_workers=False)
    if serve:
        _served[(addr, port)] = store
    return store


# ---------------------------------------------------------------- network interfaces
_SIOCGIFFLAGS = 0x8913
_SIOCGIFADDR = 0x8915
_IFF_UP = 0x1


def interface_addresses() -> dict[str, str]:
    """IPv4 address of every interface that is up and has one, by name, in the kernel's interface order."""
    import fcntl
    import struct

    found: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                (flags,) = struct.unpack("H", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, request)[16:18])
                if flags & _IFF_UP:
                    found[name] = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, request)[20:24])
            except OSError:  # no IPv4 address
                continue
    return found


def _is_loopback(addr: str) -> bool:
    return ipaddress.ip_address(addr).is_loopback


def select_interface(spec: str, op: str = "init", rank: Optional[int] = None) -> tuple[str, str]:
    """(name, IPv4 address) of the first interface FLAGCX_SOCKET_IFNAME-style ``spec`` picks.

    NCCL syntax: comma-separated name prefixes; ``=`` first: exact names; ``^`` first:
    every interface except those (and except loopback ones). Raises InvalidArgument
    listing this host's interfaces when nothing matches.
    """
    text = spec.strip()
    exclude = text.startswith("^")
    text = text.removeprefix("^")
    exact = text.startswith("=")
    entries = [e.strip() for e in text.removeprefix("=").split(",") if e.strip()]
    available = interface_addresses()
    for name, addr in available.items():
        hit = any(name == e if exact else name.startswith(e) for e in entries)
        if hit != exclude and not (exclude and _is_loopback(addr)):
            return name, addr
    have = ", ".join(f"{n} ({a})" for n, a in available.items()) or "none"
    example = next((n for n, a in available.items() if not _is_loopback(a)), "eth0")
    raise InvalidArgument(
        f"FLAGCX_SOCKET_IFNAME={spec!r} matches no interface that is up with an IPv4 address on host {socket.gethostname()!r} "
        f"(interfaces here: {have}); set it to one of them, e.g. FLAGCX_SOCKET_IFNAME={example}",
        op=op,
        rank=rank,
    )


def hostname_address() -> Optional[str]:
    """The first non-loopback IPv4 address this host's name resolves to, or None."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return None
    for info in infos:
        addr = str(info[4][0])
        if not _is_loopback(addr):
            return addr
    return None


def route_address(host: str) -> Optional[str]:
    """The local IPv4 address the kernel routes to ``host`` from (a UDP connect: nothing is sent), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def advertised_address() -> str:
    """The address other hosts should reach this one at: FLAGCX_SOCKET_IFNAME's, else the hostname's, else the first non-loopback interface's."""
    spec = get_config().socket_ifname
    if spec:
        return select_interface(spec)[1]
    addr = hostname_address()
    if addr is not None:
        return addr
    others = [a for a in interface_addresses().values() if not _is_loopback(a)]
    return others[0] if others else "127.0.0.1"
