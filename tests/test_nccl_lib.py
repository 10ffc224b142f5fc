"""The NCCL binding on a machine without a GPU: discovery, versions, the clone table, clean errors.

Needs the NCCL wheel (``pip install nvidia-nccl-cu13``); ncclGetVersion and ncclGetUniqueId
work without a GPU and ncclCommInitRank fails with NCCL's own error. Runs where the
environment must differ at process start (the dynamic loader's LD_LIBRARY_PATH, the
cached ``load()``) go to subprocesses; the rest change the environment and call
``flagcx.config.reload()``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from flagcx import FlagcxError, FlagcxTimeout, config
from flagcx.adapters import AdapterContext, adapter_class
from flagcx.adapters.nccl import NcclAdapter
from flagcx.adapters.nccl import lib as nccl_lib
from flagcx.adapters.nccl.lib import BUILTIN_CLONES, Clone, LibraryError, NcclLib

WHEEL = nccl_lib.wheel_library()
needs_wheel = pytest.mark.skipif(WHEEL is None, reason="the NCCL wheel is not installed: pip install nvidia-nccl-cu13")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a usable GPU")


def _wheel_version() -> str:
    for dist_ in importlib.metadata.distributions():
        name = (dist_.metadata["Name"] or "").lower()
        if name.startswith("nvidia-nccl-cu"):
            return ".".join(dist_.version.split(".")[:3])
    raise AssertionError("no nvidia-nccl-cu* distribution found although the wheel's library exists")


@pytest.fixture
def env(monkeypatch):
    """Set FLAGCX_* variables for one test (config re-read before and after)."""
    monkeypatch.delenv("FLAGCX_NCCL_LIB", raising=False)
    monkeypatch.delenv("FLAGCX_NCCL_CLONES", raising=False)

    def set_env(**values: str) -> None:
        for k, v in values.items():
            monkeypatch.setenv(k, v)
        config.reload()

    yield set_env
    monkeypatch.undo()
    config.reload()


def _subprocess(code: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FLAGCX_NCCL_LIB", "FLAGCX_NCCL_CLONES", "FLAGCX_DEBUG")}
    env.update(extra_env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------- versions and declarations
def test_parse_version_both_encodings():
    assert nccl_lib.parse_version(23203) == (2, 32, 3)
    assert nccl_lib.parse_version(22809) == (2, 28, 9)
    assert nccl_lib.parse_version(20903) == (2, 9, 3)  # first version with the 5-digit encoding
    assert nccl_lib.parse_version(2708) == (2, 7, 8)
    assert nccl_lib.parse_version(2804) == (2, 8, 4)


def test_cdef_uses_the_entry_prefix():
    text = nccl_lib.cdef("mccl")
    for f in nccl_lib.FUNCTIONS:
        assert f"mccl{f.suffix}(" in text
    assert "nccl" not in text


def test_clone_config_parsing(env):
    env(FLAGCX_NCCL_CLONES="libfoo.so:foo, /opt/x/libbar.so.1:bar")
    assert config.get().nccl_clones == (("libfoo.so", "foo"), ("/opt/x/libbar.so.1", "bar"))
    table = nccl_lib.clone_table()
    assert table[:2] == [Clone("libfoo.so", "foo", "FLAGCX_NCCL_CLONES"), Clone("/opt/x/libbar.so.1", "bar", "FLAGCX_NCCL_CLONES")]
    assert table[2:] == list(BUILTIN_CLONES)
    assert nccl_lib.prefix_for("/somewhere/libbar.so.1") == "bar"
    assert nccl_lib.prefix_for("/opt/maca/lib64/libmccl.so") == "mccl"
    with pytest.raises(ValueError, match="library:prefix"):
        env(FLAGCX_NCCL_CLONES="libfoo.so")


def test_builtin_table():
    assert BUILTIN_CLONES[0] == Clone("libnccl.so.2", "nccl", "NVIDIA NCCL", tested=True)
    by_lib = {c.library: c.prefix for c in BUILTIN_CLONES}
    assert by_lib["librccl.so.1"] == "nccl" and by_lib["libmccl.so"] == "mccl"
    assert [c.library for c in BUILTIN_CLONES if c.tested] == ["libnccl.so.2"]


# ---------------------------------------------------------------------- discovery
@needs_wheel
def test_discovery_picks_the_wheel_and_logs_it():
    run = _subprocess(
        """
        import json
        from flagcx.adapters.nccl import lib as nccl_lib
        lib = nccl_lib.load()
        print(json.dumps([lib.path, lib.source, lib.prefix, lib.version_string, nccl_lib.load() is lib]))
        """,
        FLAGCX_DEBUG="INFO",
    )
    assert run.returncode == 0, run.stderr
    path, source, prefix, version, cached = json.loads(run.stdout.strip().splitlines()[-1])
    assert (path, source, prefix, cached) == (WHEEL, "nvidia-nccl wheel", "nccl", True)
    assert version == _wheel_version()
    assert f"using {os.path.realpath(WHEEL)} (nvidia-nccl wheel, symbol prefix 'nccl'), version {version}" in run.stderr


@needs_wheel
def test_explicit_library(env):
    env(FLAGCX_NCCL_LIB=WHEEL)
    assert nccl_lib.candidates() == [(WHEEL, "nccl", "FLAGCX_NCCL_LIB")]
    lib = NcclLib(*nccl_lib.candidates()[0])
    assert lib.version_string == _wheel_version()
    assert lib.resolved_path == os.path.realpath(WHEEL)


@needs_wheel
def test_bogus_explicit_library_is_a_clear_error(env, tmp_path):
    run = _subprocess(
        """
        from flagcx import FlagcxError
        from flagcx.adapters.nccl import lib as nccl_lib
        try:
            nccl_lib.load()
        except FlagcxError as exc:
            print("ERROR", exc)
        """,
        FLAGCX_NCCL_LIB="/nonexistent/dir/libnccl.so.2",
    )
    assert run.returncode == 0, run.stderr
    text = run.stdout.strip().splitlines()[-1]
    assert text.startswith("ERROR") and "cannot load /nonexistent/dir/libnccl.so.2: " in text and "(FLAGCX_NCCL_LIB)" in text
    assert "cannot open shared object file" in text and "pip install nvidia-nccl-cu13" in text

    env(FLAGCX_NCCL_LIB="/nonexistent/libunknown.so")
    with pytest.raises(FlagcxError, match="no such file"):
        nccl_lib.candidates()
    junk = tmp_path / "libjunk.so"
    junk.write_text("not a library")
    env(FLAGCX_NCCL_LIB=str(junk))
    with pytest.raises(FlagcxError, match="FLAGCX_NCCL_CLONES=libjunk.so:<prefix>"):
        nccl_lib.candidates()
    if shutil.which("cc") is not None:  # a real library without any known prefix
        (tmp_path / "other.c").write_text("int otherGetVersion(int* v) { *v = 1; return 0; }\n")
        other = tmp_path / "libother.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(other), str(tmp_path / "other.c")], check=True, capture_output=True)
        env(FLAGCX_NCCL_LIB=str(other))
        with pytest.raises(FlagcxError, match="FLAGCX_NCCL_CLONES=libother.so:<prefix>"):
            nccl_lib.candidates()
        env(FLAGCX_NCCL_LIB=str(other), FLAGCX_NCCL_CLONES="libother.so:other")
        with pytest.raises(LibraryError, match="lacks required symbol"):
            NcclLib(*nccl_lib.candidates()[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA torch has already loaded libnccl.so.2, so the loader finds it")
def test_no_library_anywhere_lists_what_was_tried():
    run = _subprocess(
        """
        from flagcx import FlagcxError
        from flagcx.adapters.nccl import lib as nccl_lib
        nccl_lib.wheel_library = lambda: None  # as if the wheel were not installed
        try:
            print("LOADED", nccl_lib.load().path)
        except FlagcxError as exc:
            print("ERROR", exc)
        """,
        FLAGCX_NCCL_CLONES="/nonexistent/libfoo.so.1:foo",
        LD_LIBRARY_PATH="",
    )
    assert run.returncode == 0, run.stderr
    text = run.stdout.strip().splitlines()[-1]
    if text.startswith("LOADED"):
        pytest.skip(f"this machine has an NCCL-API library on the loader path: {text}")
    assert text.startswith("ERROR flagcx: no NCCL library could be loaded")
    assert "nvidia-nccl-cu* wheel: not installed" in text and "/nonexistent/libfoo.so.1" in text
    for clone in BUILTIN_CLONES:
        assert f"cannot load {clone.library}:" in text
    assert "pip install nvidia-nccl-cu13" in text and "FLAGCX_NCCL_LIB" in text


@needs_wheel
def test_missing_required_symbols_name_them():
    with pytest.raises(LibraryError) as info:
        NcclLib(WHEEL, "mccl", "test")
    text = str(info.value)
    assert "mcclGetVersion" in text and "mcclAllReduce" in text and WHEEL in text
    assert "FLAGCX_NCCL_CLONES=libnccl.so.2:<prefix>" in text


@needs_wheel
def test_nccl_through_its_clone_table_entry():
    """The builtin NCCL entry, found by the system loader (LD_LIBRARY_PATH must be set at process start)."""
    run = _subprocess(
        """
        import json
        from flagcx.adapters.nccl.lib import BUILTIN_CLONES, NcclLib
        entry = BUILTIN_CLONES[0]
        lib = NcclLib(entry.library, entry.prefix, "system loader")
        print(json.dumps([lib.resolved_path, lib.version_string, len(lib.get_unique_id())]))
        """,
        LD_LIBRARY_PATH=os.path.dirname(WHEEL),
    )
    assert run.returncode == 0, run.stderr
    resolved, version, uid_len = json.loads(run.stdout.strip().splitlines()[-1])
    assert resolved == os.path.realpath(WHEEL)
    assert version == _wheel_version() and uid_len == nccl_lib.UNIQUE_ID_BYTES


@needs_wheel
def test_nccl_through_a_clones_entry(env):
    env(FLAGCX_NCCL_CLONES=f"{WHEEL}:nccl")
    entry = nccl_lib.clone_table()[0]
    assert entry == Clone(WHEEL, "nccl", "FLAGCX_NCCL_CLONES")
    found = nccl_lib.candidates()
    assert found[0] == (WHEEL, "nccl", "nvidia-nccl wheel")
    assert found[1][:2] == (WHEEL, "nccl") and found[1][2].startswith("system loader")
    lib = NcclLib(entry.library, entry.prefix, found[1][2])
    assert lib.version_string == _wheel_version()
    assert len(lib.get_unique_id()) == nccl_lib.UNIQUE_ID_BYTES


@needs_wheel
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build the clone shim")
def test_clone_with_another_prefix(env, tmp_path):
    """A real library whose symbols are named fake* (forwarding to NCCL) binds through a FLAGCX_NCCL_CLONES entry."""
    nccl = NcclLib(WHEEL, "nccl")
    lines = ["#include <stddef.h>", "#include <stdint.h>", f"typedef struct {{ char internal[{nccl_lib.UNIQUE_ID_BYTES}]; }} flagcx_unique_id;"]
    for f in nccl_lib.FUNCTIONS:
        if not nccl.has(f.suffix):
            continue
        params = ", ".join(f"{t} {n}" for t, n in f.params) or "void"
        args = ", ".join(n for _, n in f.params)
        lines.append(f"{f.restype} nccl{f.suffix}({params});")
        lines.append(f"{f.restype} fake{f.suffix}({params}) {{ return nccl{f.suffix}({args}); }}")
    (tmp_path / "shim.c").write_text("\n".join(lines) + "\n")
    lib_dir = os.path.dirname(WHEEL)
    shim = tmp_path / "libfakeccl.so"
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "shim.c"), f"-L{lib_dir}", "-l:libnccl.so.2", f"-Wl,-rpath,{lib_dir}"],
        check=True,
        capture_output=True,
    )
    env(FLAGCX_NCCL_LIB=str(shim), FLAGCX_NCCL_CLONES="libfakeccl.so:fake")
    assert nccl_lib.candidates() == [(str(shim), "fake", "FLAGCX_NCCL_LIB")]
    lib = NcclLib(*nccl_lib.candidates()[0])
    assert lib.prefix == "fake" and lib.version_string == _wheel_version()
    assert lib.optional == nccl.optional
    assert len(lib.get_unique_id()) == nccl_lib.UNIQUE_ID_BYTES
    if not torch.cuda.is_available():
        with pytest.raises(FlagcxError, match="fakeCommInitRank returned"):
            lib.comm_init_rank(1, lib.get_unique_id(), 0)


# ---------------------------------------------------------------------- calls without a GPU
@needs_wheel
def test_unique_ids():
    lib = NcclLib(WHEEL, "nccl")
    a, b = lib.get_unique_id(), lib.get_unique_id()
    assert len(a) == len(b) == nccl_lib.UNIQUE_ID_BYTES and a != b
    assert lib.has("CommSplit") and lib.has("GetLastError") and not lib.has("CommMcDevice")


@needs_wheel
@no_gpu
def test_comm_init_rank_fails_cleanly_without_gpu():
    lib = NcclLib(WHEEL, "nccl")
    with pytest.raises(FlagcxError) as info:
        lib.comm_init_rank(1, lib.get_unique_id(), 0)
    text = str(info.value)
    assert "ncclCommInitRank returned" in text and "last error:" in text
    rc = int(text.split("ncclCommInitRank returned ")[1].split(":")[0])
    assert lib.ffi.string(lib.GetErrorString(rc)).decode() in text


@needs_wheel
@no_gpu
def test_adapter_fails_cleanly_without_gpu():
    ctx = AdapterContext(store=dist.HashStore(), rank=0, size=1, timeout=5, device=torch.device("cuda", 0), label="t")
    with pytest.raises(FlagcxError) as info:
        adapter_class("nccl")(ctx)
    text = str(info.value)
    assert "init (rank 0)" in text and "ncclCommInitRank returned" in text and "torch.cuda.is_available() is False" in text


@needs_wheel
def test_adapter_init_times_out_when_a_rank_is_missing():
    ctx = AdapterContext(store=dist.HashStore(), rank=0, size=2, timeout=0.5, device=torch.device("cuda", 0), label="t")
    with pytest.raises(FlagcxTimeout, match=r"rank\(s\) \[1\] did not arrive"):
        NcclAdapter(ctx)


def test_unavailable_reason():
    assert "CUDA tensors" in NcclAdapter.unavailable_reason(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert "torch.cuda.is_available() is False" in NcclAdapter.unavailable_reason(torch.device("cuda"))
    caps = NcclAdapter.capabilities
    assert caps.stream_ordered and caps.devices == frozenset({"cuda"})
    assert {op.name for op in caps.reduce_ops} == {"SUM", "PROD", "MAX", "MIN", "AVG"}
    assert len(caps.reduce_dtypes) == 8 and torch.bfloat16 in caps.reduce_dtypes
