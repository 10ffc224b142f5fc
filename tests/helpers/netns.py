"""Several hosts on one machine for multi-host tests: network namespaces joined by veth pairs on a private bridge.

:class:`NetnsCluster` creates N network namespaces, each with one interface
(:data:`IFNAME`, the same name on every host, like ``eth0`` on real machines) and its
own IPv4 address on a private /24, all plugged into a bridge that has no address in the
machine's own namespace (nothing outside the cluster can reach it). Commands start
inside a namespace under a fresh UTS namespace with the host's own hostname, so
flagcx's host identity (hostname + boot id) tells the hosts apart, and
``/etc/netns/<ns>/hosts`` (bind-mounted over ``/etc/hosts`` by ``ip netns exec``)
resolves every hostname to its address, or, with ``resolve="loopback"``, each host's
own name to 127.0.1.1 (Debian's default, the classic trap for Gloo).

Names carry a random token, so parallel runs never clash; everything is torn down in
``__exit__`` even when the test failed (processes first, then veths, namespaces, bridge,
hosts files), and a state file under /run lets the next run sweep what a killed run
left behind. Needs root, ``ip`` and ``unshare``: :func:`unavailable_reason` says why not.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

IFNAME = "fxeth0"
"""The interface inside every namespace (FLAGCX_SOCKET_IFNAME names it)."""
SUBNET = "10.213.7"
"""The /24 of the hosts (host i is .(i+1)); private to each cluster's bridge, so runs may share it."""
STATE_DIR = Path("/run/flagcx-netns")
"""One JSON file per live cluster: its owner pid and resources (for sweeping after a killed run)."""
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "FLAGCX_LAUNCHER")
"""Launcher variables a test process may carry; never passed on to the ranks of a namespaced job."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@lru_cache(maxsize=1)
def unavailable_reason() -> Optional[str]:
    """Why namespaced hosts cannot be built here (None when they can): probes a real netns once."""
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and a bridge are created)"
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (iproute2 / util-linux)"
    probe = f"fxprobe-{os.getpid()}-{secrets.token_hex(2)}"
    try:
        _ip("netns", "add", probe)
        run = subprocess.run(
            ["ip", "netns", "exec", probe, "unshare", "--uts", "sh", "-c", "hostname fxprobe && hostname"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if run.stdout.strip() != "fxprobe":
            return f"cannot run in a netns with its own hostname: {run.stderr.strip() or run.stdout.strip()}"
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a network namespace: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class Host:
    """One namespaced host."""

    index: int
    hostname: str
    netns: str
    addr: str
    veth: str
    """The root-namespace end of the host's veth pair (on the bridge)."""
    ifname: str = IFNAME


class NetnsCluster:
    """N hosts on a private bridge (see the module docstring); use as a context manager."""

    def __init__(self, nhosts: int, *, resolve: str = "hosts") -> None:
        if not 1 <= nhosts <= 200:
            raise ValueError(f"nhosts must be in [1, 200], got {nhosts}")
        if resolve not in ("hosts", "loopback"):
            raise ValueError(f"resolve must be 'hosts' or 'loopback', got {resolve!r}")
        self.token = secrets.token_hex(3)
        self.resolve = resolve
        self.bridge = f"fxb{self.token}"
        self.hosts = [Host(i, f"node{i}", f"flagcx-{self.token}-{i}", f"{SUBNET}.{i + 1}", f"fxv{self.token}{i:02d}") for i in range(nhosts)]
        self.workdir = Path(tempfile.mkdtemp(prefix=f"flagcx-netns-{self.token}-"))
        self._procs: list[subprocess.Popen] = []
        self.state_file = STATE_DIR / f"{self.token}.json"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> NetnsCluster:
        sweep_stale()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({"pid": os.getpid(), **self.resources()}))
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.teardown()

    def resources(self) -> dict:
        """Every name this cluster creates (what teardown and sweeps remove)."""
        return {
            "netns": [h.netns for h in self.hosts],
            "links": [h.veth for h in self.hosts] + [self.bridge],
            "etc": [f"/etc/netns/{h.netns}" for h in self.hosts],
            "workdir": str(self.workdir),
        }

    def _build(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for h in self.hosts:
            _ip("netns", "add", h.netns)
            _ip("link", "add", h.veth, "type", "veth", "peer", "name", h.ifname, "netns", h.netns)
            _ip("link", "set", h.veth, "master", self.bridge)
            _ip("link", "set", h.veth, "up")
            _ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", h.ifname)
            _ip("-n", h.netns, "link", "set", h.ifname, "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
            etc = Path(f"/etc/netns/{h.netns}")
            etc.mkdir(parents=True, exist_ok=True)
            lines = ["127.0.0.1 localhost"]
            for other in self.hosts:
                if other is h and self.resolve == "loopback":
                    lines.append(f"127.0.1.1 {other.hostname}")
                else:
                    lines.append(f"{other.addr} {other.hostname}")
            (etc / "hosts").write_text("\n".join(lines) + "\n")

    def teardown(self) -> None:
        """Stop every process this cluster started, delete its links, namespaces and files; raise if any is left."""
        for proc in self._procs:
            _stop(proc)
        for h in self.hosts:
            for pid in _ip("netns", "pids", h.netns, check=False).stdout.split():
                try:  # a process still inside our private namespace: one of ours (e.g. a rank torchrun re-parented)
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        _remove(self.resources())
        self.state_file.unlink(missing_ok=True)
        left = leftovers(self.resources())
        if left:
            raise RuntimeError(f"netns cluster {self.token}: could not remove {left}")

    # ------------------------------------------------------------------ running things
    def command(self, host: Host, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``: its network namespace and a UTS namespace with its hostname."""
        return ["ip", "netns", "exec", host.netns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host.hostname, *argv]

    def popen(self, host: Host, argv: Sequence[str], env: Optional[Mapping[str, str]] = None, **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside ``host`` (own process group, stopped at teardown); ``env`` adds to a clean environment."""
        base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(("FLAGCX_", "GLOO_"))}
        proc = subprocess.Popen(self.command(host, argv), env={**base, **(env or {})}, start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def set_link(self, host: Host, up: bool) -> None:
        """Plug ``host``'s cable in or pull it (its veth end on the bridge goes up / down)."""
        _ip("link", "set", host.veth, "up" if up else "down")

    def ssh_stand_in(self) -> Path:
        """An executable that does what ``ssh [-x] HOST COMMAND...`` would: hydra's ``-launcher-exec`` for these hosts."""
        cases = "\n".join(f"  {h.hostname}) ns={h.netns} ;;" for h in self.hosts)
        script = self.workdir / "netns-ssh"
        script.write_text(
            "#!/bin/sh\n"
            "# ssh stand-in for hydra: [options] HOST COMMAND... runs COMMAND (one shell string, as ssh does) in HOST's namespace\n"
            'while [ "${1#-}" != "$1" ]; do shift; done\n'
            "host=$1; shift\n"
            'case "$host" in\n'
            f"{cases}\n"
            '  *) echo "netns-ssh: unknown host $host" >&2; exit 255 ;;\n'
            "esac\n"
            'exec ip netns exec "$ns" unshare --uts sh -c "hostname $host && exec $*"\n'
        )
        script.chmod(0o755)
        return script


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _remove(res: Mapping) -> None:
    for link in res.get("links", []):  # veths first: deleting one end removes the pair at once
        _ip("link", "del", link, check=False)
    for ns in res.get("netns", []):
        _ip("netns", "del", ns, check=False)
    for etc in res.get("etc", []):
        shutil.rmtree(etc, ignore_errors=True)
    try:
        os.rmdir("/etc/netns")  # only when no other cluster (or tool) uses it
    except OSError:
        pass
    if res.get("workdir"):
        shutil.rmtree(res["workdir"], ignore_errors=True)


def leftovers(res: Mapping) -> list[str]:
    """Resources of ``res`` that still exist (waits up to 5 s for asynchronous link removal)."""
    deadline = time.monotonic() + 5
    while True:
        names = set(_ip("netns", "list", check=False).stdout.split())
        links = _ip("-o", "link", "show", check=False).stdout
        left = [ns for ns in res.get("netns", []) if ns in names]
        left += [link for link in res.get("links", []) if f" {link}:" in links or f" {link}@" in links]
        left += [etc for etc in res.get("etc", []) if os.path.exists(etc)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def sweep_stale() -> None:
    """Remove the resources of clusters whose owning process is gone (a killed test run)."""
    if not STATE_DIR.is_dir():
        return
    for path in STATE_DIR.glob("*.json"):
        try:
            state = json.loads(path.read_text())
            os.kill(int(state["pid"]), 0)
            continue  # owner alive: not ours to touch
        except ProcessLookupError:
            pass
        except (OSError, ValueError, KeyError):
            continue
        _remove(state)
        path.unlink(missing_ok=True)
