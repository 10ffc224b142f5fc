"""vLLM platform plugin: run vLLM's tensor-, pipeline- and data-parallel groups on flagcx.

vLLM calls :func:`register` through the ``vllm.platform_plugins`` entry point named
``flagcx``. It activates only when asked, so that installing flagcx never takes vLLM over:
``FLAGCX_VLLM=1``, or vLLM's own allow-list ``VLLM_PLUGINS`` naming ``flagcx``. Active, it
returns the platform class for this machine (:mod:`.platform`): vLLM's CPU or CUDA
platform with ``dist_backend = "flagcx"`` (every ``GroupCoordinator.device_group`` is then
a flagcx process group; vLLM keeps its ``cpu_group`` on Gloo) and a device communicator
(:mod:`.communicator`) whose hot collectives call the group's :class:`flagcx.Communicator`
directly. vLLM allows one out-of-tree platform; when another is installed, the log says
which and how to choose.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

log = logging.getLogger("flagcx.vllm")

PLUGIN_NAME = "flagcx"
"""The entry point's name in ``vllm.platform_plugins`` (what ``VLLM_PLUGINS`` names)."""
CPU_PLATFORM = "flagcx.integrations.vllm.platform.FlagcxCpuPlatform"
CUDA_PLATFORM = "flagcx.integrations.vllm.platform.FlagcxCudaPlatform"


def asked() -> bool:
    """Whether the user asked for flagcx inside vLLM: FLAGCX_VLLM=1, or VLLM_PLUGINS naming flagcx."""
    from ... import config

    if config.get().vllm:
        return True
    allowed = os.environ.get("VLLM_PLUGINS")
    return allowed is not None and PLUGIN_NAME in [p.strip() for p in allowed.split(",")]


def register() -> Optional[str]:
    """vLLM's platform-plugin hook: the qualified name of flagcx's platform class when asked for, else None."""
    if not asked():
        return None
    from importlib.metadata import entry_points

    others = sorted(ep.name for ep in entry_points(group="vllm.platform_plugins") if ep.name != PLUGIN_NAME)
    if others and os.environ.get("VLLM_PLUGINS") is None:
        log.warning(
            "flagcx: other out-of-tree vLLM platforms are installed (%s); vLLM activates only one: set VLLM_PLUGINS=%s to run on flagcx alone",
            ", ".join(others),
            PLUGIN_NAME,
        )
    import torch

    return CUDA_PLATFORM if torch.cuda.is_available() else CPU_PLATFORM


__all__ = ["CPU_PLATFORM", "CUDA_PLATFORM", "PLUGIN_NAME", "asked", "register"]
