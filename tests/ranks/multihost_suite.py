"""Suites that run inside namespaced hosts (tests.helpers.netns) under torchrun or mpiexec: ranks on different hosts.

Each rank learns from its environment what the test set up: ``MULTIHOST_HOSTNAMES``
(the hosts of the job), ``MULTIHOST_ADDRS`` (``hostname=address`` of every host),
``MULTIHOST_IFNAME`` (the hosts' interface) and, for the fault suite, ``MULTIHOST_OUT``
(where to say it is running). Nothing is overridden: hosts come from flagcx's own detection, adapters from
its automatic choice. Suites: ``torch_world`` (every dist.* op on the world, a one-host
and a cross-host group; Communicator matrix subset; interface selection),
``torch_hetero`` (one cluster label per host), ``mpi_world`` (mpiexec with a host list),
``link_fault`` (a cable pulled mid-collective).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional, TypeVar

import torch
import torch.distributed as dist

import flagcx
from flagcx import Communicator, FlagcxError, InvalidArgument
from flagcx.hetero import HeteroAdapter

from ..helpers.harness import flagcx_env
from ..helpers.matrix import Check, error_checks, movement_checks, reduction_checks, subgroup_ranks
from ..helpers.reference import assert_equal, make, reduce_ref
from .hetero_suite import _torch_ring, plan_checks, shm_usable
from .torch_suite import Group, op_checks

T = TypeVar("T")

MATRIX_REDUCE_DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.uint8]
MATRIX_REDUCE_OPS = ["sum", "prod", "max", "min", "avg", "premul_sum"]
MATRIX_MOVE_DTYPES = [torch.float16, torch.int32, torch.bool]
"""The Communicator matrix subset run across hosts (the full matrix runs on one host in tests/test_*)."""
HOST_LOCAL = "shm" if shm_usable() else "gloo"
"""The adapter a group inside one host must get."""


# ---------------------------------------------------------------- helpers
def _listening() -> dict[int, str]:
    """This process's listening TCP sockets: inode -> bound IPv4 address (from /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    bound = {}
    with open("/proc/net/tcp") as f:
        for line in f.read().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and int(cols[9]) in inodes:
                bound[int(cols[9])] = socket.inet_ntoa(bytes.fromhex(cols[1].split(":")[0])[::-1])
    return bound


def new_listeners(make: Callable[[], T]) -> tuple[T, set[str]]:
    """``make()`` and the addresses of the TCP listeners it opened (Gloo's device listens on the address it binds)."""
    before = _listening()
    made = make()
    return made, {addr for inode, addr in _listening().items() if inode not in before}


def _hosts_of(records) -> list[list[int]]:
    """Ranks of every detected host, hosts in order of their first rank."""
    by_host: dict[str, list[int]] = {}
    for r, rec in enumerate(records):
        by_host.setdefault(rec.host, []).append(r)
    return list(by_host.values())


def _check_topology(comm: Communicator, rank: int, size: int) -> None:
    """Detection alone finds the namespaced hosts: one host per hostname, ranks of a host contiguous, links NET."""
    expected = os.environ["MULTIHOST_HOSTNAMES"].split(",")
    hosts = _hosts_of(comm.topology)
    names = [comm.topology[ranks[0]].hostname for ranks in hosts]
    assert sorted(names) == sorted(expected), f"detected hosts {names}, expected {expected}"
    assert comm.topology[rank].hostname == socket.gethostname()
    for ranks in hosts:
        assert ranks == list(range(ranks[0], ranks[0] + len(ranks))), f"host ranks {ranks} not contiguous"
        assert [comm.topology[r].local_rank for r in ranks] == list(range(len(ranks))), "local ranks"
    mine = next(h for h in hosts if rank in h)
    for r in range(size):
        link = comm.topology[rank].link_to(comm.topology[r])
        assert link == ("X" if r == rank else "HOST" if r in mine else "NET"), f"link {rank}->{r} is {link}"


def _check_bound(addrs: set[str], what: str) -> None:
    want = dict(item.split("=") for item in os.environ["MULTIHOST_ADDRS"].split(","))[socket.gethostname()]
    assert addrs == {want}, f"{what}: Gloo listens on {sorted(addrs) or 'nothing new'}, expected this host's {want}"


def _open_with(name: str, **env: str) -> Communicator:
    """A communicator created with extra FLAGCX_* variables in force."""
    with flagcx_env(**env):
        return Communicator.from_env(name=name)


def _expect_bad_ifname(name: str) -> None:
    """Every rank names a missing interface: every rank raises InvalidArgument at creation (nobody waits)."""
    try:
        _open_with(f"bad-ifname-{name}", FLAGCX_SOCKET_IFNAME=name)
    except InvalidArgument as exc:
        text = str(exc)
        for word in ("FLAGCX_SOCKET_IFNAME", name, os.environ["MULTIHOST_IFNAME"], socket.gethostname(), "rank"):
            assert word in text, f"{text!r} lacks {word!r}"
        return
    raise AssertionError(f"FLAGCX_SOCKET_IFNAME={name} did not raise InvalidArgument")


def _ifname_works(rank: int, size: int, spec: str) -> None:
    """Naming the interface (exactly, or by prefix) binds Gloo to it; collectives run across hosts."""
    comm, addrs = new_listeners(lambda: _open_with(f"ifname-{spec}", FLAGCX_SOCKET_IFNAME=spec))
    try:
        assert comm.adapter_name("cpu") == "gloo"
        _check_bound(addrs, f"FLAGCX_SOCKET_IFNAME={spec}")
        inputs = [make(f"ifname/{spec}", r, 1031, torch.float32, "sum") for r in range(size)]
        x = inputs[rank].clone()
        comm.all_reduce(x)
        assert_equal(x, reduce_ref(inputs, "sum"), "all_reduce over the named interface", True)
    finally:
        comm.destroy()


def matrix_subset(g: Optional[Communicator], label: str) -> Iterable[Check]:
    """The Communicator correctness matrix at the dtypes and ops above, plus its error checks."""
    yield from reduction_checks(g, label, dtypes=MATRIX_REDUCE_DTYPES, ops=MATRIX_REDUCE_OPS)
    yield from movement_checks(g, label, dtypes=MATRIX_MOVE_DTYPES)
    yield from error_checks(g, label)


# ---------------------------------------------------------------- suites
def torch_world(rank: int, size: int) -> Iterable[Check]:
    """Suite (torchrun, several hosts): automatic transports, every dist.* op on 3 groups, matrix subset, interfaces."""
    _, addrs = new_listeners(lambda: dist.init_process_group("flagcx"))
    world = dist.group.WORLD
    comm = world.comm
    hosts = _hosts_of(comm.topology)
    host_pgs = [dist.new_group(ranks, backend="flagcx") for ranks in hosts]  # every rank creates every group, same order
    mine = next(i for i, ranks in enumerate(hosts) if rank in ranks)
    cross = subgroup_ranks(size)
    cross_pg = dist.new_group(sorted(cross), backend="flagcx")
    groups = [
        Group("world", world, list(range(size))),
        Group("host", host_pgs[mine], hosts[mine]),
        Group("cross", cross_pg, sorted(cross)),
    ]
    yield "topology", lambda: _check_topology(comm, rank, size)
    yield "world_gloo_bound_to_host_address", lambda: _check_bound(addrs, "world group")

    def adapters() -> None:
        assert len(hosts) > 1 and comm.adapter_name("cpu") == "gloo", comm.adapter_name("cpu")
        assert host_pgs[mine].comm.adapter_name("cpu") == HOST_LOCAL, host_pgs[mine].comm.adapter_name("cpu")
        assert len({comm.topology[r].host for r in cross}) > 1, f"cross group {cross} lies on one host"
        if rank in cross:
            assert cross_pg.comm.adapter_name("cpu") == "gloo"

    yield "adapters_automatic", adapters
    for g in groups:
        yield from op_checks(g)
    matrix = Communicator.from_env(name="mh-matrix")
    yield from matrix_subset(matrix, "matrix")
    yield "socket_ifname_exact", lambda: _ifname_works(rank, size, "=" + os.environ["MULTIHOST_IFNAME"])
    yield "socket_ifname_prefix", lambda: _ifname_works(rank, size, os.environ["MULTIHOST_IFNAME"][:3])
    yield "socket_ifname_missing", lambda: _expect_bad_ifname("nosuch9")
    yield "destroy", lambda: (matrix.destroy(), dist.destroy_process_group())


def torch_hetero(rank: int, size: int) -> Iterable[Check]:
    """Suite (torchrun, FLAGCX_CLUSTER_ID per host, FLAGCX_SOCKET_IFNAME set): hierarchical plans across hosts."""
    dist.init_process_group("flagcx")
    world = dist.group.WORLD

    def layout(c: Communicator) -> None:
        hetero = c._hetero
        assert isinstance(hetero, HeteroAdapter), f"{c.name} is not heterogeneous"
        hosts = _hosts_of(c.topology)
        assert sorted(list(cl.ranks) for cl in c.clusters) == sorted(hosts), f"clusters {c.clusters} != hosts {hosts}"
        assert {cl.label for cl in c.clusters} == {f"site-{h}" for h in os.environ["MULTIHOST_HOSTNAMES"].split(",")}
        assert hetero.lanes.intra is not None and hetero.lanes.intra.adapter_name("cpu") == HOST_LOCAL, "intra-cluster (one host) adapter"
        assert hetero.lanes.peer is not None and hetero.lanes.peer.adapter_name("cpu") == "gloo", "peer lanes (across hosts) adapter"
        assert hetero.lanes.world.adapter_name("cpu") == "gloo"

    yield "world_layout", lambda: layout(world.comm)
    yield "topology", lambda: _check_topology(world.comm, rank, size)
    for name, check in op_checks(Group("world", world, list(range(size)))):
        if not name.endswith("/p2p"):  # its any-source recv is NotSupported by the hierarchical runner (plan_checks asserts that)
            yield name, check
    yield "world/p2p_ring", lambda: _torch_ring(rank, size)
    comm, addrs = new_listeners(lambda: Communicator.from_env(name="mh-hetero"))
    yield "comm_layout", lambda: layout(comm)
    yield "gloo_bound_to_named_interface", lambda: _check_bound(addrs, "heterogeneous communicator (peer lanes and world)")
    yield from matrix_subset(comm, "matrix")
    yield from plan_checks(comm, "plan")
    yield "destroy", lambda: (comm.destroy(), dist.destroy_process_group())


def mpi_world(rank: int, size: int) -> Iterable[Check]:
    """Suite (mpiexec with a host list): rendezvous from the MPI environment, automatic transports, the MPI adapter across hosts."""
    from mpi4py import MPI  # noqa: F401  (MPI_Init opens MPICH's own listeners before Gloo's are counted)

    comm, addrs = new_listeners(lambda: Communicator.from_env(name="mh-mpi"))
    hosts = _hosts_of(comm.topology)
    splits = [comm.split(ranks) for ranks in hosts]  # every rank splits every host's group, in the same order
    me = next(i for i, ranks in enumerate(hosts) if rank in ranks)
    local = splits[me]

    def launch_env() -> None:
        env = flagcx.bootstrap.detect_launch_env()
        assert env is not None and env.launcher == "mpiexec" and (env.rank, env.size) == (rank, size), env
        assert not os.environ["MASTER_ADDR"].startswith("127."), f"MASTER_ADDR {os.environ['MASTER_ADDR']} is loopback"
        assert (env.local_rank, env.local_size) == (hosts[me].index(rank), len(hosts[me])), env

    def adapters() -> None:
        assert comm.adapter_name("cpu") == "gloo", comm.adapter_name("cpu")
        assert local is not None and local.adapter_name("cpu") == HOST_LOCAL, local

    yield "launch_env", launch_env
    yield "topology", lambda: _check_topology(comm, rank, size)
    yield "gloo_bound_by_route", lambda: _check_bound(addrs, "world communicator (the hostname resolves to loopback)")
    yield "adapters_automatic", adapters
    yield from matrix_subset(comm, "world")
    yield from reduction_checks(local, "host", dtypes=[torch.float64], ops=["sum", "max"])
    mpi = _open_with("mh-mpi-adapter", FLAGCX_CPU_ADAPTER="mpi")

    def mpi_adapter() -> None:
        assert mpi.adapter_name("cpu") == "mpi", mpi.adapter_name("cpu")

    yield "mpi_adapter_across_hosts", mpi_adapter
    yield from reduction_checks(mpi, "mpi", dtypes=[torch.float32, torch.int32], ops=["sum", "min", "avg"])
    yield from movement_checks(mpi, "mpi", dtypes=[torch.int16])
    yield "destroy", lambda: (mpi.destroy(), [s.destroy() for s in splits if s is not None], comm.destroy())


def link_fault(rank: int, size: int) -> Iterable[Check]:
    """Suite (one rank per host, started directly): all_reduce in a loop until the test pulls a cable; a FlagcxError must come within the timeout."""
    comm, addrs = new_listeners(lambda: Communicator.from_env(name="mh-fault"))
    yield "gloo_bound_by_route", lambda: _check_bound(addrs, "world communicator (hostname resolves to loopback)")
    yield "raises_within_timeout", lambda: _until_link_fails(comm, rank, size)


def _until_link_fails(comm: Communicator, rank: int, size: int) -> None:
    out = Path(os.environ["MULTIHOST_OUT"])
    x = torch.ones(1 << 16)
    deadline = time.monotonic() + 120
    calls = 0
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            comm.all_reduce(x)
        except FlagcxError as exc:
            took = time.monotonic() - start
            assert calls >= 3, f"failed before the link went down: {exc}"
            assert took <= comm.timeout + 15, f"the failing all_reduce took {took:.1f} s (timeout {comm.timeout:g} s)"
            text = str(exc)
            assert "allreduce" in text and f"rank {rank}" in text, text
            (out / f"error-{rank}.txt").write_text(f"{took:.2f}\n{type(exc).__name__}: {text}\n")
            comm.abort()
            return
        calls += 1
        x.fill_(1.0)
        if calls == 3:
            (out / f"ready-{rank}").touch()
    raise AssertionError(f"no error after {calls} all_reduce calls in 120 s: the link never went down?")
