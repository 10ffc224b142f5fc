"""Per-rank topology records: which host a rank is on and which device kind it drives.

A record is a small JSON-able dict exchanged through the store when a communicator
is created; the core uses it to pick transports (shm only when every rank shares a
host) and, in heterogeneous mode, to form clusters.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Optional

import torch

from ..config import get as get_config


@lru_cache(maxsize=1)
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "no-boot-id"


def host_identity() -> str:
    """FLAGCX_HOST_ID, else hostname + kernel boot id (ranks with equal ids can share memory)."""
    override = get_config().host_id
    if override:
        return override
    return f"{socket.gethostname()}/{_boot_id()}"


def home_device_type() -> str:
    """The accelerator kind this process drives ("cuda", ...), or "cpu" when it has none."""
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def device_vendor(device_type: str) -> str:
    if device_type == "cuda":
        return "amd" if getattr(torch.version, "hip", None) else "nvidia"
    if device_type == "cpu":
        return "host"
    return device_type


@dataclass(frozen=True)
class RankRecord:
    """What one rank tells the others about itself at communicator creation."""

    host: str
    hostname: str
    pid: int
    device_type: str
    vendor: str
    cluster: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "RankRecord":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def local_record(device_type: Optional[str] = None) -> RankRecord:
    dtype = device_type or home_device_type()
    vendor = device_vendor(dtype)
    cluster = get_config().cluster_id or f"{vendor}:{dtype}"
    return RankRecord(
        host=host_identity(),
        hostname=socket.gethostname(),
        pid=os.getpid(),
        device_type=dtype,
        vendor=vendor,
        cluster=cluster,
    )
