"""The torch_pg adapter and vendor device types.

Spawned ranks: the full correctness matrix through torch_pg over Gloo
(FLAGCX_VENDOR_BACKEND=cpu:gloo) at 2 and 4 ranks; torch_pg(gloo) as one cluster of a
heterogeneous communicator beside shm, plus c10d backends registered like vendors'
(tests.ranks.torch_pg_suite); on GPUs, NCCL reached as if it were a vendor's c10d backend.
In process: FLAGCX_VENDOR_BACKEND / FLAGCX_DEVICE_ADAPTER parsing and precedence,
backend strings with vendor device types through torch's own BackendConfig, accelerator
adapter selection and its refusals, and vendor device types in topology records.
"""

import json

import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import BackendConfig

import flagcx
from flagcx import Communicator, NotSupported, config
from flagcx.adapters import adapter_class
from flagcx.adapters.streams import device_module
from flagcx.adapters.torch_pg import vendor_backend
from flagcx.topology import detect

from .helpers.harness import assert_passed, run_suite
from .ranks.torch_pg_suite import vendor_env


# ---------------------------------------------------------------- spawned ranks
@pytest.mark.parametrize("nproc", [2, 4])
def test_matrix_through_torch_pg_gloo(nproc):
    # FLAGCX_CPU_ADAPTER names no adapter: init only succeeds because FLAGCX_VENDOR_BACKEND=cpu:gloo wins over it.
    env = {"FLAGCX_VENDOR_BACKEND": "cpu:gloo", "FLAGCX_CPU_ADAPTER": "no_such_adapter"}
    assert_passed(run_suite("tests.helpers.matrix:comm_matrix", nproc, env=env), min_checks=100)


def test_hetero_cluster_on_torch_pg_and_c10d_plugins():
    assert_passed(run_suite("tests.ranks.torch_pg_suite:hetero_vendor", 4, env=vendor_env("ABAB")), min_checks=40)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (runs on the GPU machine)")
def test_gpu_matrix_nccl_as_vendor_backend():
    assert_passed(run_suite("tests.ranks.torch_pg_suite:gpu_vendor_matrix", 2, env={"FLAGCX_VENDOR_BACKEND": "cuda:nccl"}), min_checks=100)


# ---------------------------------------------------------------- in process
@pytest.fixture
def env(monkeypatch):
    """Set FLAGCX_* variables for one test; the configuration is re-read before and after."""

    def set_env(**values: str) -> config.Config:
        for key, value in values.items():
            monkeypatch.setenv(key, value)
        return config.reload()

    yield set_env
    monkeypatch.undo()
    config.reload()


def test_vendor_backend_parsing_and_precedence(env):
    cfg = env(FLAGCX_VENDOR_BACKEND="hccl, cpu:GLOO", FLAGCX_CPU_ADAPTER="shm", FLAGCX_DEVICE_ADAPTER="npu:myccl,mlu:other")
    assert cfg.vendor_backends == (("", "hccl"), ("cpu", "gloo"))
    assert cfg.cpu_adapter == "torch_pg:gloo"  # the cpu entry wins over FLAGCX_CPU_ADAPTER
    assert cfg.device_adapters == (("npu", "myccl"), ("mlu", "other"))
    # a bare backend applies to the rank's accelerator only, never to CPU tensors
    assert vendor_backend("npu", "npu") == "hccl"
    assert vendor_backend("cpu", "cpu") == "gloo"
    assert vendor_backend("mlu", "npu") is None
    cfg = env(FLAGCX_VENDOR_BACKEND="npu:hccl", FLAGCX_CPU_ADAPTER="gloo")
    assert cfg.cpu_adapter == "gloo" and vendor_backend("cpu", "cpu") is None


@pytest.mark.parametrize(
    "name,value,words",
    [
        ("FLAGCX_VENDOR_BACKEND", "npu:hccl,npu:cncl", ["npu twice"]),
        ("FLAGCX_VENDOR_BACKEND", "hccl,cncl", ["the accelerator twice"]),
        ("FLAGCX_VENDOR_BACKEND", "npu:flagcx", ["cannot name 'flagcx'"]),
        ("FLAGCX_VENDOR_BACKEND", "npu:hc-cl", ["is not 'name' or 'type:name'"]),
        ("FLAGCX_DEVICE_ADAPTER", "myccl", ["is not 'type:name'", "npu:myccl"]),
        ("FLAGCX_DEVICE_ADAPTER", "cpu:gloo", ["FLAGCX_CPU_ADAPTER"]),
        ("FLAGCX_CPU_ADAPTER", "torch_pg", ["FLAGCX_VENDOR_BACKEND=cpu:<backend>"]),
        ("FLAGCX_CPU_ADAPTER", "my-adapter", ["auto, shm, gloo, mpi", "plugin"]),
    ],
)
def test_bad_selection_variables(env, name, value, words):
    with pytest.raises(ValueError) as info:
        env(**{name: value})
    for w in words:
        assert w in str(info.value)


def test_backend_string_with_vendor_device_types():
    """torch's own BackendConfig accepts vendor device types for flagcx; flagcx claims no device type's default."""
    assert BackendConfig(dist.Backend("cpu:gloo,npu:flagcx")).get_device_backend_map() == {"cpu": "gloo", "npu": "flagcx"}
    assert BackendConfig(dist.Backend("mlu:flagcx,musa:flagcx,xpu:flagcx")).get_device_backend_map() == dict.fromkeys(["mlu", "musa", "xpu"], "flagcx")
    assert dist.is_backend_available("cpu:gloo,npu:flagcx")
    assert {"npu", "mlu", "musa", "xpu", "hpu"} <= set(dist.Backend.backend_capability["flagcx"])
    assert "flagcx" not in dist.Backend.default_device_backend_map.values()
    assert set(BackendConfig(dist.Backend("flagcx")).get_device_backend_map()) == set(flagcx.frontends.process_group.DEVICES)


def _solo() -> Communicator:
    return Communicator(dist.HashStore(), 0, 1, name="solo")


@pytest.mark.parametrize(
    "values,words",
    [
        ({}, ["no adapter for meta tensors", "FLAGCX_VENDOR_BACKEND=meta:<c10d backend>", "FLAGCX_DEVICE_ADAPTER=meta:<adapter>"]),
        ({"FLAGCX_VENDOR_BACKEND": "meta:gloo"}, ["torch_pg:gloo", "declares devices cpu, cuda, not meta"]),
        ({"FLAGCX_VENDOR_BACKEND": "meta:nosuchccl"}, ["'nosuchccl' is not registered", "torch extension"]),
        ({"FLAGCX_DEVICE_ADAPTER": "meta:shm"}, ["moves cpu tensors, not meta", "FLAGCX_DEVICE_ADAPTER"]),
    ],
)
def test_accelerator_adapter_refusals(env, values, words):
    env(FLAGCX_CPU_ADAPTER="gloo", **values)
    comm = _solo()
    try:
        with pytest.raises(NotSupported) as info:
            comm.connect("meta:0")
        for w in words:
            assert w in str(info.value)
        x = torch.ones(3)
        comm.all_reduce(x)  # the CPU path is unaffected
        assert torch.equal(x, torch.ones(3))
    finally:
        comm.destroy()


def test_default_backend_of_device_type_and_missing_streams(env):
    """Unconfigured, a device type's default c10d backend (as a vendor extension registers it) is wrapped;
    a device module without streams/events is refused with a clear NotSupported before any backend is built."""
    with pytest.raises(NotSupported, match="no device module for 'meta'"):
        device_module(torch.device("meta"))
    if "METACCL" not in dist.Backend._plugins:
        dist.Backend.register_backend("metaccl", lambda *a: None, devices=["meta"])
    dist.Backend.default_device_backend_map["meta"] = "metaccl"
    env(FLAGCX_CPU_ADAPTER="gloo")
    comm = _solo()
    try:
        with pytest.raises(NotSupported) as info:
            comm.connect("meta:0")
        assert "torch_pg:metaccl" in str(info.value) and "no device module for 'meta'" in str(info.value)
    finally:
        comm.destroy()
        del dist.Backend.default_device_backend_map["meta"]
    assert "mpi adapter" in adapter_class("torch_pg:mpi").unavailable_reason(torch.device("cpu"))


def test_vendor_device_types_in_topology(env, tmp_path):
    acc = torch.accelerator.current_accelerator(check_available=True)
    assert detect.home_device_type() == (acc.type if acc is not None and acc.type != "mps" else "cpu")
    assert [detect.device_vendor(t) for t in ("npu", "mlu", "musa", "xpu", "cpu")] == ["huawei", "cambricon", "mthreads", "intel", "host"]
    topo = tmp_path / "topo.json"
    topo.write_text(json.dumps({"default": {"device_type": "npu"}}))
    env(FLAGCX_TOPO_FILE=str(topo))
    rec = detect.local_record()
    assert (rec.device_type, rec.vendor, rec.cluster) == ("npu", "huawei", "huawei:npu")


def test_creator_returning_no_backend_is_refused(env):
    if "NOBACKEND" not in dist.Backend._plugins:
        dist.Backend.register_backend("nobackend", lambda store, rank, size, timeout: None, devices=["cpu"])
    env(FLAGCX_VENDOR_BACKEND="cpu:nobackend")
    with pytest.raises(flagcx.FlagcxError, match="'nobackend' returned NoneType, not a c10d Backend or ProcessGroup"):
        _solo()
