"""Clean-up: destroy and abort leave no shm segment, socket (fd) or thread behind.

One set of 4 ranks (tests.helpers.harness) checks, per CPU transport (Gloo, shm, a heterogeneous
communicator of shm + Gloo clusters) and for the torch.distributed frontend, that
repeated create -> use -> destroy and create -> use (with async ops and a posted recv
left pending) -> abort cycles bring this process's file descriptors, OS threads
(/proc/self/task) and Python threads (threading.enumerate) back to a baseline taken in
the same process, that no segment of ours remains in /dev/shm, and that a destroyed or
aborted communicator refuses further calls with CommAborted. A segment orphaned by a job
whose ranks all died during init (creator SIGKILLed before the others attached) is removed
by the next shm communicator on the host, a segment whose creator lives is not, and a
creator SIGKILLed while its segment is still being built leaves no name at all. The
same checks after a peer is SIGKILLed run in tests/test_faults.py.
"""

from __future__ import annotations

import functools
import gc
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Optional

import pytest
import torch
import torch.distributed as dist

from flagcx import CommAborted, Communicator, RemoteError, config
from flagcx.adapters.shm import SEGMENT_PREFIX, ShmAdapter

from .helpers.harness import assert_passed, run_suite
from .helpers.matrix import Check, subgroup_ranks
from .ranks.fault_rank import resources, settled

SHM_OK = ShmAdapter.unavailable_reason(torch.device("cpu")) is None
CYCLES = 8


_CREATOR = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("_shm", sys.argv[1])
shm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shm)
out, err = shm.ffi.new("fxs_comm **"), shm.ffi.new("char[]", 512)
print(shm.lib.fxs_create(sys.argv[2].encode(), 0, 2, int(sys.argv[3]), 4096, 60.0, out, err, 512), flush=True)
time.sleep(300)
"""


def _orphan(tag: str) -> str:
    """A segment whose creator (rank 0 of 2) is SIGKILLed before rank 1 attached: the name stays in /dev/shm."""
    from flagcx import _shm

    name = f"/{SEGMENT_PREFIX}test-{tag}-{os.urandom(4).hex()}"
    proc = subprocess.Popen([sys.executable, "-c", _CREATOR, _shm.__file__, name, str(1 << 16)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "0", "fxs_create failed"
    finally:
        proc.kill()
        proc.wait()
    assert os.path.exists("/dev/shm" + name)
    return name


@pytest.mark.skipif(not SHM_OK, reason="the shm transport is not built")
def test_sweep_removes_only_segments_whose_creator_died():
    from flagcx._shm import ffi, lib

    dead = _orphan("dead")
    live = f"/{SEGMENT_PREFIX}test-live-{os.urandom(4).hex()}"
    out, err = ffi.new("fxs_comm **"), ffi.new("char[]", 512)
    assert lib.fxs_create(live.encode(), 0, 2, 1 << 16, 4096, 60.0, out, err, 512) == 0
    try:
        assert lib.fxs_sweep(SEGMENT_PREFIX.encode()) >= 1
        assert not os.path.exists("/dev/shm" + dead)
        assert os.path.exists("/dev/shm" + live)  # its creator (this process) is alive: a rank may still attach
    finally:
        lib.fxs_close(out[0], 1)
        lib.fxs_unlink(live.encode())


def _tmpfile_in_dev_shm() -> bool:
    """Whether /dev/shm takes unnamed files (O_TMPFILE), which fxs_create builds segments in."""
    try:
        os.close(os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600))
    except OSError:
        return False
    return True


def _dev_shm_free() -> int:
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize


def _unnamed_segment_open(pid: int) -> bool:
    """Whether process ``pid`` holds a /dev/shm file that has no name yet (an O_TMPFILE)."""
    fds = f"/proc/{pid}/fd"
    try:
        targets = [os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(t.startswith("/dev/shm/") and t.endswith("(deleted)") for t in targets)


@pytest.mark.skipif(not SHM_OK, reason="the shm transport is not built")
@pytest.mark.skipif(not _tmpfile_in_dev_shm(), reason="/dev/shm takes no O_TMPFILE: segments are named from the start there")
@pytest.mark.skipif(_dev_shm_free() < 1 << 30, reason="/dev/shm has under 1 GiB free for the 512 MiB segment")
def test_creator_killed_while_reserving_leaves_no_name():
    """Rank 0 SIGKILLed inside fxs_create, while a 512 MiB segment's memory is being reserved.

    The segment is named only once its header is complete, so the kill leaves nothing in
    /dev/shm (the kernel frees the unnamed file) and the sweep has nothing to find.
    """
    from flagcx import _shm

    name = f"/{SEGMENT_PREFIX}test-reserving-{os.urandom(4).hex()}"
    proc = subprocess.Popen([sys.executable, "-c", _CREATOR, _shm.__file__, name, str(1 << 28)], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        caught = False
        while proc.poll() is None and time.monotonic() < deadline and not os.path.exists("/dev/shm" + name):
            if _unnamed_segment_open(proc.pid):
                caught = True
                break
            time.sleep(0.0002)
        assert caught, "never saw the creator reserve an unnamed segment (named from the start, or too fast to catch)"
    finally:
        proc.kill()
        proc.wait()
    leaked = os.path.exists("/dev/shm" + name)
    if leaked:
        os.unlink("/dev/shm" + name)
    assert not leaked, "a creator killed while reserving its segment's memory left the name behind"


@functools.cache
def _without_proc() -> Optional[list[str]]:
    """A command prefix that runs a process with an empty /proc (a user and mount namespace), or None where it cannot."""
    prefix = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs none /proc && exec "$0" "$@"']
    try:
        ok = subprocess.run([*prefix, "test", "!", "-e", "/proc/self"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if ok else None


@pytest.mark.skipif(not SHM_OK, reason="the shm transport is not built")
@pytest.mark.skipif(_without_proc() is None, reason="cannot start a process without /proc here (unshare -rm)")
def test_creator_without_proc_names_its_segment_from_the_start():
    """Without /proc a segment cannot be named after it is built; it is named from the start and a rank attaches as usual."""
    from flagcx import _shm
    from flagcx._shm import ffi, lib

    name = f"/{SEGMENT_PREFIX}test-noproc-{os.urandom(4).hex()}"
    prefix = _without_proc()
    assert prefix is not None
    proc = subprocess.Popen([*prefix, sys.executable, "-c", _CREATOR, _shm.__file__, name, str(1 << 16)], stdout=subprocess.PIPE, text=True)
    out, err = ffi.new("fxs_comm **"), ffi.new("char[]", 512)
    try:
        assert proc.stdout.readline().strip() == "0", "fxs_create failed without /proc"
        assert lib.fxs_attach(name.encode(), 1, 2, 60.0, out, err, 512) == 0, ffi.string(err)
        assert not os.path.exists("/dev/shm" + name), "the last rank to attach did not unlink the name"
    finally:
        proc.kill()
        proc.wait()
        if out[0] != ffi.NULL:
            lib.fxs_close(out[0], 1)
        if os.path.exists("/dev/shm" + name):
            os.unlink("/dev/shm" + name)


@pytest.mark.skipif(not SHM_OK, reason="the shm transport is not built")
def test_cleanup_after_destroy_and_abort():
    orphan = _orphan("init")  # every rank of a job died during init: the next shm communicator removes it
    assert_passed(run_suite("tests.test_cleanup:cleanup_suite", 4), min_checks=9)
    assert not os.path.exists("/dev/shm" + orphan)


# ---------------------------------------------------------------------- suite run inside the ranks
def _baseline() -> dict:
    gc.collect()
    time.sleep(0.2)
    return resources()


def _segments(comm: Communicator) -> list[str]:
    sets = comm._hetero.lanes.sets() if comm._hetero is not None else [comm._adapters]
    return [n for s in sets if (n := getattr(s.get("cpu"), "segment_name", None))]


def _use(comm: Communicator, pending_recv: bool) -> None:
    """A few sync and async collectives and a send/recv pair; optionally a recv nobody answers, left pending."""
    x = torch.full((1031,), float(comm.rank + 1))
    comm.all_reduce(x)
    assert torch.equal(x, torch.full((1031,), float(comm.size * (comm.size + 1) // 2)))
    out = torch.empty(13 * comm.size)
    works = [comm.all_gather(out, torch.full((13,), float(comm.rank)), async_op=True), comm.barrier(async_op=True)]
    for w in works:
        w.wait()
    assert torch.equal(out, torch.arange(comm.size, dtype=torch.float32).repeat_interleave(13))
    peer = (comm.rank + 1) % comm.size
    left = (comm.rank - 1) % comm.size
    buf = torch.empty(7)
    with comm.group() as handles:
        comm.send(torch.full((7,), float(comm.rank)), peer)
        comm.recv(buf, left)
    handles[0].wait()
    assert torch.equal(buf, torch.full((7,), float(left)))
    if pending_recv:  # never sent: abort must still release everything
        comm.barrier()  # every exchange above is complete on every rank before anyone aborts
        try:
            comm.recv(torch.empty(5), left, async_op=True)
        except RemoteError:  # the left peer aborted already (Gloo: its connection is closed)
            pass


def _cycles(base, rank: int, size: int, label: str, end: str) -> None:
    """CYCLES communicators created, used and ended with ``end`` ("destroy" or "abort"); resources back to the baseline."""
    warm = Communicator(dist.PrefixStore(f"{label}/{end}/warm/", base), rank, size, timeout=30, name=f"{label}-warm")
    _use(warm, False)
    warm.destroy()
    del warm
    baseline = _baseline()
    names = []
    ended = []  # kept alive: destroy / abort itself must release everything, not the garbage collector
    for i in range(CYCLES):
        comm = Communicator(dist.PrefixStore(f"{label}/{end}/{i}/", base), rank, size, timeout=30, name=f"{label}-{end}{i}")
        names += _segments(comm)
        _use(comm, pending_recv=end == "abort")
        getattr(comm, end)()
        for call in (lambda: comm.all_reduce(torch.ones(3)), comm.barrier, lambda: comm.split([0, 1])):
            try:
                call()
            except CommAborted:
                pass
            else:
                raise AssertionError(f"a call on a communicator after {end}() did not raise CommAborted")
        getattr(comm, end)()  # idempotent
        ended.append(comm)
    now = settled(baseline)
    assert now == baseline, f"{label}: after {CYCLES} x {end}: {now} != baseline {baseline}"
    left = [n for n in names if os.path.exists("/dev/shm" + n)]
    assert not left, f"{label}: shm segments left in /dev/shm: {left}"
    assert label == "gloo" or names, f"{label}: no shm segment recorded"


def _configure(settings: dict[str, str]) -> None:
    for key in ("FLAGCX_CPU_ADAPTER", "FLAGCX_CLUSTER_ID"):
        os.environ.pop(key, None)
    os.environ.update(settings)
    config.reload()


def _torch_frontend(base, rank: int, size: int) -> None:
    """init_process_group / new_group / destroy_process_group cycles of the flagcx backend."""
    baseline = None
    for i in range(3):
        dist.init_process_group("flagcx", rank=rank, world_size=size, store=dist.PrefixStore(f"torch{i}/", base), timeout=timedelta(seconds=30))
        sub = dist.new_group(subgroup_ranks(size))
        x = torch.ones(5)
        dist.all_reduce(x)
        assert torch.equal(x, torch.full((5,), float(size)))
        if rank in subgroup_ranks(size):
            dist.all_reduce(x, group=sub)
        dist.barrier()
        dist.destroy_process_group()
        if baseline is None:
            baseline = _baseline()
    now = settled(baseline)
    assert now == baseline, f"torch frontend: {now} != {baseline}"


def cleanup_suite(rank: int, size: int) -> Iterable[Check]:
    """Suite: destroy / abort cycles per transport, then the torch frontend."""
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=60))
    transports: dict[str, dict[str, str]] = {
        "gloo": {"FLAGCX_CPU_ADAPTER": "gloo"},
        "shm": {"FLAGCX_CPU_ADAPTER": "shm"},
        "hetero": {"FLAGCX_CLUSTER_ID": "cl-A" if rank < 2 else "cl-B", "FLAGCX_CPU_ADAPTER": "shm" if rank < 2 else "gloo"},
    }
    for label, settings in transports.items():
        for end in ("destroy", "abort"):
            yield f"{label}/{end}", lambda label=label, settings=settings, end=end: (_configure(settings), _cycles(base, rank, size, label, end))
    yield "reset configuration", lambda: _configure({})
    yield "torch frontend", lambda: _torch_frontend(base, rank, size)
    yield "default transport after cleanup", lambda: _still_works(base, rank, size)


def _still_works(base, rank: int, size: int) -> None:
    comm = Communicator(dist.PrefixStore("final/", base), rank, size, timeout=30, name="final")
    _use(comm, False)
    comm.destroy()
