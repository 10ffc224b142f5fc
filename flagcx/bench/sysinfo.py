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


def versions(backends: list[str]) -> dict[str, Optional[str]]:
    """What ran: torch, flagcx (+ commit), NCCL and MPI where known."""
    from .. import __version__

    mpi = None
    if "mpi" in backends:
        from .mpi import library_version

        mpi = library_version()
    return {
        "torch": torch.__version__,
        "flagcx": __version__,
        "flagcx_commit": flagcx_commit(),
        "nccl": nccl_version(),
        "mpi": mpi,
    }


def version_line(info: dict[str, Optional[str]]) -> str:
    """The first preamble line (in place of nccl-tests' '# nccl-tests version ...')."""
    commit = f" (commit {info['flagcx_commit']})" if info.get("flagcx_commit") else ""
    return (
        f"# flagcx-bench version {info['flagcx']}{commit} torch={info['torch']} "
        f"nccl={info.get('nccl') or 'N/A'} mpi={info.get('mpi') or 'N/A'}"
    )


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
