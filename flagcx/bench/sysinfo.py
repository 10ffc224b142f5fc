"""Versions (torch, flagcx and its git commit, NCCL, MPI), host and per-rank device descriptions."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .report import device_line


@lru_cache(maxsize=1)
def flagcx_commit() -> Optional[str]:
    """Short git commit of the flagcx checkout this runs from (None for an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def nccl_version() -> Optional[str]:
    if not (torch.cuda.is_available() and dist.is_nccl_available()):
        return None
    return ".".join(str(v) for v in torch.cuda.nccl.version())


def versions(backends: list[str], device: str) -> dict[str, Optional[str]]:
    """What ran: torch, flagcx (+ commit), and NCCL and MPI where this run uses them (None where it does not)."""
    from .. import __version__

    mpi = None
    if "mpi" in backends:
        from .mpi import library_version

        mpi = library_version()
    return {
        "torch": torch.__version__,
        "flagcx": __version__,
        "flagcx_commit": flagcx_commit(),
        "nccl": nccl_version() if device == "cuda" else None,
        "mpi": mpi,
    }


def version_line(info: dict[str, Optional[str]]) -> str:
    """The first preamble line (in place of nccl-tests' '# nccl-tests version ...'); a library this run does not use reads 'unused'."""
    commit = f" (commit {info['flagcx_commit']})" if info.get("flagcx_commit") else ""
    return f"# flagcx-bench version {info['flagcx']}{commit} torch={info['torch']} nccl={info.get('nccl') or 'unused'} mpi={info.get('mpi') or 'unused'}"


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def load_average() -> Optional[tuple[float, float, float]]:
    """The host's 1, 5 and 15 minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def hostname() -> str:
    return socket.gethostname()


def describe_device(rank: int, device: torch.device) -> str:
    """This rank's '# Using devices' line."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        bus = "%04x:%02x:%02x" % (
            getattr(props, "pci_domain_id", 0),
            getattr(props, "pci_bus_id", 0),
            getattr(props, "pci_device_id", 0),
        )
        return device_line(rank, os.getpid(), hostname(), index, bus, props.name)
    return device_line(rank, os.getpid(), hostname(), -1, "cpu", f"{cpu_model()} ({os.cpu_count()} cpus)")
