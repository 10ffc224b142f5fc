"""Security: what our listeners bind to, foreign bytes on our ports, and the shm segments' names and modes.

- ``flagcx.launch``'s TCPStore listens on 127.0.0.1 only (torch binds every interface
  unless handed a listening socket), and its ranks bind Gloo to the loopback interface.
- A foreign process that connects to the store port or to a Gloo port and sends random
  bytes (or a partial message, and then keeps the connection open) neither crashes nor
  corrupts the job: collectives on existing and on new communicators stay exact.
- shm segments are created with mode 0600 (O_EXCL: an existing file of the same name
  is never reused) under 128-bit random names.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import time
from collections.abc import Iterable
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from flagcx import Communicator, config
from flagcx.adapters.shm import SEGMENT_PREFIX, ShmAdapter
from flagcx.launch import loopback_store

from .helpers.harness import assert_passed, run_suite
from .helpers.matrix import Check
from .helpers.reference import assert_equal, make

SHM_OK = ShmAdapter.unavailable_reason(torch.device("cpu")) is None


def listeners(pid: int = 0) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket of process ``pid`` (0: this one), from /proc/net/tcp{,6}."""
    where = "self" if not pid else str(pid)
    inodes = set()
    for fd in os.listdir(f"/proc/{where}/fd"):
        try:
            target = os.readlink(f"/proc/{where}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                hexaddr, hexport = local.split(":")
                raw = bytes.fromhex(hexaddr)
                addr = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian 32-bit words
                found.append((str(ipaddress.ip_address(addr)), int(hexport, 16)))
    return found


def _is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def test_launch_store_listens_on_loopback_only():
    store = loopback_store(1, timedelta(seconds=10))
    mine = [entry for entry in listeners() if entry[1] == store.port]
    assert mine == [("127.0.0.1", store.port)], f"store listeners: {mine}"
    client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=10))
    client.set("k", b"v")
    assert store.get("k") == b"v"
    host = socket.gethostbyname(socket.gethostname())
    others = [a for a in {host, *_non_loopback_addresses()} if not _is_loopback(a)]
    for addr in others:  # not reachable through the host's other addresses
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((addr, store.port)) != 0, f"the store answers on {addr}"


def _non_loopback_addresses() -> list[str]:
    from flagcx.bootstrap import interface_addresses

    return [a for a in interface_addresses().values() if not _is_loopback(a)]


@pytest.mark.skipif(not SHM_OK, reason="the shm transport is not built")
def test_foreign_bytes_do_not_crash_or_corrupt():
    assert_passed(run_suite("tests.test_security:security_suite", 4, env={"FLAGCX_CPU_ADAPTER": "gloo"}), min_checks=6)


@pytest.mark.skipif(not SHM_OK, reason="the shm transport is not built")
def test_shm_segment_is_exclusive():
    """A segment name that already exists is refused (O_EXCL), and the foreign file is left alone."""
    from flagcx.adapters.shm import _ffi, _lib

    name = f"/{SEGMENT_PREFIX}{os.urandom(16).hex()}"
    path = "/dev/shm" + name
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    try:
        os.write(fd, b"planted")
        err = _ffi.new("char[]", 512)
        out = _ffi.new("fxs_comm **")
        rc = _lib.fxs_create(name.encode(), 0, 2, 1 << 16, 1 << 14, 1.0, out, err, len(err))
        assert rc != 0 and out[0] == _ffi.NULL, "an existing segment name was reused"
        assert "exists" in _ffi.string(err).decode(), _ffi.string(err)
        assert os.path.exists(path) and os.pread(fd, 7, 0) == b"planted"
    finally:
        os.close(fd)
        os.unlink(path)


# ---------------------------------------------------------------------- suite run inside the ranks
PAYLOADS = [
    os.urandom(4096),
    b"\xff" * 64,  # huge length fields
    b"\x00" * 64,
    os.urandom(7),  # a partial header
    os.urandom(1 << 16),
]


def _send_garbage(port: int, keep: list) -> None:
    for payload in PAYLOADS:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(payload)
                time.sleep(0.02)
        except OSError:  # the peer closed on us: fine
            pass
    stalled = socket.create_connection(("127.0.0.1", port), timeout=2)
    stalled.sendall(os.urandom(3))  # a partial message on a connection that stays open
    keep.append(stalled)


def _sum_check(comm: Communicator, tag: str) -> None:
    for dtype, n in ((torch.int64, 1031), (torch.float32, 70001), (torch.uint8, 13)):
        inputs = [make(tag, r, n, dtype, "max") for r in range(comm.size)]
        x = inputs[comm.rank].clone()
        comm.all_reduce(x, "max")
        assert_equal(x, torch.stack(inputs).max(0).values, f"{tag} all_reduce max {dtype}")
        out = torch.empty(n * comm.size, dtype=dtype)
        comm.all_gather(out, inputs[comm.rank])
        assert_equal(out, torch.cat(inputs), f"{tag} all_gather {dtype}")


def security_suite(rank: int, size: int) -> Iterable[Check]:
    """Suite: loopback binding of a launched job, foreign bytes on every port, shm segment names and modes."""
    port = int(os.environ["MASTER_PORT"])
    base = dist.TCPStore(os.environ["MASTER_ADDR"], port, is_master=False, timeout=timedelta(seconds=60))
    gloo = Communicator(dist.PrefixStore("gloo/", base), rank, size, timeout=30, name="sec-gloo")
    assert gloo.adapter_name() == "gloo"
    yield "launched on loopback", lambda: _launched_on_loopback()
    yield "gloo listens on loopback only", lambda: _gloo_loopback(base, rank)
    kept: list = []
    yield "foreign bytes on the store and Gloo ports", lambda: _garbage(base, rank, size, port, kept)
    yield "existing communicator still exact", lambda: _sum_check(gloo, "old")
    yield "new communicators still exact", lambda: _new_comms(base, rank, size)
    yield "shm segments: 0600, random names", lambda: _shm_segments(base, rank, size)
    yield "close", lambda: (gloo.destroy(), [s.close() for s in kept])


def _launched_on_loopback() -> None:
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
    from flagcx.bootstrap import interface_addresses

    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    assert ifname and interface_addresses().get(ifname, "").startswith("127."), f"GLOO_SOCKET_IFNAME={ifname!r}"


def _gloo_loopback(base, rank: int) -> None:
    mine = listeners()
    assert mine, "no listening socket found in this rank (Gloo keeps one open)"
    assert all(_is_loopback(addr) for addr, _ in mine), f"rank {rank} listens beyond loopback: {mine}"
    base.set(f"ports/{rank}", ",".join(str(p) for _, p in mine).encode())


def _garbage(base, rank: int, size: int, store_port: int, kept: list) -> None:
    if rank == 0:
        base.wait([f"ports/{r}" for r in range(size)], timedelta(seconds=30))
        ports = [int(p) for r in range(size) for p in base.get(f"ports/{r}").decode().split(",")]
        for p in [store_port, *ports]:
            _send_garbage(p, kept)
        base.set("garbage/done", b"1")
    base.wait(["garbage/done"], timedelta(seconds=60))


def _new_comms(base, rank: int, size: int) -> None:
    new_gloo = Communicator(dist.PrefixStore("gloo-after/", base), rank, size, timeout=30, name="sec-gloo-after")
    _sum_check(new_gloo, "new-gloo")
    new_gloo.destroy()
    os.environ["FLAGCX_CPU_ADAPTER"] = "shm"
    config.reload()
    try:
        shm = Communicator(dist.PrefixStore("shm-after/", base), rank, size, timeout=30, name="sec-shm-after")
        _sum_check(shm, "new-shm")
        shm.destroy()
    finally:
        os.environ["FLAGCX_CPU_ADAPTER"] = "gloo"
        config.reload()


def _shm_segments(base, rank: int, size: int) -> None:
    os.environ["FLAGCX_CPU_ADAPTER"] = "shm"
    config.reload()
    try:
        comms = [Communicator(dist.PrefixStore(f"seg{i}/", base), rank, size, timeout=30, name=f"sec-seg{i}") for i in range(2)]
    finally:
        os.environ["FLAGCX_CPU_ADAPTER"] = "gloo"
        config.reload()
    adapters = [c._adapter(torch.device("cpu"), "test") for c in comms]
    names = [a.segment_name for a in adapters]
    for a in adapters:
        assert a.segment_mode == 0o600, f"segment {a.segment_name} has mode {oct(a.segment_mode)}"
        assert re.fullmatch(rf"/{SEGMENT_PREFIX}[0-9a-f]{{32}}", a.segment_name), a.segment_name
        assert not os.path.exists("/dev/shm" + a.segment_name), "the segment is still linked after every rank attached"
    assert names[0] != names[1]
    for c in comms:
        c.destroy()
