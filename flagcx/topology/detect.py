"""Per-rank topology records: which host a rank is on, which device it drives and how that device is linked.

A record is a small JSON-able dataclass exchanged through the store when a
communicator is created; the core uses it to pick transports (shm only when every
rank shares a host) and, in heterogeneous mode, to form clusters. Detection is cheap
and cached per process (NVML is queried once per device); overrides apply on top, in
this order: detection < FLAGCX_TOPO_FILE (a JSON file the user writes when detection
is wrong, see :func:`load_topo_file`) < FLAGCX_HOST_ID / FLAGCX_CLUSTER_ID.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache, lru_cache
from typing import Any, Optional

import torch

from ..bootstrap import detect_launch_env
from ..config import get as get_config
from ..errors import InvalidArgument

UNKNOWN_LINKS = "unknown"
"""``link_info`` prefix when the link matrix could not be read (no NVML, not NVIDIA...)."""

_NVML_ANCESTOR = {0: "X", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
"""nvmlGpuTopologyLevel_t -> the short names ``nvidia-smi topo -m`` prints."""


@lru_cache(maxsize=1)
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "no-boot-id"


def detected_host() -> str:
    """Hostname + kernel boot id: equal on exactly the processes of one running OS (they can share memory)."""
    return f"{socket.gethostname()}/{_boot_id()}"


def host_identity() -> str:
    """FLAGCX_HOST_ID, else the topology file's ``host``, else hostname + kernel boot id."""
    override = get_config().host_id
    if override:
        return override
    return str(_file_overrides().get("host") or detected_host())


_NO_COLLECTIVES = frozenset({"mps"})
"""Accelerators without a collective library: their ranks count as CPU ranks."""

_VENDORS = {"npu": "huawei", "mlu": "cambricon", "musa": "mthreads", "xpu": "intel", "hpu": "habana", "mtia": "meta"}
"""Vendor of the device types vendors' torch extensions register (the default cluster label is ``vendor:type``)."""


def home_device_type() -> str:
    """The accelerator kind this process drives ("cuda", "npu", "xpu", ...), or "cpu" when it has none.

    ``torch.accelerator.current_accelerator`` names it where torch has it (a vendor's
    torch extension registers its device type there; ROCm reports "cuda"); else CUDA/HIP.
    """
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "current_accelerator"):
        device = accelerator.current_accelerator(check_available=True)
        return "cpu" if device is None or device.type in _NO_COLLECTIVES else device.type
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_vendor(device_type: str) -> str:
    if device_type == "cuda":
        return "amd" if getattr(torch.version, "hip", None) else "nvidia"
    if device_type == "cpu":
        return "host"
    return _VENDORS.get(device_type, device_type)


@dataclass(frozen=True)
class RankRecord:
    """What one rank tells the others about itself at communicator creation."""

    host: str
    """Host identity (ranks with equal values share memory)."""
    hostname: str
    pid: int
    device_type: str
    """torch device type of the rank's home device ("cuda", "cpu", ...)."""
    vendor: str
    cluster: str
    """Cluster label: ranks with equal labels form one homogeneous cluster."""
    local_rank: int = -1
    """The launcher's local rank (-1 when not launched by torchrun / mpiexec / flagcx.launch)."""
    device_index: int = -1
    """Index of the home device in this process's numbering (-1 for cpu)."""
    pci_bus_id: str = ""
    """PCI address of the home device, ``dddddddd:bb:dd.f`` lower case ("" for cpu / unknown)."""
    numa_node: int = -1
    """NUMA node of the device (or of the CPUs the process may run on); -1 when unknown or spanning nodes."""
    links: dict[str, str] = field(default_factory=dict)
    """PCI bus id of every other device on the host -> link from this device (``NV18``, ``PIX``, ``SYS``...)."""
    link_info: str = "n/a"
    """Where ``links`` came from: "nvml", "n/a" (no device), or "unknown: <why>"."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RankRecord:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def link_to(self, other: RankRecord) -> str:
        """The link from this rank's device to ``other``'s: "X" for the same device, "" when not known."""
        if self.host != other.host:
            return "NET"
        if self.pid == other.pid:
            return "X"
        if self.device_type == "cpu" or other.device_type == "cpu":
            return "HOST"
        if self.pci_bus_id and self.pci_bus_id == other.pci_bus_id:
            return "X"
        return self.links.get(other.pci_bus_id, "")


@dataclass(frozen=True)
class PeerRecord:
    """What one rank tells the others when a communicator is created: its topology and the CPU transport it asks for."""

    topo: RankRecord
    cpu_adapter: str
    """FLAGCX_CPU_ADAPTER of that rank (``auto``, ``shm``, ``torch_pg:gloo``...); every rank must ask for the same."""

    def to_json(self) -> dict:
        return {"topo": self.topo.to_json(), "cpu_adapter": self.cpu_adapter}

    @classmethod
    def from_json(cls, data: dict) -> PeerRecord:
        return cls(RankRecord.from_json(data["topo"]), str(data["cpu_adapter"]))


# ---------------------------------------------------------------- the topology file
_OVERRIDABLE = {
    "host": str,
    "cluster": str,
    "device_type": str,
    "vendor": str,
    "local_rank": int,
    "device_index": int,
    "pci_bus_id": str,
    "numa_node": int,
    "links": dict,
}
_SECTIONS = ("default", "hosts", "ranks")


def _file_error(path: str, problem: str) -> InvalidArgument:
    return InvalidArgument(
        f"topology file {path!r} (FLAGCX_TOPO_FILE): {problem}; see flagcx.topology.detect.load_topo_file for the format",
        op="init",
    )


def _check_entry(path: str, where: str, entry: Any) -> dict:
    if not isinstance(entry, dict):
        raise _file_error(path, f"{where} must be an object of fields, got {type(entry).__name__}")
    for key, value in entry.items():
        kind = _OVERRIDABLE.get(key)
        if kind is None:
            raise _file_error(path, f"{where} has unknown field {key!r} (allowed: {', '.join(_OVERRIDABLE)})")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _file_error(path, f"{where}.{key} must be a {kind.__name__}, got {value!r}")
    return entry


def load_topo_file(path: str) -> dict:
    """Read and validate a topology file.

    The file is a JSON object with up to three sections, each mapping to field
    overrides (``host``, ``cluster``, ``device_type``, ``vendor``, ``local_rank``,
    ``device_index``, ``pci_bus_id``, ``numa_node``, ``links``)::

        {"default": {"cluster": "site-a"},
         "hosts": {"node7": {"cluster": "gpu-pool"}, "node7:1": {"device_type": "cpu"}},
         "ranks": {"3": {"cluster": "cpu-pool", "host": "node7"}}}

    A process takes ``default``, then ``hosts[<hostname>]``, then
    ``hosts[<hostname>:<local rank>]``, then ``ranks[<global rank>]`` (the launcher's
    RANK), later entries winning.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise _file_error(path, f"cannot be read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise _file_error(path, f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _file_error(path, "must hold a JSON object")
    for section, body in data.items():
        if section not in _SECTIONS:
            raise _file_error(path, f"has unknown section {section!r} (allowed: {', '.join(_SECTIONS)})")
        if section == "default":
            _check_entry(path, "default", body)
            continue
        if not isinstance(body, dict):
            raise _file_error(path, f"section {section!r} must map names to objects")
        for key, entry in body.items():
            if section == "ranks" and not key.isdigit():
                raise _file_error(path, f"ranks key {key!r} is not a global rank number")
            _check_entry(path, f"{section}[{key!r}]", entry)
    return data


def _file_overrides() -> dict:
    """The fields the topology file sets for this process ({} without a file)."""
    path = get_config().topo_file
    if not path:
        return {}
    data = load_topo_file(path)
    env = detect_launch_env()
    hostname = socket.gethostname()
    merged: dict = dict(data.get("default", {}))
    hosts = data.get("hosts", {})
    merged.update(hosts.get(hostname, {}))
    if env is not None:
        merged.update(hosts.get(f"{hostname}:{env.local_rank}", {}))
        merged.update(data.get("ranks", {}).get(str(env.rank), {}))
    return merged


# ---------------------------------------------------------------- device detection
def _bus_id(domain: int, bus: int, device: int) -> str:
    return f"{domain:08x}:{bus:02x}:{device:02x}.0"


def _normal_bus_id(raw: Any) -> str:
    """NVML / sysfs bus ids in one spelling: 8-digit domain, lower case."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    text = text.strip().lower()
    domain, _, rest = text.partition(":")
    return f"{int(domain, 16):08x}:{rest}" if rest else text


def _pci_numa_node(bus_id: str) -> int:
    domain, _, rest = bus_id.partition(":")
    sysfs = f"/sys/bus/pci/devices/{int(domain, 16):04x}:{rest}/numa_node"
    try:
        with open(sysfs) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return -1


def _cpulist(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, or the machine's count where there is none."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@lru_cache(maxsize=1)
def _cpu_numa_node() -> int:
    """The NUMA node holding every CPU this process may run on, else -1."""
    base = "/sys/devices/system/node"
    try:
        allowed = os.sched_getaffinity(0)
        nodes = [d for d in os.listdir(base) if d.startswith("node") and d[4:].isdigit()]
    except OSError:
        return -1
    holding = []
    for node in nodes:
        try:
            with open(f"{base}/{node}/cpulist") as f:
                if allowed & _cpulist(f.read()):
                    holding.append(int(node[4:]))
        except (OSError, ValueError):
            return -1
    return holding[0] if len(holding) == 1 else -1


def _nvml_links(bus_id: str) -> tuple[dict[str, str], str]:
    """Link from device ``bus_id`` to every other NVIDIA device of the host, via NVML."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return {}, f"{UNKNOWN_LINKS}: pynvml not importable (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError subclasses: no driver, no permission...
        return {}, f"{UNKNOWN_LINKS}: nvmlInit failed ({exc})"
    try:
        me = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id.upper().encode())
        direct: dict[str, int] = {}
        active = 0
        for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
            try:
                if not pynvml.nvmlDeviceGetNvLinkState(me, link):
                    continue
            except pynvml.NVMLError:
                continue
            active += 1
            try:
                remote = _normal_bus_id(pynvml.nvmlDeviceGetNvLinkRemotePciInfo(me, link).busId)
                direct[remote] = direct.get(remote, 0) + 1
            except pynvml.NVMLError:
                pass
        links: dict[str, str] = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            other = pynvml.nvmlDeviceGetHandleByIndex(i)
            other_id = _normal_bus_id(pynvml.nvmlDeviceGetPciInfo(other).busId)
            if other_id == bus_id:
                continue
            if direct.get(other_id):
                links[other_id] = f"NV{direct[other_id]}"
                continue
            try:
                nvlink_p2p = pynvml.nvmlDeviceGetP2PStatus(me, other, pynvml.NVML_P2P_CAPS_INDEX_NVLINK) == pynvml.NVML_P2P_STATUS_OK
            except pynvml.NVMLError:
                nvlink_p2p = False
            if nvlink_p2p and active:  # through NVSwitch: every active link reaches the peer
                links[other_id] = f"NV{active}"
                continue
            level = pynvml.nvmlDeviceGetTopologyCommonAncestor(me, other)
            links[other_id] = _NVML_ANCESTOR.get(int(level), f"L{int(level)}")
        return links, "nvml"
    except Exception as exc:
        return {}, f"{UNKNOWN_LINKS}: NVML query failed ({exc})"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


@cache
def _device_facts(device_type: str, index: int) -> tuple[str, int, tuple[tuple[str, str], ...], str]:
    """(pci bus id, numa node, links, link_info) of one device, detected once per process."""
    if device_type != "cuda":
        return "", -1, (), f"{UNKNOWN_LINKS}: no link detection for {device_type} devices"
    props = torch.cuda.get_device_properties(index)
    if not hasattr(props, "pci_bus_id"):
        return "", -1, (), f"{UNKNOWN_LINKS}: this torch does not report PCI bus ids"
    bus_id = _bus_id(getattr(props, "pci_domain_id", 0), props.pci_bus_id, getattr(props, "pci_device_id", 0))
    if getattr(torch.version, "hip", None):
        return bus_id, _pci_numa_node(bus_id), (), f"{UNKNOWN_LINKS}: no link detection on ROCm"
    links, info = _nvml_links(bus_id)
    return bus_id, _pci_numa_node(bus_id), tuple(sorted(links.items())), info


def local_record(device_type: Optional[str] = None) -> RankRecord:
    """This process's record: detection, then the topology file, then FLAGCX_HOST_ID / FLAGCX_CLUSTER_ID."""
    cfg = get_config()
    over = _file_overrides()
    dtype = str(over.get("device_type") or device_type or home_device_type())
    vendor = str(over.get("vendor") or device_vendor(dtype))
    env = detect_launch_env()
    index = -1
    links: tuple[tuple[str, str], ...] = ()
    bus_id, numa, info = "", _cpu_numa_node(), "n/a"
    if dtype != "cpu" and dtype == home_device_type():
        index = int(torch.get_device_module(dtype).current_device())
        bus_id, dev_numa, links, info = _device_facts(dtype, index)
        numa = dev_numa if dev_numa >= 0 else numa
    record = RankRecord(
        host=host_identity(),
        hostname=socket.gethostname(),
        pid=os.getpid(),
        device_type=dtype,
        vendor=vendor,
        cluster=f"{vendor}:{dtype}",
        local_rank=env.local_rank if env is not None else -1,
        device_index=index,
        pci_bus_id=bus_id,
        numa_node=numa,
        links=dict(links),
        link_info=info,
    )
    fixed = {k: v for k, v in over.items() if k in _OVERRIDABLE and k not in ("device_type", "vendor", "host")}
    if "pci_bus_id" in fixed:
        fixed["pci_bus_id"] = _normal_bus_id(fixed["pci_bus_id"])
    if "links" in fixed:
        fixed["links"] = {_normal_bus_id(k): str(v) for k, v in fixed["links"].items()}
        fixed.setdefault("link_info", "topology file")
    record = replace(record, **fixed)
    if cfg.cluster_id:
        record = replace(record, cluster=cfg.cluster_id)
    return record
