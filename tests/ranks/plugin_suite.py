"""Suite run with the flagcx-relay-plugin package installed (tests/plugin_pkg): plugin adapters selected by name.

Env: FLAGCX_CPU_ADAPTER=relay (an entry point) and
FLAGCX_ADAPTER_PLUGIN=flagcx_relay:EnvRelayAdapter (no entry point). The matrix runs
through the plugin within what it declares (the core emulating AVG / PREMUL_SUM on its
SUM), its declared limits are enforced, the calls really went through it, and a broken
entry point or a device type it does not move is refused when selected.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from flagcx import Communicator, FlagcxError, NotSupported, config
from flagcx.adapters import ALL_OPS, adapter_class, plugins

from ..helpers.harness import with_cpu_adapter
from ..helpers.matrix import Check, error_checks, expect_error, movement_checks, reduction_checks
from ..helpers.reference import assert_equal

DTYPES = [torch.float32, torch.float64, torch.int32, torch.int64]
OPS = ["sum", "max", "min", "avg", "premul_sum"]


def _from_entry_point(comm: Communicator) -> None:
    import flagcx_relay

    assert comm.adapter_name("cpu") == "relay"
    assert adapter_class("relay") is flagcx_relay.RelayAdapter
    assert plugins._entry_points()["relay"] == "flagcx_relay:RelayAdapter"


def _declared_limits(comm: Communicator) -> None:
    expect_error(NotSupported, lambda: comm.all_reduce(torch.ones(3, dtype=torch.float16)), "relay", "float16")
    expect_error(NotSupported, lambda: comm.all_reduce(torch.ones(3, dtype=torch.int32), "prod"), "relay", "PROD")
    expect_error(NotSupported, lambda: comm.recv(torch.empty(1), None), "any source")


def _calls_went_through_plugin() -> None:
    import flagcx_relay

    calls = flagcx_relay.RelayAdapter.calls
    for op in (*sorted(ALL_OPS), "premul_sum"):
        assert calls[op] > 0, f"no {op} went through the plugin: {dict(calls)}"


def _env_plugin(comm: Communicator) -> None:
    assert "envrelay" not in plugins._entry_points()
    sub = with_cpu_adapter(comm, "env", "envrelay")
    assert sub.adapter_name("cpu") == "envrelay"
    x = torch.arange(10, dtype=torch.int64) * (comm.rank + 1)
    sub.all_reduce(x, "max")
    assert_equal(x, torch.arange(10, dtype=torch.int64) * comm.size, "all_reduce through the FLAGCX_ADAPTER_PLUGIN adapter")
    expect_error(
        NotSupported,
        lambda: sub.gather(x, [torch.empty_like(x) for _ in range(comm.size)] if comm.rank == 0 else None),
        "envrelay",
        "does not implement gather",
    )
    sub.destroy()


def _broken_entry_point() -> None:
    expect_error(FlagcxError, lambda: adapter_class("relay_old"), "'relay_old'", "version 0", "refused")


def _device_adapter_by_name(comm: Communicator) -> None:
    os.environ["FLAGCX_DEVICE_ADAPTER"] = "meta:relay"
    config.reload()
    try:
        expect_error(NotSupported, lambda: comm.connect("meta:0"), "relay moves cpu tensors, not meta")
    finally:
        del os.environ["FLAGCX_DEVICE_ADAPTER"]
        config.reload()


def relay_suite(rank: int, size: int) -> Iterable[Check]:
    comm = Communicator.from_env(name="relay")
    yield "from_entry_point", lambda: _from_entry_point(comm)
    yield from reduction_checks(comm, "relay", dtypes=DTYPES, ops=OPS)
    yield from movement_checks(comm, "relay", dtypes=[torch.uint8, torch.bfloat16, torch.complex64])
    yield from error_checks(comm, "relay")
    yield "declared_limits", lambda: _declared_limits(comm)
    yield "calls_went_through_plugin", _calls_went_through_plugin
    yield "env_plugin", lambda: _env_plugin(comm)
    yield "broken_entry_point_refused", _broken_entry_point
    yield "device_adapter_by_name", lambda: _device_adapter_by_name(comm)
    yield "destroy", comm.destroy
