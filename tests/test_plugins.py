"""Third-party adapter plugins: a real installed package (tests/plugin_pkg) selected by name, and every refusal.

The package is pip-installed into the running environment for this module and
uninstalled at its end; ranks then find its adapter through the ``flagcx.adapters``
entry points (and one class through FLAGCX_ADAPTER_PLUGIN) and move data through it.
Classes that break the contract (tests.helpers.plugin_cases) are refused at load time with a
FlagcxError naming the plugin and the fix, also when a communicator selects them.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from flagcx import Communicator, ConfigError, FlagcxError, config
from flagcx.adapters import adapter_class, plugins

from .helpers.harness import assert_passed, run_suite

PACKAGE = "flagcx-relay-plugin"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The plugin package installed from a copy (no build files land in the source tree); uninstalled afterwards."""
    src = tmp_path_factory.mktemp("plugin") / "plugin_pkg"
    shutil.copytree(Path(__file__).parent / "plugin_pkg", src)
    _pip("install", "--no-build-isolation", "--no-deps", str(src))
    try:
        yield
    finally:
        _pip("uninstall", "-y", PACKAGE)


def test_installed_plugin_moves_data(installed):
    env = {"FLAGCX_CPU_ADAPTER": "relay", "FLAGCX_ADAPTER_PLUGIN": "flagcx_relay:EnvRelayAdapter"}
    assert_passed(run_suite("tests.ranks.plugin_suite:relay_suite", 2, env=env), min_checks=50)


@pytest.mark.parametrize(
    "case,words",
    [
        ("NotAnAdapter", ["is not a subclass of flagcx.adapters.Adapter"]),
        ("NoVersion", ["declares no api_version", "api_version = 1"]),
        ("WrongVersion", ["contract version 2", "implements version 1"]),
        ("NoName", ["name None", "name = 'myccl'"]),
        ("BuiltinName", ["'gloo' belongs to a builtin"]),
        ("NoCapabilities", ["has no capabilities"]),
        ("UnknownOps", ["['teleport'] are not contract ops"]),
        ("PremulWithoutFactor", ["PREMUL_SUM is declared", "allreduce, reducescatter, reduce take no 'factor'"]),
        ("HalfDone", ["abstract methods unimplemented", "allgather", "barrier"]),
    ],
)
def test_incompatible_plugin_refused(case, words):
    target = f"tests.helpers.plugin_cases:{case}"
    with pytest.raises(FlagcxError) as info:
        plugins.load_target(target, target)
    text = str(info.value)
    assert f"adapter plugin {target} refused" in text
    for w in words:
        assert w in text


def test_unimportable_plugin_refused():
    with pytest.raises(FlagcxError, match="importing 'tests.no_such_module' failed"):
        plugins.load_target("tests.no_such_module:X", "x")
    with pytest.raises(FlagcxError, match="has no attribute 'Missing'"):
        plugins.load_target("tests.helpers.plugin_cases:Missing", "x")


@pytest.fixture
def env(monkeypatch):
    def set_env(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)
        config.reload()

    yield set_env
    monkeypatch.undo()
    config.reload()


def test_communicator_refuses_selected_bad_plugin(env):
    env(FLAGCX_ADAPTER_PLUGIN="tests.helpers.plugin_cases:WrongVersion", FLAGCX_CPU_ADAPTER="wrongversion")
    with pytest.raises(FlagcxError, match="contract version 2"):
        Communicator(dist.HashStore(), 0, 1)


def test_unknown_adapter_name_is_clear(env):
    # no plugin module named: FLAGCX_CPU_ADAPTER is checked when it is read, against the builtins and the entry points
    with pytest.raises(ConfigError) as info:
        env(FLAGCX_CPU_ADAPTER="nosuch")
    text = str(info.value)
    for w in ("FLAGCX_CPU_ADAPTER='nosuch' is no adapter", "auto, shm, gloo, mpi", "FLAGCX_ADAPTER_PLUGIN"):
        assert w in text, text
    # where the name is only known once plugins load (FLAGCX_ADAPTER_PLUGIN set), the adapter lookup says it
    env(FLAGCX_CPU_ADAPTER="auto")
    with pytest.raises(FlagcxError) as info:
        adapter_class("nosuch")
    text = str(info.value)
    for w in ("unknown adapter 'nosuch'", "gloo, mpi, nccl, shm", "torch_pg:<c10d backend>", "'flagcx.adapters' entry points", "FLAGCX_ADAPTER_PLUGIN"):
        assert w in text, text


def test_bad_plugin_variable(env):
    with pytest.raises(ValueError, match="is not 'module:Class'"):
        env(FLAGCX_ADAPTER_PLUGIN="my_pkg.adapter")
