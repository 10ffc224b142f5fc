"""Local launcher: run N ranks on this machine with one command, no torchrun needed.

The parent hosts the TCPStore (so no port race) and starts N spawned processes with
the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT,
TORCHELASTIC_USE_AGENT_STORE=True), so ``init_process_group(backend="flagcx")``
works unchanged inside them. A failing rank stops the others and its traceback is
raised in the parent.

Everything stays on loopback: the store listens on 127.0.0.1 only (torch's TCPStore
would bind every interface), and the ranks get ``GLOO_SOCKET_IFNAME`` set to the
loopback interface unless GLOO_SOCKET_IFNAME or FLAGCX_SOCKET_IFNAME is set.

    python -m flagcx.launch --nproc 4 train.py --lr 0.1
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import runpy
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Optional, Union

from .errors import ConfigError

EnvSpec = Union[None, Mapping[str, str], Callable[[int], Mapping[str, str]]]


class LaunchError(RuntimeError):
    """A rank of a local launch failed."""

    def __init__(self, rank: int, detail: str) -> None:
        super().__init__(f"rank {rank} failed:\n{detail}")
        self.rank = rank
        self.detail = detail


class LaunchInterrupted(LaunchError):
    """The launcher was stopped by a signal (SIGINT, SIGTERM, SIGHUP); every rank was ended."""

    def __init__(self, signum: int, ended: int) -> None:
        self.signum = signum
        super().__init__(-1, f"stopped by {signal.Signals(signum).name}; ended {ended} running rank(s)")

    def __str__(self) -> str:
        return self.detail


class _Stop(BaseException):
    """Raised in the launcher's main thread by SIGTERM / SIGHUP."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _die_with_parent(parent: int) -> None:
    """Have the kernel send this rank SIGTERM when the launcher dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the launcher's own handlers still end the ranks
        return
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)


def _child(fn: Callable, rank: int, size: int, port: int, args: tuple, results, parent: int) -> None:
    _die_with_parent(parent)  # the rank's own variables are already in place: spawn() set them for its start
    # spawn() started this process with SIGINT blocked (a Ctrl-C while Python starts prints pages of
    # tracebacks); take it from here on (a Ctrl-C that came meanwhile is delivered now)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "FLAGCX_LAUNCHER": "1",
        }
    )
    ok, value, code = True, None, 0
    try:
        value = fn(rank, size, *args)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            ok, value, code = False, f"exited with SystemExit({exc.code!r})", exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:  # Ctrl-C reaches every rank of the terminal's process group: the launcher reports it once
        os._exit(130)
    except BaseException as exc:
        ok, value, code = False, _user_traceback(exc), 1
    results.put((rank, ok, value))
    results.close()
    results.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)


def loopback_store(world_size: int, timeout: timedelta = timedelta(seconds=300)):
    """A TCPStore server that listens on 127.0.0.1 only (its port is ``store.port``)."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        # The store takes the listening socket over (and closes it when it is destroyed).
        return dist.TCPStore("127.0.0.1", port, world_size, is_master=True, wait_for_workers=False, timeout=timeout, master_listen_fd=sock.detach())
    finally:
        sock.close()


def _loopback_env() -> dict:
    """GLOO_SOCKET_IFNAME=<loopback interface> for the ranks, unless the user chose an interface."""
    from . import config
    from .bootstrap import interface_addresses

    if os.environ.get("GLOO_SOCKET_IFNAME") or config.get().socket_ifname:
        return {}
    names = [name for name, addr in interface_addresses().items() if addr.startswith("127.")]
    return {"GLOO_SOCKET_IFNAME": names[0]} if names else {}


@contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set, restored afterwards (a spawned child inherits it at start)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rank_env(env: EnvSpec, rank: int) -> dict:
    if env is None:
        return {}
    if callable(env):
        return {k: str(v) for k, v in env(rank).items()}
    return {k: str(v) for k, v in env.items()}


_OWN_FRAMES = (os.path.abspath(__file__), "<frozen runpy>")


def _user_traceback(exc: BaseException) -> str:
    """The traceback without the launcher's and runpy's frames that lead to the user's code."""
    tb = traceback.TracebackException.from_exception(exc)
    frames = list(tb.stack)
    keep = 0
    while keep < len(frames) - 1 and (frames[keep].filename in _OWN_FRAMES or frames[keep].filename.endswith("runpy.py")):
        keep += 1
    tb.stack = traceback.StackSummary.from_list(frames[keep:])
    return "".join(tb.format())


def _exit_text(code: int) -> str:
    """How a rank process ended, as torchrun says it: a signal by name."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def spawn(
    fn: Callable[..., Any],
    nproc: int,
    args: Sequence[Any] = (),
    *,
    env: EnvSpec = None,
    timeout: Optional[float] = None,
) -> list[Any]:
    """Run ``fn(rank, nproc, *args)`` in ``nproc`` fresh processes; return their results in rank order.

    ``env`` adds environment variables to every rank (a dict) or per rank (a callable);
    they are set when the rank starts, before it imports anything. Like torchrun, ranks
    get ``OMP_NUM_THREADS=1`` unless it is set (N ranks of intra-op threads each would
    oversubscribe the cores).
    Raises LaunchError with the first failing rank's traceback; the other ranks are
    terminated. ``timeout`` (seconds) bounds the whole run.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    store = loopback_store(nproc)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs: list = []
    loopback = _loopback_env()
    threads = {} if "OMP_NUM_THREADS" in os.environ or nproc == 1 else {"OMP_NUM_THREADS": "1"}
    deadline = None if timeout is None else time.monotonic() + timeout
    values: dict[int, Any] = {}
    failure: Optional[LaunchError] = None
    interrupted: Optional[int] = None
    ended = 0
    previous = _catch_stop_signals()
    try:
        for rank in range(nproc):
            rank_env = {**threads, **loopback, **_rank_env(env, rank)}
            p = ctx.Process(target=_child, args=(fn, rank, nproc, store.port, tuple(args), results, os.getpid()), daemon=False)
            # in place from the child's first instruction (OpenMP reads it when torch loads); SIGINT blocked
            # until the child runs the rank's code (the mask survives fork and exec)
            with patched_environ(rank_env), _sigint_blocked():
                p.start()
            procs.append(p)
        while len(values) < nproc and failure is None:
            try:
                rank, ok, value = results.get(timeout=0.2)
                if ok:
                    values[rank] = value
                else:
                    failure = LaunchError(rank, value)
                continue
            except queue.Empty:
                pass
            for rank, p in enumerate(procs):
                if rank not in values and p.exitcode is not None:
                    # Give a result that is in flight a moment to arrive.
                    try:
                        r, ok, value = results.get(timeout=1.0)
                        if ok:
                            values[r] = value
                        else:
                            failure = LaunchError(r, value)
                        break
                    except queue.Empty:
                        failure = LaunchError(rank, f"{_exit_text(p.exitcode)} before returning")
                        break
            if deadline is not None and time.monotonic() > deadline and failure is None:
                failure = LaunchError(-1, f"launch timed out after {timeout:g} s; finished ranks: {sorted(values)}")
    except _Stop as exc:
        interrupted = exc.signum
    except KeyboardInterrupt:
        interrupted = signal.SIGINT
    finally:
        _ignore_stop_signals()  # a second Ctrl-C or kill must not cut the clean-up short
        stopping = failure is not None or interrupted is not None
        for p in procs:
            if stopping and p.is_alive():
                p.terminate()
                ended += 1
        for p in procs:
            p.join(timeout=5 if stopping else 10)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
        del store
        _restore_signals(previous)
    if interrupted is not None:
        raise LaunchInterrupted(interrupted, ended)
    if failure is not None:
        raise failure
    return [values[r] for r in range(nproc)]


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread for the block (a Ctrl-C meanwhile arrives when it ends)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _catch_stop_signals() -> Optional[dict]:
    """SIGTERM / SIGHUP raise _Stop in the launcher (SIGINT raises KeyboardInterrupt); None off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {s: signal.getsignal(s) for s in _STOP_SIGNALS}

    def stop(signum: int, frame: Any) -> None:
        raise _Stop(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return previous


def _ignore_stop_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        for s in _STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def _restore_signals(previous: Optional[dict]) -> None:
    if previous is not None:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _run_target(rank: int, size: int, target: list[str], module: bool) -> None:
    sys.argv = list(target)
    if module:
        runpy.run_module(target[0], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target[0], run_name="__main__")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flagcx.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", "--nproc-per-node", type=int, required=True, help="number of local ranks")
    parser.add_argument("-m", dest="module", action="store_true", help="run the target as a module (like python -m)")
    parser.add_argument("target", nargs=argparse.REMAINDER, help="script (or module with -m) and its arguments")
    ns = parser.parse_args(argv)
    if not ns.target:
        parser.error("give a script to run")
    if ns.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {ns.nproc}")
    missing = _missing_target(ns.target[0], ns.module)
    if missing:
        print(f"flagcx.launch: {missing}", file=sys.stderr)
        return 2
    try:
        _check_config()
        spawn(_run_target, ns.nproc, (ns.target, ns.module))
    except ConfigError as exc:
        print(f"flagcx.launch: {exc.detail}", file=sys.stderr)
        return 2
    except LaunchInterrupted as exc:
        print(f"flagcx.launch: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except LaunchError as exc:
        print(f"flagcx.launch: {exc}", file=sys.stderr)
        return 1
    return 0


def _missing_target(target: str, module: bool) -> str:
    """Why ``target`` cannot run ("" when it can be found), checked before any rank starts."""
    if module:
        import importlib.util

        try:
            found = importlib.util.find_spec(target) is not None
        except (ImportError, ValueError):
            found = False
        return "" if found else f"no module named {target!r} (python -m {target} would fail too)"
    return "" if os.path.isfile(target) else f"no such script: {target!r}"


def _check_config() -> None:
    """Read the FLAGCX_* variables once here, so a bad value is one line from the launcher, not a traceback per rank."""
    from . import config

    config.get()


if __name__ == "__main__":
    sys.exit(main())
