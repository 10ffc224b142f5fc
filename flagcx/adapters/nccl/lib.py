"""cffi (ABI mode) binding of libnccl.so.2 and of the libraries that copy NCCL's C API.

Finds the library (``FLAGCX_NCCL_LIB``, then the ``nvidia-nccl-cu*`` wheel torch
depends on, then the system loader over :data:`BUILTIN_CLONES` and the
``FLAGCX_NCCL_CLONES`` entries), declares NCCL's functions under the entry's symbol
prefix (``mcclAllReduce`` for prefix ``mccl``), checks every required symbol, probes
the optional ones, and turns every non-zero ``ncclResult_t`` into a FlagcxError that
carries the library's own error text.

Buffers and streams are declared as ``uintptr_t`` (pointer-sized integers are passed
exactly like pointers on every supported ABI), so a hot call takes ``tensor.data_ptr()``
and a raw stream handle without building cffi pointer objects; enums are ``int``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import cffi

from ... import config
from ...errors import FlagcxError, FlagcxTimeout, InvalidArgument, RemoteError

log = logging.getLogger("flagcx.nccl")

UNIQUE_ID_BYTES = 128
"""Size of ncclUniqueId (NCCL_UNIQUE_ID_BYTES); the clones in the table keep NCCL's layout."""

SPLIT_NOCOLOR = -1
"""NCCL_SPLIT_NOCOLOR: the color of ranks that join no communicator in ncclCommSplit."""

# ncclResult_t
SUCCESS, UNHANDLED_CUDA_ERROR, SYSTEM_ERROR, INTERNAL_ERROR, INVALID_ARGUMENT, INVALID_USAGE, REMOTE_ERROR, IN_PROGRESS, TIMEOUT = range(9)

# ncclDataType_t
INT8, UINT8, INT32, UINT32, INT64, UINT64, FLOAT16, FLOAT32, FLOAT64, BFLOAT16 = range(10)

# ncclRedOp_t (AVG needs NCCL >= 2.10)
SUM, PROD, MAX, MIN, AVG = range(5)

SCALAR_HOST_IMMEDIATE = 1
"""ncclScalarHostImmediate: ncclRedOpCreatePreMulSum reads the scalar before it returns."""

WHEEL_SOURCE = "nvidia-nccl wheel"
"""The ``source`` of the library found in the nvidia-nccl-cu* wheel."""

INSTALL_HINT = (
    "install the NCCL wheel that matches your torch (pip install nvidia-nccl-cu13, or nvidia-nccl-cu12 for a CUDA 12 torch) "
    "or set FLAGCX_NCCL_LIB=/path/to/libnccl.so.2"
)


class Clone(NamedTuple):
    """One NCCL-API-compatible library: its file name (or path) and the prefix of its symbols."""

    library: str
    prefix: str
    vendor: str = ""
    tested: bool = False
    """True only for libraries this project's tests run against (NCCL)."""


BUILTIN_CLONES: tuple[Clone, ...] = (
    Clone("libnccl.so.2", "nccl", "NVIDIA NCCL", tested=True),
    # Wired but untested (no such hardware here). Each exports NCCL's API, enums and
    # 128-byte unique id under the prefix shown, and its torch build names the device "cuda".
    Clone("librccl.so.1", "nccl", "AMD RCCL"),  # ROCm, also Hygon DCU's DTK
    Clone("librccl.so", "nccl", "AMD RCCL"),  # the unversioned name some ROCm installs only have
    Clone("libmccl.so", "mccl", "MetaX MCCL"),  # MACA, /opt/maca/lib64; mcclCommMcDevice replaces CommCuDevice
    Clone("libnccl.so", "nccl", "vendor NCCL build"),  # unversioned builds in vendor SDKs (Iluvatar CoreX, Alibaba PPU)
)
"""The libraries tried through the system loader, after the FLAGCX_NCCL_CLONES entries."""


@dataclass(frozen=True)
class _Fn:
    suffix: str
    restype: str
    params: tuple[tuple[str, str], ...]
    required: bool


def _fn(suffix: str, restype: str, params: str, required: bool = True) -> _Fn:
    pairs = []
    for p in filter(None, (x.strip() for x in params.split(","))):
        ctype, _, name = p.rpartition(" ")
        pairs.append((ctype, name))
    return _Fn(suffix, restype, tuple(pairs), required)


FUNCTIONS: tuple[_Fn, ...] = (
    _fn("GetVersion", "int", "int* version"),
    _fn("GetUniqueId", "int", "flagcx_unique_id* uniqueId"),
    _fn("CommInitRank", "int", "void** comm, int nranks, flagcx_unique_id commId, int rank"),
    _fn("CommDestroy", "int", "void* comm"),
    _fn("CommAbort", "int", "void* comm"),
    _fn("GetErrorString", "const char*", "int result"),
    _fn("CommCount", "int", "void* comm, int* count"),
    _fn("CommUserRank", "int", "void* comm, int* rank"),
    _fn("AllReduce", "int", "uintptr_t sendbuff, uintptr_t recvbuff, size_t count, int datatype, int op, void* comm, uintptr_t stream"),
    _fn("Broadcast", "int", "uintptr_t sendbuff, uintptr_t recvbuff, size_t count, int datatype, int root, void* comm, uintptr_t stream"),
    _fn("Reduce", "int", "uintptr_t sendbuff, uintptr_t recvbuff, size_t count, int datatype, int op, int root, void* comm, uintptr_t stream"),
    _fn("AllGather", "int", "uintptr_t sendbuff, uintptr_t recvbuff, size_t sendcount, int datatype, void* comm, uintptr_t stream"),
    _fn("ReduceScatter", "int", "uintptr_t sendbuff, uintptr_t recvbuff, size_t recvcount, int datatype, int op, void* comm, uintptr_t stream"),
    _fn("Send", "int", "uintptr_t sendbuff, size_t count, int datatype, int peer, void* comm, uintptr_t stream"),
    _fn("Recv", "int", "uintptr_t recvbuff, size_t count, int datatype, int peer, void* comm, uintptr_t stream"),
    _fn("GroupStart", "int", ""),
    _fn("GroupEnd", "int", ""),
    # Optional: newer than some NCCL versions still in use, or absent from some clones.
    _fn("GetLastError", "const char*", "void* comm", False),  # NCCL >= 2.13
    _fn("CommFinalize", "int", "void* comm", False),  # NCCL >= 2.14
    _fn("CommGetAsyncError", "int", "void* comm, int* asyncError", False),
    _fn("CommSplit", "int", "void* comm, int color, int key, void** newcomm, void* config", False),  # NCCL >= 2.18
    _fn("CommCuDevice", "int", "void* comm, int* device", False),
    _fn("CommMcDevice", "int", "void* comm, int* device", False),  # MetaX's spelling of CommCuDevice
    _fn("RedOpCreatePreMulSum", "int", "int* op, void* scalar, int datatype, int residence, void* comm", False),  # NCCL >= 2.11
    _fn("RedOpDestroy", "int", "int op, void* comm", False),
    _fn("CommRegister", "int", "void* comm, uintptr_t buff, size_t size, void** handle", False),  # NCCL >= 2.19
    _fn("CommDeregister", "int", "void* comm, void* handle", False),
)
"""Every bound function, by suffix (the symbol is prefix + suffix)."""


def cdef(prefix: str) -> str:
    """The cffi declarations of :data:`FUNCTIONS` for symbols named ``prefix + suffix``."""
    lines = [f"typedef struct {{ char internal[{UNIQUE_ID_BYTES}]; }} flagcx_unique_id;"]
    for f in FUNCTIONS:
        params = ", ".join(f"{t} {n}" for t, n in f.params) or "void"
        lines.append(f"{f.restype} {prefix}{f.suffix}({params});")
    return "\n".join(lines)


def parse_version(code: int) -> tuple[int, int, int]:
    """NCCL_VERSION_CODE to (major, minor, patch): 23203 -> (2, 32, 3) (>= 2.9), 2708 -> (2, 7, 8) (older)."""
    if code >= 10000:
        return code // 10000, code % 10000 // 100, code % 100
    return code // 1000, code % 1000 // 100, code % 100


class LibraryError(FlagcxError):
    """An NCCL-API library could not be loaded or lacks a required symbol; ``reason`` says which and why."""

    def __init__(self, reason: str, fix: str = INSTALL_HINT) -> None:
        super().__init__(f"{reason}; {fix}")
        self.reason = reason


def _error_class(rc: int) -> type[FlagcxError]:
    if rc in (INVALID_ARGUMENT, INVALID_USAGE):
        return InvalidArgument
    if rc == REMOTE_ERROR:
        return RemoteError
    if rc == TIMEOUT:
        return FlagcxTimeout
    return FlagcxError


class NcclLib:
    """One loaded NCCL-API library: its functions (attributes named by suffix, e.g. ``lib.AllReduce``), version and errors."""

    if TYPE_CHECKING:  # the functions are set from the cdef table at load time

        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, path: str, prefix: str, source: str = "explicit") -> None:
        self.path = path
        self.prefix = prefix
        self.source = source
        self.ffi = cffi.FFI()
        self.ffi.cdef(cdef(prefix))
        try:
            self._dl = self.ffi.dlopen(path)
        except OSError as exc:
            detail = str(exc).split(".  Additionally")[0].split(f"cannot load library '{path}': ")[-1]
            if not detail.startswith(path):
                detail = f"{path}: {detail}"
            raise LibraryError(f"cannot load {detail} ({source})") from exc
        self.optional: dict[str, bool] = {}
        missing = []
        for f in FUNCTIONS:
            try:
                fn = getattr(self._dl, prefix + f.suffix)
            except AttributeError:
                fn = None
            if fn is None and f.required:
                missing.append(prefix + f.suffix)
            if not f.required:
                self.optional[f.suffix] = fn is not None
            setattr(self, f.suffix, fn)
        if missing:
            raise LibraryError(
                f"{path} ({source}) lacks required symbol(s) {', '.join(missing)}: it is not an NCCL-API library with prefix {prefix!r}, or it is too old",
                f"{INSTALL_HINT}, or declare the right prefix with FLAGCX_NCCL_CLONES={os.path.basename(path)}:<prefix>",
            )
        out = self.ffi.new("int*")
        self.check(self.GetVersion(out), "GetVersion")
        self.version_code: int = out[0]
        self.version: tuple[int, int, int] = parse_version(self.version_code)
        self.resolved_path = _mapped_path(path)

    @property
    def version_string(self) -> str:
        return ".".join(map(str, self.version))

    def has(self, suffix: str) -> bool:
        """Whether the optional function ``suffix`` (e.g. "CommSplit") exists in this library."""
        return self.optional.get(suffix, True)

    def __repr__(self) -> str:
        return f"NcclLib({self.resolved_path!r}, prefix={self.prefix!r}, version={self.version_string})"

    # ------------------------------------------------------------------ errors
    def error_text(self, rc: int, comm: Any = None) -> str:
        """The library's description of ``rc`` plus its last-error message (when it has ncclGetLastError)."""
        described = self.GetErrorString(rc)
        text = self.ffi.string(described).decode(errors="replace") if described != self.ffi.NULL else f"result {rc}"
        if self.GetLastError is not None:
            last = self.GetLastError(comm if comm is not None else self.ffi.NULL)
            if last != self.ffi.NULL:
                detail = self.ffi.string(last).decode(errors="replace").strip()
                if detail:
                    text += f"; last error: {detail}"
        return text

    def error(self, rc: int, call: str, comm: Any = None, *, op: Optional[str] = None, rank: Optional[int] = None, hint: str = "") -> FlagcxError:
        """The FlagcxError for result ``rc`` of ``prefix + call``."""
        msg = f"{self.prefix}{call} returned {rc}: {self.error_text(rc, comm)}"
        if hint:
            msg += f"; {hint}"
        return _error_class(rc)(msg, op=op, rank=rank)

    def check(self, rc: int, call: str, comm: Any = None, *, op: Optional[str] = None, rank: Optional[int] = None, hint: str = "") -> None:
        """Raise :meth:`error` unless ``rc`` is ncclSuccess."""
        if rc:
            raise self.error(rc, call, comm, op=op, rank=rank, hint=hint)

    # ------------------------------------------------------------------ communicators
    def get_unique_id(self) -> bytes:
        uid = self.ffi.new("flagcx_unique_id*")
        self.check(self.GetUniqueId(uid), "GetUniqueId")
        return bytes(self.ffi.buffer(uid))

    def comm_init_rank(self, nranks: int, unique_id: bytes, rank: int, hint: str = "") -> Any:
        """A new communicator (cffi ``void*``); the caller has made the rank's device current."""
        if len(unique_id) != UNIQUE_ID_BYTES:
            raise InvalidArgument(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {len(unique_id)}", op="init", rank=rank)
        uid = self.ffi.new("flagcx_unique_id*")
        self.ffi.memmove(uid, unique_id, UNIQUE_ID_BYTES)
        out = self.ffi.new("void**")
        self.check(self.CommInitRank(out, nranks, uid[0], rank), "CommInitRank", op="init", rank=rank, hint=hint)
        return out[0]

    def comm_split(self, comm: Any, color: int, key: int, rank: Optional[int] = None) -> Optional[Any]:
        """ncclCommSplit with a NULL config (the child inherits the parent's); None for NCCL_SPLIT_NOCOLOR."""
        out = self.ffi.new("void**")
        self.check(self.CommSplit(comm, color, key, out, self.ffi.NULL), "CommSplit", comm, op="split", rank=rank)
        return None if out[0] == self.ffi.NULL else out[0]

    def comm_int(self, call: str, comm: Any) -> int:
        """The int a ``Comm*(comm, int*)`` query (CommCount, CommUserRank, CommCuDevice...) returns."""
        out = self.ffi.new("int*")
        self.check(getattr(self, call)(comm, out), call, comm)
        return out[0]

    def comm_device(self, comm: Any) -> Optional[int]:
        """The device ordinal of ``comm`` (CommCuDevice or a clone's spelling of it), None when the library has neither."""
        for call in ("CommCuDevice", "CommMcDevice"):
            if getattr(self, call) is not None:
                return self.comm_int(call, comm)
        return None


def _mapped_path(name: str) -> str:
    """The file the loader mapped for ``name`` (from /proc/self/maps), or ``name`` when it cannot tell."""
    if os.path.isabs(name):
        return os.path.realpath(name)
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if path.startswith("/") and os.path.basename(path).startswith(name):
                    return path
    except OSError:
        pass
    return name


def wheel_library() -> Optional[str]:
    """libnccl.so.2 of the ``nvidia-nccl-cu*`` wheel (the ``nvidia`` namespace package), if installed."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "nccl", "lib", "libnccl.so.2")
        if os.path.exists(path):
            return path
    return None


def clone_table() -> list[Clone]:
    """The FLAGCX_NCCL_CLONES entries (first) and :data:`BUILTIN_CLONES`."""
    user = [Clone(lib, prefix, "FLAGCX_NCCL_CLONES") for lib, prefix in config.get().nccl_clones]
    return user + list(BUILTIN_CLONES)


def prefix_for(path: str) -> Optional[str]:
    """The symbol prefix of the table entry whose library is ``path`` or has its file name."""
    base = os.path.basename(path)
    for clone in clone_table():
        if clone.library == path or os.path.basename(clone.library) == base:
            return clone.prefix
    return None


def _probe_prefix(path: str) -> Optional[str]:
    """The first table prefix whose ``<prefix>GetVersion`` the library at ``path`` exports.

    "nccl" is tried last: dlsym also searches a library's dependencies, so a clone
    that links libnccl internally still answers to ``ncclGetVersion``.
    """
    prefixes = sorted(dict.fromkeys(c.prefix for c in clone_table()), key=lambda p: p == "nccl")
    ffi = cffi.FFI()
    ffi.cdef("\n".join(f"int {p}GetVersion(int*);" for p in prefixes))
    try:
        dl = ffi.dlopen(path)
    except OSError:
        return None
    for p in prefixes:
        try:
            getattr(dl, p + "GetVersion")
            return p
        except AttributeError:
            continue
    return None


def candidates() -> list[tuple[str, str, str]]:
    """(library, prefix, source) in discovery order; FLAGCX_NCCL_LIB, when set, is the only one."""
    explicit = config.get().nccl_lib
    if explicit is not None:
        prefix = prefix_for(explicit) or _probe_prefix(explicit)
        if prefix is None:
            if not os.path.exists(explicit):
                raise FlagcxError(f"FLAGCX_NCCL_LIB={explicit!r}: no such file; point it at libnccl.so.2, or unset it and {INSTALL_HINT}")
            known = ", ".join(dict.fromkeys(c.prefix for c in clone_table()))
            raise FlagcxError(
                f"FLAGCX_NCCL_LIB={explicit!r}: cannot load it or find <prefix>GetVersion in it for any known prefix ({known}); "
                f"if it is an NCCL-API clone, declare its prefix with FLAGCX_NCCL_CLONES={os.path.basename(explicit)}:<prefix>"
            )
        return [(explicit, prefix, "FLAGCX_NCCL_LIB")]
    found = []
    wheel = wheel_library()
    if wheel is not None:
        found.append((wheel, "nccl", WHEEL_SOURCE))
    for clone in clone_table():
        found.append((clone.library, clone.prefix, f"system loader, {clone.vendor}"))
    return found


_loaded: Optional[NcclLib] = None


def load() -> NcclLib:
    """The process's NCCL library (found once, then cached); FlagcxError naming every path tried when none loads."""
    global _loaded
    if _loaded is not None:
        return _loaded
    found = candidates()
    tried = [] if found[0][2] in (WHEEL_SOURCE, "FLAGCX_NCCL_LIB") else ["the nvidia-nccl-cu* wheel: not installed"]
    for library, prefix, source in found:
        try:
            lib = NcclLib(library, prefix, source)
        except LibraryError as exc:
            if source == "FLAGCX_NCCL_LIB":
                raise
            tried.append(exc.reason)
            continue
        log.info("using %s (%s, symbol prefix %r), version %s", lib.resolved_path, source, prefix, lib.version_string)
        _loaded = lib
        return lib
    raise FlagcxError(f"no NCCL library could be loaded (tried: {' | '.join(tried)}); {INSTALL_HINT}")


__all__ = [
    "BUILTIN_CLONES",
    "Clone",
    "FUNCTIONS",
    "LibraryError",
    "NcclLib",
    "SPLIT_NOCOLOR",
    "UNIQUE_ID_BYTES",
    "candidates",
    "cdef",
    "clone_table",
    "load",
    "parse_version",
    "prefix_for",
    "wheel_library",
]
