"""Every FLAGCX_* environment variable is read here, and only here.

Other modules call :func:`get` and read attributes; tests that change the
environment call :func:`reload`. Logging for the whole package is configured here
from ``FLAGCX_DEBUG``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

_LEVELS = {
    "": logging.WARNING,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "INFO": logging.INFO,
    "DEBUG": logging.DEBUG,
    "TRACE": logging.DEBUG,
}

CPU_ADAPTERS = ("auto", "shm", "gloo", "mpi")


@dataclass(frozen=True)
class Config:
    """A snapshot of the FLAGCX_* environment."""

    debug: str
    """FLAGCX_DEBUG: log level (WARN, INFO, DEBUG)."""
    timeout: float | None
    """FLAGCX_TIMEOUT: seconds; overrides the timeout given to a communicator."""
    cpu_adapter: str
    """FLAGCX_CPU_ADAPTER: auto | shm | gloo | mpi, the transport for CPU tensors."""
    host_id: str | None
    """FLAGCX_HOST_ID: host identity override (ranks with equal ids share memory)."""
    cluster_id: str | None
    """FLAGCX_CLUSTER_ID: cluster label override (heterogeneous mode)."""


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
        raise ValueError(f"FLAGCX_TIMEOUT={raw!r} is not a number of seconds; set e.g. FLAGCX_TIMEOUT=300") from None
    if value <= 0:
        raise ValueError(f"FLAGCX_TIMEOUT={raw!r} must be positive; set e.g. FLAGCX_TIMEOUT=300")
    return value


def _parse_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    raw = (_env(name) or default).lower()
    if raw not in choices:
        raise ValueError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return raw


def _load() -> Config:
    return Config(
        debug=(_env("FLAGCX_DEBUG") or "WARN").upper(),
        timeout=_parse_timeout(_env("FLAGCX_TIMEOUT")),
        cpu_adapter=_parse_choice("FLAGCX_CPU_ADAPTER", CPU_ADAPTERS, "auto"),
        host_id=_env("FLAGCX_HOST_ID"),
        cluster_id=_env("FLAGCX_CLUSTER_ID"),
    )


_config: Config | None = None


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


def _setup_logging(level_name: str) -> None:
    logger = logging.getLogger("flagcx")
    level = _LEVELS.get(level_name)
    if level is None:
        raise ValueError(f"FLAGCX_DEBUG={level_name!r} is not one of WARN, INFO, DEBUG")
    logger.setLevel(level)
    if not any(getattr(h, "_flagcx", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("flagcx %(process)d %(levelname)s %(name)s: %(message)s"))
        handler._flagcx = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
