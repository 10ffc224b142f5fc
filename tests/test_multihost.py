"""Jobs across hosts, for real: network namespaces with their own hostnames and addresses (tests.helpers.netns), real TCP between them.

- torchrun multi-node rendezvous (c10d, 2 hosts x 2 ranks): every dist.* op on the world,
  a one-host group and a cross-host group, the Communicator matrix subset; hosts come
  from detection alone, shm inside a host and Gloo between hosts automatically;
  FLAGCX_SOCKET_IFNAME (exact, prefix, missing);
- the same with one FLAGCX_CLUSTER_ID per host: the heterogeneous runner across hosts;
- examples/deepseek_v4_oproj.py at world TP 8 / o-group TP 4 on 2 hosts x 4 ranks;
- mpiexec (hydra) with a host list, through an ssh stand-in that enters the namespaces;
- a veth pulled mid-collective: every rank raises a FlagcxError within the timeout.

Hosts whose own name resolves to 127.0.1.1 (``resolve="loopback"``) run the mpiexec
and fault jobs: the rendezvous address and Gloo's interface must then come from the
interfaces and routes, not from the hostname. Root and iproute2 are needed; otherwise
the module is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import pytest

from .helpers.harness import assert_passed
from .helpers.netns import Host, NetnsCluster, leftovers, unavailable_reason
from .test_mpi import _mpiexec
from .test_mpi import _skip_reason as mpi_skip_reason
from .test_v4_example import assert_blocks_single_host

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
RDZV_PORT = 29400
"""Port of the rendezvous store on host 0 (each cluster has its own network stack, so it never clashes)."""
JOB_LIMIT = 150.0
"""Seconds a whole job may run before the test fails (the cluster then kills it)."""

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"namespaced hosts unavailable: {unavailable_reason()}")


def _rank_env(cluster: NetnsCluster, host: Host, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    return {
        "OMP_NUM_THREADS": "1",
        "TORCH_CPP_LOG_LEVEL": "ERROR",  # c10d warns about reverse DNS of the private addresses
        "FLAGCX_TIMEOUT": os.environ.get("FLAGCX_TEST_TIMEOUT", "60"),
        "MULTIHOST_HOSTNAMES": ",".join(h.hostname for h in cluster.hosts),
        "MULTIHOST_ADDRS": ",".join(f"{h.hostname}={h.addr}" for h in cluster.hosts),
        "MULTIHOST_IFNAME": host.ifname,
        **(extra or {}),
    }


def _wait_all(procs: list[tuple[subprocess.Popen, Path]], limit: float) -> None:
    """Wait for every process; fail with the tail of each log if one fails or the job outlives ``limit``."""
    deadline = time.monotonic() + limit
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            break
    bad = [(p, log) for p, log in procs if p.returncode != 0]
    if bad:
        tails = "\n".join(f"--- {log.name} (exit {p.returncode}):\n{log.read_text()[-3000:]}" for p, log in bad)
        raise AssertionError(f"{len(bad)} of {len(procs)} launchers failed or ran past {limit:g} s:\n{tails}")


def _outcomes(out: Path, size: int) -> list[dict]:
    missing = [r for r in range(size) if not (out / f"rank-{r}.json").exists()]
    assert not missing, f"ranks {missing} wrote no outcome"
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(size)]


def torchrun(cluster: NetnsCluster, nproc: int, target: list[str], env: Optional[Mapping[Host, Mapping[str, str]]] = None) -> None:
    """torchrun on every host: c10d rendezvous at host 0, ``nproc`` ranks per host running ``target``."""
    procs = []
    for host in cluster.hosts:
        cmd = [
            *TORCHRUN,
            "--nnodes",
            str(len(cluster.hosts)),
            "--nproc-per-node",
            str(nproc),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"{cluster.hosts[0].addr}:{RDZV_PORT}",
            "--rdzv-id",
            cluster.token,
            "--max-restarts",
            "0",
            *target,
        ]
        log = cluster.workdir / f"torchrun-{host.hostname}.log"
        with open(log, "w") as f:
            proc = cluster.popen(host, cmd, env=_rank_env(cluster, host, (env or {}).get(host)), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        procs.append((proc, log))
    _wait_all(procs, JOB_LIMIT)


def run_suite_torchrun(cluster: NetnsCluster, nproc: int, suite: str, env: Optional[Mapping[Host, Mapping[str, str]]] = None) -> list[dict]:
    out = cluster.workdir / "out"
    out.mkdir()
    torchrun(cluster, nproc, ["-m", "tests.ranks.multihost_runner", suite, str(out)], env)
    return _outcomes(out, nproc * len(cluster.hosts))


def test_torchrun_two_hosts():
    with NetnsCluster(2) as cluster:
        assert_passed(run_suite_torchrun(cluster, 2, "tests.ranks.multihost_suite:torch_world"), min_checks=250)


def test_torchrun_hetero_cluster_per_host():
    with NetnsCluster(2) as cluster:
        env = {h: {"FLAGCX_CLUSTER_ID": f"site-{h.hostname}", "FLAGCX_SOCKET_IFNAME": h.ifname} for h in cluster.hosts}
        assert_passed(run_suite_torchrun(cluster, 2, "tests.ranks.multihost_suite:torch_hetero", env), min_checks=150)


def test_v4_oproj_tp8_ogroup4_two_hosts():
    with NetnsCluster(2) as cluster:
        report = cluster.workdir / "report.json"
        torchrun(cluster, 4, ["examples/deepseek_v4_oproj.py", "--tp", "8", "--ogroup-tp", "4", "--report", str(report)])
        data = json.loads(report.read_text())
        assert data["ok"] and data["max_rel_error"] <= data["tolerance"], data
        assert (data["world_size"], data["tp"], data["ogroup_tp"]) == (8, 8, 4)
        assert_blocks_single_host(data, 2)
        assert sorted({h.split("/")[0] for h in data["hosts"]}) == ["node0", "node1"], data["hosts"]
        assert len(data["ogroup_tp_groups"]) == 2 and all(len(b) == 4 for b in data["ogroup_tp_groups"])


@pytest.mark.mpi
@pytest.mark.skipif(mpi_skip_reason() is not None, reason=mpi_skip_reason() or "")
def test_mpiexec_host_list():
    with NetnsCluster(2, resolve="loopback") as cluster:
        out = cluster.workdir / "out"
        out.mkdir()
        names = ",".join(h.hostname for h in cluster.hosts)
        cmd = [
            _mpiexec(),
            "-launcher",
            "ssh",
            "-launcher-exec",
            str(cluster.ssh_stand_in()),
            "-hosts",
            names,
            "-ppn",
            "2",
            "-n",
            "4",
            sys.executable,
            "-m",
            "tests.ranks.multihost_runner",
            "tests.ranks.multihost_suite:mpi_world",
            str(out),
        ]
        log = cluster.workdir / "mpiexec.log"
        host = cluster.hosts[0]
        with open(log, "w") as f:  # mpiexec runs on the first host, as a user would start it
            proc = cluster.popen(host, cmd, env=_rank_env(cluster, host), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        _wait_all([(proc, log)], JOB_LIMIT)
        assert_passed(_outcomes(out, 4), min_checks=60)


def test_link_down_mid_collective():
    timeout = 5.0
    with NetnsCluster(2, resolve="loopback") as cluster:
        out = cluster.workdir / "out"
        out.mkdir()
        procs = []
        for rank, host in enumerate(cluster.hosts):
            launch = {
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",
                "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": cluster.hosts[0].addr,
                "MASTER_PORT": "29500",
                "FLAGCX_TIMEOUT": str(timeout),
                "MULTIHOST_OUT": str(out),
            }
            log = cluster.workdir / f"rank-{rank}.log"
            cmd = [sys.executable, "-m", "tests.ranks.multihost_runner", "tests.ranks.multihost_suite:link_fault", str(out)]
            with open(log, "w") as f:
                procs.append((cluster.popen(host, cmd, env=_rank_env(cluster, host, launch), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + 90
        while not all((out / f"ready-{r}").exists() for r in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs), "ranks never started their all_reduce loop: " + "".join(
                log.read_text()[-2000:] for _, log in procs
            )
            time.sleep(0.1)
        cluster.set_link(cluster.hosts[1], up=False)
        pulled = time.monotonic()
        _wait_all(procs, timeout + 40)
        exited = time.monotonic() - pulled
        assert_passed(_outcomes(out, 2), min_checks=2)
        assert exited < timeout + 40, f"ranks exited {exited:.1f} s after the link went down"
        for r in range(2):
            took, first = (out / f"error-{r}.txt").read_text().splitlines()[:2]
            print(f"rank {r}: {first} after {took} s; exit {exited:.1f} s after the link went down")
            assert float(took) <= timeout + 15, f"rank {r}: {first} after {took} s"


def test_cluster_teardown_after_failure():
    """A failing test leaves nothing behind, and a run killed before its teardown is swept by the next one."""
    cluster = NetnsCluster(2)
    with pytest.raises(RuntimeError, match="test body failed"):
        with cluster:
            sleeper = cluster.popen(cluster.hosts[1], ["sleep", "600"])
            raise RuntimeError("test body failed")
    assert sleeper.poll() is not None, "a process of the cluster survived its teardown"
    assert leftovers(cluster.resources()) == []
    killed = NetnsCluster(1).__enter__()  # never exited, as if its test run was killed
    gone = subprocess.Popen(["true"])
    gone.wait()
    killed.state_file.write_text(json.dumps({**json.loads(killed.state_file.read_text()), "pid": gone.pid}))
    with NetnsCluster(1):
        assert leftovers(killed.resources()) == [] and not killed.state_file.exists()
