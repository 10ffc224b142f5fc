"""Every user-facing FLAGCX_* environment variable is read here, and only here, with its default.

Other modules call :func:`get` and read attributes; tests that change the
environment call :func:`reload`. The ``DEFAULT_*`` constants below are what a variable
means when it is unset (and when the caller gave nothing either); the :class:`Config`
field of each variable says which one applies. Logging for the whole package is
configured here from ``FLAGCX_DEBUG``. (``FLAGCX_LAUNCHER`` is not configuration: the
launcher sets it for its children, and :mod:`flagcx.bootstrap` reads it.)
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
from dataclasses import dataclass

from .errors import ConfigError

_LEVELS = {
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "INFO": logging.INFO,
    "DEBUG": logging.DEBUG,
    "TRACE": logging.DEBUG,
}

# ---------------------------------------------------------------- defaults of the variables below
DEFAULT_TIMEOUT = 600.0
"""FLAGCX_TIMEOUT unset and no timeout given to the communicator: seconds a blocking wait may last."""
LANE_WAIT_FACTOR = 2
"""A heterogeneous communicator waits for a staged chunk this many times its timeout (the chunk's own waits come first)."""
DEFAULT_HETERO_CHUNK = 4 << 20
"""FLAGCX_HETERO_CHUNK unset and some cluster drives devices: bytes per staged chunk (no device cluster: unchunked)."""
DEFAULT_HETERO_LANES = 4
"""FLAGCX_HETERO_LANES unset and some cluster drives devices: chunks moved in parallel (no device cluster: 1)."""
DEFAULT_SHM_BUFFER = 1 << 20
"""FLAGCX_SHM_BUFFER unset, one thread per rank: staging bytes per rank for collectives (halves of 512 KiB stay in L2)."""
THREADED_SHM_BUFFER = 4 << 20
"""FLAGCX_SHM_BUFFER unset, several threads per rank: staging bytes per rank (each thread's range of a step stays large)."""
MAX_SHM_THREADS = 8
"""FLAGCX_SHM_THREADS unset: threads per rank are the rank's share of 3/4 of its cpus, at most this many."""
DEFAULT_SHM_P2P_BUFFER = 1 << 20
"""FLAGCX_SHM_P2P_BUFFER unset: ring bytes per ordered pair of ranks (less beyond 5 ranks, see SHM_P2P_BUDGET)."""
SHM_P2P_BUDGET = 4 << 20
"""FLAGCX_SHM_P2P_BUFFER unset: ring bytes per rank over all its peers; rings shrink (to 16 KiB at least) for large groups."""
DEFAULT_SHM_SINGLE_COPY = 64 << 10
"""FLAGCX_SHM_SINGLE_COPY unset: messages (send/recv) and blocks (alltoall; allgather from 256 KiB at least) from this many bytes are read straight out of the peer's memory."""

DEFAULT_TRACE_BUFFER = 2000
"""FLAGCX_TRACE_BUFFER unset: calls each communicator's flight recorder keeps (torch's recorder keeps 2000 too)."""

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
ADAPTER_ENTRY_POINTS = "flagcx.adapters"
"""Entry-point group of adapter plugins (read by flagcx.adapters.plugins; here to check FLAGCX_CPU_ADAPTER)."""
CPU_ADAPTERS = ("shm", "gloo", "mpi")
"""Builtin FLAGCX_CPU_ADAPTER values besides ``auto``."""
VARIABLES = (
    "FLAGCX_DEBUG",
    "FLAGCX_TIMEOUT",
    "FLAGCX_CPU_ADAPTER",
    "FLAGCX_HOST_ID",
    "FLAGCX_CLUSTER_ID",
    "FLAGCX_CHECK",
    "FLAGCX_NCCL_LIB",
    "FLAGCX_NCCL_CLONES",
    "FLAGCX_TOPO_FILE",
    "FLAGCX_HETERO_CHUNK",
    "FLAGCX_HETERO_LANES",
    "FLAGCX_HETERO_ALLREDUCE",
    "FLAGCX_SHM_BUFFER",
    "FLAGCX_SHM_P2P_BUFFER",
    "FLAGCX_SHM_THREADS",
    "FLAGCX_SHM_SINGLE_COPY",
    "FLAGCX_VENDOR_BACKEND",
    "FLAGCX_DEVICE_ADAPTER",
    "FLAGCX_ADAPTER_PLUGIN",
    "FLAGCX_SOCKET_IFNAME",
    "FLAGCX_TRACE_BUFFER",
    "FLAGCX_TRACE_STACK",
    "FLAGCX_VLLM",
    "FLAGCX_NCCL_WATCHDOG",
    "FLAGCX_FAST_ALLREDUCE",
    "FLAGCX_LAUNCHER",
)
"""Every FLAGCX_* variable flagcx reads (FLAGCX_LAUNCHER is set by flagcx.launch for its ranks)."""
_warned: set[str] = set()
log = logging.getLogger("flagcx.config")


@dataclass(frozen=True)
class Config:
    """A snapshot of the FLAGCX_* environment."""

    debug: str | None
    """FLAGCX_DEBUG: log level (WARN, INFO, DEBUG) of flagcx's own stderr handler; unset, flagcx's records go to the application's logging."""
    timeout: float | None
    """FLAGCX_TIMEOUT: seconds; overrides the timeout given to a communicator (neither: DEFAULT_TIMEOUT)."""
    cpu_adapter: str
    """FLAGCX_CPU_ADAPTER: auto | shm | gloo | mpi | a plugin adapter's name, the transport for CPU tensors; ``torch_pg:<backend>`` when FLAGCX_VENDOR_BACKEND has a ``cpu:<backend>`` entry (that entry wins)."""
    host_id: str | None
    """FLAGCX_HOST_ID: host identity override (ranks with equal ids share memory)."""
    cluster_id: str | None
    """FLAGCX_CLUSTER_ID: cluster label override (heterogeneous mode)."""
    check: bool = False
    """FLAGCX_CHECK: 1 compares every collective's (op, dtype, size, root, reduce op, sequence) across ranks first."""
    nccl_lib: str | None = None
    """FLAGCX_NCCL_LIB: path of the NCCL (or NCCL-API clone) library to load, instead of searching."""
    nccl_clones: tuple[tuple[str, str], ...] = ()
    """FLAGCX_NCCL_CLONES: extra NCCL-API libraries as ``library:prefix`` pairs, comma-separated (``libfoo.so:foo``)."""
    topo_file: str | None = None
    """FLAGCX_TOPO_FILE: JSON file overriding detected topology fields (cluster, host, device...) per rank or host."""
    hetero_chunk: int | None = None
    """FLAGCX_HETERO_CHUNK: bytes per staged chunk between clusters (suffix K/M/G allowed); DEFAULT_HETERO_CHUNK with device clusters, unchunked otherwise."""
    hetero_lanes: int | None = None
    """FLAGCX_HETERO_LANES: chunks moved in parallel between clusters (one host transport each); DEFAULT_HETERO_LANES with device clusters, else 1."""
    hetero_allreduce: str = "auto"
    """FLAGCX_HETERO_ALLREDUCE: auto | hierarchical | flat, the heterogeneous allreduce plan; auto times both on the first calls of each size class and keeps the faster."""
    shm_buffer: int | None = None
    """FLAGCX_SHM_BUFFER: staging bytes per rank of the shm transport's collectives (suffix K/M/G allowed); DEFAULT_SHM_BUFFER, or THREADED_SHM_BUFFER with several threads per rank."""
    shm_threads: int | None = None
    """FLAGCX_SHM_THREADS: threads per rank that split the shm transport's large copies and reductions; default the rank's share of 3/4 of the cpus it may run on (at most MAX_SHM_THREADS; 1 when ranks fill the cpus)."""
    shm_p2p_buffer: int | None = None
    """FLAGCX_SHM_P2P_BUFFER: ring bytes per ordered pair of ranks for shm send/recv (suffix K/M/G allowed); DEFAULT_SHM_P2P_BUFFER, less beyond 5 ranks (SHM_P2P_BUDGET)."""
    shm_single_copy: int = DEFAULT_SHM_SINGLE_COPY
    """FLAGCX_SHM_SINGLE_COPY: from this many bytes per message or block, shm send/recv and alltoall (allgather: from 256 KiB at least) read the data straight out of the peer's memory (cross-memory attach: one copy instead of two through the segment; used only where every rank may read every other's memory); 0 or off: never."""
    socket_ifname: str | None = None
    """FLAGCX_SOCKET_IFNAME: network interface of the inter-host transport (Gloo) and of the mpiexec rendezvous address, NCCL syntax: comma-separated name prefixes, ``=`` first for exact names, ``^`` first to exclude; the first matching interface with an IPv4 address is used."""
    vendor_backends: tuple[tuple[str, str], ...] = ()
    """FLAGCX_VENDOR_BACKEND: c10d backends run through the torch_pg adapter, ``backend`` (for this process's accelerator) or ``type:backend`` pairs, comma-separated (``hccl``, ``npu:hccl,cpu:gloo``); ("", backend) stands for the accelerator. Wins over FLAGCX_DEVICE_ADAPTER and, for cpu, over FLAGCX_CPU_ADAPTER."""
    device_adapters: tuple[tuple[str, str], ...] = ()
    """FLAGCX_DEVICE_ADAPTER: adapter per accelerator device type, ``type:name`` pairs, comma-separated (``npu:myccl``; a builtin or plugin adapter name); wins over the builtin choice (cuda: nccl) and torch's default c10d backend of the device type."""
    adapter_plugins: tuple[str, ...] = ()
    """FLAGCX_ADAPTER_PLUGIN: extra adapter classes as ``module:Class``, comma-separated, added to the ``flagcx.adapters`` entry points; loaded and validated on the first lookup of a non-builtin adapter name."""
    fast_allreduce: bool = False
    """FLAGCX_FAST_ALLREDUCE: 1 sends small CUDA SUM allreduces of ranks on one host through peer-mapped buffers (flagcx.adapters.nccl.ipc_allreduce); 0, the default until its crossovers are measured on two or more GPUs, keeps NCCL."""
    trace_buffer: int = DEFAULT_TRACE_BUFFER
    """FLAGCX_TRACE_BUFFER: calls kept per communicator by the flight recorder (flagcx.flight); 0 turns the recorder off."""
    trace_stack: bool = False
    """FLAGCX_TRACE_STACK: 1 keeps the caller's Python frames with each recorded call (costs a stack walk per call; switches the fast path off)."""
    vllm: bool = False
    """FLAGCX_VLLM: 1 activates flagcx's vLLM platform plugin (vLLM's groups on flagcx); 0, the default, leaves vLLM alone."""
    nccl_watchdog: bool = True
    """FLAGCX_NCCL_WATCHDOG: 1 (default) runs the watchdog thread that aborts an NCCL communicator whose op outlives the timeout (one CUDA event per launch); 0 turns it off."""


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _parse_timeout(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"FLAGCX_TIMEOUT={raw!r} is not a number of seconds; set e.g. FLAGCX_TIMEOUT=300") from None
    if value <= 0:
        raise ConfigError(f"FLAGCX_TIMEOUT={raw!r} must be positive; set e.g. FLAGCX_TIMEOUT=300")
    return value


def _parse_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    raw = (_env(name) or default).lower()
    if raw not in choices:
        raise ConfigError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return raw


def _parse_clones(raw: str | None) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    pairs = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        library, sep, prefix = item.rpartition(":")
        library, prefix = library.strip(), prefix.strip()
        if not sep or not library or not prefix.isidentifier():
            raise ConfigError(
                f"FLAGCX_NCCL_CLONES entry {item!r} is not 'library:prefix'; write e.g. FLAGCX_NCCL_CLONES=libmccl.so:mccl,/opt/x/libfoo.so.1:foo"
            )
        pairs.append((library, prefix))
    return tuple(pairs)


def _parse_count(name: str, raw: str | None) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{name}={raw!r} is not a positive integer; write e.g. {name}=4")
    return int(raw)


def _parse_size(name: str, raw: str | None, default: int) -> int:
    if raw is None:
        return default
    if not raw.isdigit():
        raise ConfigError(f"{name}={raw!r} is not a whole number; write e.g. {name}={default} (0 turns it off)")
    return int(raw)


def _parse_bytes(name: str, raw: str | None) -> int | None:
    if raw is None:
        return None
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(raw[-1:].upper(), 1)
    digits = raw[:-1] if scale > 1 else raw
    try:
        value = int(digits) * scale
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a byte count; write e.g. {name}=4M") from None
    if value < 1:
        raise ConfigError(f"{name}={raw!r} must be positive; write e.g. {name}=4M")
    return value


def _parse_threshold(name: str, raw: str | None, default: int) -> int:
    """A byte count where 0 or ``off`` turns the feature off."""
    if raw is None:
        return default
    if raw.strip().lower() in ("0", "off"):
        return 0
    value = _parse_bytes(name, raw.strip())
    assert value is not None
    return value


def _parse_ifname(raw: str | None) -> str | None:
    if raw is None:
        return None
    names = raw.removeprefix("^").removeprefix("=")
    if not [n for n in names.split(",") if n.strip()]:
        raise ConfigError(
            f"FLAGCX_SOCKET_IFNAME={raw!r} names no interface; write e.g. FLAGCX_SOCKET_IFNAME=eth (prefix), =eth0 (exact) or ^docker,lo (exclude)"
        )
    return raw


def _pairs(name: str, raw: str | None, example: str, bare: bool) -> tuple[tuple[str, str], ...]:
    """``type:value`` items of a comma list (``("", value)`` for a bare item where ``bare``), device types distinct."""
    if raw is None:
        return ()
    pairs: list[tuple[str, str]] = []
    for item in raw.lower().split(","):
        item = item.strip()
        if not item:
            continue
        device, sep, value = item.rpartition(":")
        device, value = device.strip(), value.strip()
        if (not sep and not bare) or (sep and not _NAME.match(device)) or not _NAME.match(value):
            form = "'name' or 'type:name'" if bare else "'type:name'"
            raise ConfigError(f"{name} entry {item!r} is not {form}; write e.g. {name}={example}")
        if device in (d for d, _ in pairs):
            raise ConfigError(f"{name}={raw!r} names {device or 'the accelerator'} twice; give each device type one entry")
        pairs.append((device, value))
    return tuple(pairs)


def _parse_vendor_backends(raw: str | None) -> tuple[tuple[str, str], ...]:
    pairs = _pairs("FLAGCX_VENDOR_BACKEND", raw, "npu:hccl,cpu:gloo", bare=True)
    for _device, backend in pairs:
        if backend == "flagcx":
            raise ConfigError("FLAGCX_VENDOR_BACKEND cannot name 'flagcx' itself; name the vendor's c10d backend (hccl, cncl, xccl, gloo, nccl...)")
    return pairs


def _parse_device_adapters(raw: str | None) -> tuple[tuple[str, str], ...]:
    pairs = _pairs("FLAGCX_DEVICE_ADAPTER", raw, "npu:myccl", bare=False)
    for device, _ in pairs:
        if device == "cpu":
            raise ConfigError("FLAGCX_DEVICE_ADAPTER is for accelerators; choose the CPU transport with FLAGCX_CPU_ADAPTER")
    return pairs


def _parse_cpu_adapter(raw: str | None, vendor: str | None) -> str:
    backend = dict(_parse_vendor_backends(vendor)).get("cpu")
    if backend is not None:
        return f"torch_pg:{backend}"
    name = (raw or "auto").lower()
    if name == "torch_pg":
        raise ConfigError("FLAGCX_CPU_ADAPTER=torch_pg needs a c10d backend; set FLAGCX_VENDOR_BACKEND=cpu:<backend> instead")
    if not _NAME.match(name):
        raise ConfigError(f"FLAGCX_CPU_ADAPTER={name!r} is not an adapter name; write auto, shm, gloo, mpi or a plugin adapter's name")
    builtin = ("auto", *CPU_ADAPTERS)
    if name not in builtin and not _env("FLAGCX_ADAPTER_PLUGIN"):  # plugins named there are known only once loaded
        from importlib.metadata import entry_points  # only for a name that is no builtin (it costs ~5 ms)

        plugins = sorted({ep.name for ep in entry_points(group=ADAPTER_ENTRY_POINTS)})
        if name not in plugins:
            close = difflib.get_close_matches(name, [*builtin, *plugins], n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(
                f"FLAGCX_CPU_ADAPTER={name!r} is no adapter; {hint}write one of {', '.join([*builtin, *plugins])} "
                "(or a plugin adapter's module:Class in FLAGCX_ADAPTER_PLUGIN)"
            )
    return name


def _warn_unknown_names() -> None:
    """A FLAGCX_* variable that is one typo away from a known one is named once per process, with the known one."""
    for name in os.environ:
        if not name.startswith("FLAGCX_") or name in VARIABLES or name in _warned:
            continue
        close = difflib.get_close_matches(name, VARIABLES, n=1, cutoff=0.8)
        if close:
            _warned.add(name)
            log.warning("%s is not a flagcx variable and is ignored; did you mean %s?", name, close[0])


def _parse_plugins(raw: str | None) -> tuple[str, ...]:
    if raw is None:
        return ()
    targets = tuple(t.strip() for t in raw.split(",") if t.strip())
    for target in targets:
        module, sep, attr = target.partition(":")
        if not sep or not attr.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
            raise ConfigError(f"FLAGCX_ADAPTER_PLUGIN entry {target!r} is not 'module:Class'; write e.g. FLAGCX_ADAPTER_PLUGIN=my_pkg.adapter:MyAdapter")
    return targets


def _load() -> Config:
    _warn_unknown_names()
    return Config(
        debug=(_env("FLAGCX_DEBUG") or "").upper() or None,
        timeout=_parse_timeout(_env("FLAGCX_TIMEOUT")),
        cpu_adapter=_parse_cpu_adapter(_env("FLAGCX_CPU_ADAPTER"), _env("FLAGCX_VENDOR_BACKEND")),
        host_id=_env("FLAGCX_HOST_ID"),
        cluster_id=_env("FLAGCX_CLUSTER_ID"),
        check=_parse_choice("FLAGCX_CHECK", ("0", "1"), "0") == "1",
        nccl_lib=_env("FLAGCX_NCCL_LIB"),
        nccl_clones=_parse_clones(_env("FLAGCX_NCCL_CLONES")),
        topo_file=_env("FLAGCX_TOPO_FILE"),
        hetero_chunk=_parse_bytes("FLAGCX_HETERO_CHUNK", _env("FLAGCX_HETERO_CHUNK")),
        hetero_lanes=_parse_count("FLAGCX_HETERO_LANES", _env("FLAGCX_HETERO_LANES")),
        hetero_allreduce=_parse_choice("FLAGCX_HETERO_ALLREDUCE", ("auto", "hierarchical", "flat"), "auto"),
        shm_buffer=_parse_bytes("FLAGCX_SHM_BUFFER", _env("FLAGCX_SHM_BUFFER")),
        shm_p2p_buffer=_parse_bytes("FLAGCX_SHM_P2P_BUFFER", _env("FLAGCX_SHM_P2P_BUFFER")),
        shm_threads=_parse_count("FLAGCX_SHM_THREADS", _env("FLAGCX_SHM_THREADS")),
        shm_single_copy=_parse_threshold("FLAGCX_SHM_SINGLE_COPY", _env("FLAGCX_SHM_SINGLE_COPY"), DEFAULT_SHM_SINGLE_COPY),
        vendor_backends=_parse_vendor_backends(_env("FLAGCX_VENDOR_BACKEND")),
        device_adapters=_parse_device_adapters(_env("FLAGCX_DEVICE_ADAPTER")),
        adapter_plugins=_parse_plugins(_env("FLAGCX_ADAPTER_PLUGIN")),
        socket_ifname=_parse_ifname(_env("FLAGCX_SOCKET_IFNAME")),
        trace_buffer=_parse_size("FLAGCX_TRACE_BUFFER", _env("FLAGCX_TRACE_BUFFER"), DEFAULT_TRACE_BUFFER),
        trace_stack=_parse_choice("FLAGCX_TRACE_STACK", ("0", "1"), "0") == "1",
        vllm=_parse_choice("FLAGCX_VLLM", ("0", "1"), "0") == "1",
        nccl_watchdog=_parse_choice("FLAGCX_NCCL_WATCHDOG", ("0", "1"), "1") == "1",
        fast_allreduce=_parse_choice("FLAGCX_FAST_ALLREDUCE", ("0", "1"), "0") == "1",
    )


_config: Config | None = None


def resolve_timeout(given: float | None) -> float:
    """A communicator's timeout: FLAGCX_TIMEOUT, else ``given`` (seconds, > 0), else DEFAULT_TIMEOUT."""
    return get().timeout or (given if given and given > 0 else None) or DEFAULT_TIMEOUT


def get() -> Config:
    """The current configuration (read once, then cached)."""
    global _config
    if _config is None:
        _config = _load()
        _setup_logging(_config.debug)
    return _config


def reload() -> Config:
    """Re-read the environment (for tests and long-lived tools)."""
    global _config
    _config = None
    return get()


def _setup_logging(level_name: str | None) -> None:
    """FLAGCX_DEBUG set: flagcx's records at that level to its own stderr handler (and not on to the root logger).

    Unset: the ``flagcx`` logger has no handler and no level of its own, so records
    propagate to whatever the application configured (Python's last-resort handler
    prints warnings when it configured nothing), as a library's logging should.
    """
    logger = logging.getLogger("flagcx")
    ours = [h for h in logger.handlers if getattr(h, "_flagcx", False)]
    if level_name is None:
        for handler in ours:
            logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
        return
    level = _LEVELS.get(level_name)
    if level is None:
        raise ConfigError(f"FLAGCX_DEBUG={level_name!r} is not one of WARN, INFO, DEBUG")
    logger.setLevel(level)
    if not ours:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("flagcx %(process)d %(levelname)s %(name)s: %(message)s"))
        handler._flagcx = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
