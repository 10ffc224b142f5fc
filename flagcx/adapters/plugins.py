"""Third-party adapters: found through the ``flagcx.adapters`` entry points and FLAGCX_ADAPTER_PLUGIN, validated when loaded.

A package adds a transport by implementing the contract of :mod:`.base` (version
``ADAPTER_API_VERSION``) and declaring, in its ``pyproject.toml``::

    [project.entry-points."flagcx.adapters"]
    myccl = "my_pkg.adapter:MyAdapter"

or, without packaging, ``FLAGCX_ADAPTER_PLUGIN=my_pkg.adapter:MyAdapter`` (a comma list;
it wins over an entry point of the same name). A plugin is imported only when its
name is selected (FLAGCX_CPU_ADAPTER=<name>, FLAGCX_DEVICE_ADAPTER=<type>:<name>), so
a broken package that nobody selects costs nothing; FLAGCX_ADAPTER_PLUGIN classes are
imported on the first lookup of any non-builtin name. Either way the class is checked
before any use and refused with a FlagcxError naming the plugin, the problem and the
fix: an Adapter subclass, ``api_version`` declared and equal to ADAPTER_API_VERSION,
a lower-case ``name`` that is no builtin's (and equals the entry point's name), class
level ``capabilities``, and no abstract method left.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from functools import cache, lru_cache
from importlib.metadata import entry_points
from typing import Any, Optional

import torch

from ..config import ADAPTER_ENTRY_POINTS
from ..config import get as get_config
from ..errors import FlagcxError
from ..types import ReduceOp
from .base import ADAPTER_API_VERSION, ALL_OPS, Adapter, Capabilities
from .names import BUILTIN, KEYWORDS

log = logging.getLogger("flagcx.adapters")

ENTRY_POINT_GROUP = ADAPTER_ENTRY_POINTS
"""The entry-point group third-party packages register adapters in (name -> ``module:Class``)."""

RESERVED = frozenset(BUILTIN) | KEYWORDS
"""Names plugins may not take (builtins and selection keywords)."""

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _refuse(origin: str, problem: str, fix: str) -> FlagcxError:
    return FlagcxError(f"adapter plugin {origin} refused: {problem}; {fix}", op="init")


def validate(obj: Any, origin: str, expected_name: Optional[str] = None) -> type[Adapter]:
    """``obj`` if it is a usable adapter class, else a FlagcxError saying what is wrong (``origin`` names where it came from)."""
    if not (inspect.isclass(obj) and issubclass(obj, Adapter)):
        raise _refuse(origin, f"{obj!r} is not a subclass of flagcx.adapters.Adapter", "derive the class from flagcx.adapters.Adapter")
    declared = any("api_version" in vars(c) for c in obj.__mro__ if c is not Adapter and issubclass(c, Adapter))
    version = getattr(obj, "api_version", None)
    if not declared:
        raise _refuse(
            origin, "the class declares no api_version", f"set api_version = {ADAPTER_API_VERSION} once it implements contract version {ADAPTER_API_VERSION}"
        )
    if version != ADAPTER_API_VERSION:
        raise _refuse(
            origin,
            f"it implements adapter contract version {version!r}, this flagcx implements version {ADAPTER_API_VERSION}",
            "install a plugin release built for this flagcx (or a flagcx matching the plugin)",
        )
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise _refuse(origin, f"name {name!r} is not a lower-case identifier", "set the class attribute name, e.g. name = 'myccl'")
    if name in RESERVED:
        raise _refuse(origin, f"name {name!r} belongs to a builtin", "choose another name")
    if expected_name is not None and name != expected_name:
        raise _refuse(origin, f"the class is named {name!r} but registered as {expected_name!r}", "make the entry-point name equal the class's name")
    caps = getattr(obj, "capabilities", None)
    if not isinstance(caps, Capabilities):
        raise _refuse(
            origin,
            "the class has no capabilities (a flagcx.adapters.Capabilities class attribute)",
            "declare capabilities = Capabilities(devices=..., reduce_dtypes=..., reduce_ops=...)",
        )
    problems = []
    if not caps.devices or not all(isinstance(d, str) for d in caps.devices):
        problems.append(f"devices {set(caps.devices)!r} must name torch device types")
    if not caps.ops <= ALL_OPS:
        problems.append(f"ops {sorted(caps.ops - ALL_OPS)} are not contract ops ({', '.join(sorted(ALL_OPS))})")
    if not all(isinstance(op, ReduceOp) for op in caps.reduce_ops):
        problems.append("reduce_ops must hold flagcx.ReduceOp members")
    if not all(isinstance(d, torch.dtype) for d in caps.reduce_dtypes):
        problems.append("reduce_dtypes must hold torch dtypes")
    if ReduceOp.PREMUL_SUM in caps.reduce_ops:
        lacking = [m for m in ("allreduce", "reducescatter", "reduce") if "factor" not in inspect.signature(getattr(obj, m)).parameters]
        if lacking:
            problems.append(f"PREMUL_SUM is declared but {', '.join(lacking)} take no 'factor' keyword (the premultiplier the core passes)")
    if problems:
        raise _refuse(origin, "; ".join(problems), "fix the Capabilities declaration")
    missing = sorted(getattr(obj, "__abstractmethods__", ()))
    if missing:
        raise _refuse(
            origin,
            f"it leaves abstract methods unimplemented: {', '.join(missing)}",
            "implement every op of the contract (raise NotSupported where the transport lacks one)",
        )
    return obj


def load_target(target: str, origin: str, expected_name: Optional[str] = None) -> type[Adapter]:
    """Import ``module:Class`` and validate it."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise _refuse(origin, f"importing {module_name!r} failed ({type(exc).__name__}: {exc})", "install the plugin's package and its dependencies") from exc
    if not hasattr(module, attr):
        raise _refuse(origin, f"module {module_name!r} has no attribute {attr!r}", "point the registration at the adapter class")
    return validate(getattr(module, attr), origin, expected_name)


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, str]:
    """Entry-point name -> ``module:Class``, read once per process (nothing imported)."""
    found: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name] != ep.value:
            raise _refuse(f"{ep.name!r}", f"two installed packages register it ({found[ep.name]} and {ep.value})", "uninstall one of them")
        found[ep.name] = ep.value
    return found


@lru_cache(maxsize=8)
def _env_plugins(targets: tuple[str, ...]) -> dict[str, type[Adapter]]:
    """FLAGCX_ADAPTER_PLUGIN classes by name (imported and validated once per distinct setting)."""
    classes: dict[str, type[Adapter]] = {}
    for target in targets:
        cls = load_target(target, f"{target} (FLAGCX_ADAPTER_PLUGIN)")
        if cls.name in classes and classes[cls.name] is not cls:
            raise _refuse(f"{target} (FLAGCX_ADAPTER_PLUGIN)", f"another entry is also named {cls.name!r}", "list each adapter once")
        classes[cls.name] = cls
    return classes


@cache
def _entry_point_class(name: str, target: str) -> type[Adapter]:
    return load_target(target, f"{name!r} ({target}, entry point group {ENTRY_POINT_GROUP!r})", expected_name=name)


def names() -> list[str]:
    """Names of every plugin adapter (entry points and FLAGCX_ADAPTER_PLUGIN)."""
    return sorted(set(_entry_points()) | set(_env_plugins(get_config().adapter_plugins)))


def find(name: str) -> Optional[type[Adapter]]:
    """The plugin adapter class called ``name`` (loaded and validated now), or None when no plugin has that name."""
    cls = _env_plugins(get_config().adapter_plugins).get(name)
    if cls is not None:
        return cls
    target = _entry_points().get(name)
    if target is None:
        return None
    cls = _entry_point_class(name, target)
    log.info("loaded adapter plugin %s from %s", name, target)
    return cls
