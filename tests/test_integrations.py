"""The vLLM plugin's switch, without vLLM (the real-vLLM checks are the opt-in ``bash .ci/vllm``).

``import flagcx`` never imports vLLM or the integration; the ``vllm.platform_plugins``
entry point is declared; vLLM's hook returns flagcx's platform only when FLAGCX_VLLM=1 or
VLLM_PLUGINS names flagcx, and None otherwise (installing flagcx never takes vLLM over).
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from flagcx import ConfigError, config
from flagcx.integrations.vllm import CPU_PLATFORM, asked, register
from flagcx.launch import patched_environ


def test_import_flagcx_imports_no_engine() -> None:
    code = "import sys, flagcx; print(sorted(m for m in sys.modules if m.startswith(('vllm', 'flagcx.integrations'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_entry_point_is_declared() -> None:
    (ep,) = [e for e in entry_points(group="vllm.platform_plugins") if e.name == "flagcx"]
    assert ep.value == "flagcx.integrations.vllm:register"


@pytest.mark.parametrize(
    "env,active",
    [
        ({}, False),
        ({"FLAGCX_VLLM": "0"}, False),
        ({"FLAGCX_VLLM": "1"}, True),
        ({"VLLM_PLUGINS": "flagcx"}, True),
        ({"VLLM_PLUGINS": "other, flagcx"}, True),
        ({"VLLM_PLUGINS": "other"}, False),
    ],
)
def test_the_plugin_is_active_only_when_asked(env, active, monkeypatch) -> None:
    for name in ("FLAGCX_VLLM", "VLLM_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config.reload()
    try:
        assert asked() is active
        assert register() == (CPU_PLATFORM if active else None)  # CI has no CUDA
    finally:
        monkeypatch.undo()
        config.reload()


def test_a_bad_switch_is_a_config_error() -> None:
    with patched_environ({"FLAGCX_VLLM": "yes"}):
        with pytest.raises(ConfigError, match="FLAGCX_VLLM"):
            config.reload()
    config.reload()
