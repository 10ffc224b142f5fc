"""Topology detection, overrides, the topology file, cluster formation and ``python -m flagcx.topology``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import flagcx
from flagcx import InvalidArgument
from flagcx.topology import detect
from flagcx.topology.__main__ import as_json, as_text, link_matrix
from flagcx.topology.clusters import form_clusters
from flagcx.topology.detect import RankRecord, host_identity, load_topo_file, local_record

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(monkeypatch):
    """Set FLAGCX_* / launcher variables for one test; the config is re-read before and after."""
    for name in ("FLAGCX_HOST_ID", "FLAGCX_CLUSTER_ID", "FLAGCX_TOPO_FILE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)

    def set_env(**values: str) -> None:
        for k, v in values.items():
            monkeypatch.setenv(k, v)
        flagcx.config.reload()

    flagcx.config.reload()
    yield set_env
    monkeypatch.undo()
    flagcx.config.reload()


def _rec(cluster: str, host: str = "h", device_type: str = "cpu", pid: int = 1, bus: str = "", links=None) -> RankRecord:
    return RankRecord(host, host, pid, device_type, "v", cluster, pci_bus_id=bus, links=links or {})


def test_local_record_fields_and_json(env):
    rec = local_record()
    assert rec.device_type == detect.home_device_type() and rec.cluster == f"{rec.vendor}:{rec.device_type}"
    assert rec.pid == os.getpid() and rec.host == host_identity() and rec.hostname and rec.local_rank == -1
    assert isinstance(rec.numa_node, int)
    if rec.device_type == "cpu":
        assert rec.vendor == "host" and rec.device_index == -1 and rec.pci_bus_id == ""
        assert rec.links == {} and rec.link_info == "n/a"
    else:  # a GPU machine: the device's PCI address, and links from NVML or a reason why not
        assert rec.device_index >= 0 and len(rec.pci_bus_id) == 16 and rec.link_info
    text = json.dumps(rec.to_json())
    assert len(text) < 2048, f"a rank's record should stay small, got {len(text)} bytes"
    assert RankRecord.from_json(json.loads(text)) == rec
    # records from a peer that sends fewer fields (older) still parse, with defaults
    short = {k: v for k, v in rec.to_json().items() if k not in ("links", "numa_node")}
    assert RankRecord.from_json(short).numa_node == -1


def test_launcher_local_rank_and_env_overrides(env):
    env(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4", FLAGCX_HOST_ID="node-x", FLAGCX_CLUSTER_ID="pool-b")
    rec = local_record()
    assert rec.local_rank == 1
    assert rec.host == "node-x" and host_identity() == "node-x"
    assert rec.cluster == "pool-b"


def test_topology_file_precedence(env, tmp_path):
    import socket

    hostname = socket.gethostname()
    path = tmp_path / "topo.json"
    path.write_text(
        json.dumps(
            {
                "default": {"cluster": "site", "numa_node": 3},
                "hosts": {hostname: {"cluster": "by-host", "host": "box-1"}, f"{hostname}:2": {"cluster": "by-local-rank"}},
                "ranks": {"7": {"cluster": "by-rank", "pci_bus_id": "0000:1A:00.0", "links": {"0000:1b:00.0": "NV4"}}},
            }
        )
    )
    env(FLAGCX_TOPO_FILE=str(path))
    rec = local_record()  # no launcher: default + host entries only
    assert (rec.cluster, rec.host, rec.numa_node) == ("by-host", "box-1", 3)
    assert host_identity() == "box-1"
    env(RANK="3", WORLD_SIZE="8", LOCAL_RANK="2")
    assert local_record().cluster == "by-local-rank"
    env(RANK="7", LOCAL_RANK="0")
    rec = local_record()
    assert rec.cluster == "by-rank" and rec.pci_bus_id == "00000000:1a:00.0"
    assert rec.links == {"00000000:1b:00.0": "NV4"} and rec.link_info == "topology file"
    env(FLAGCX_CLUSTER_ID="env-wins", FLAGCX_HOST_ID="env-host")
    rec = local_record()
    assert (rec.cluster, rec.host) == ("env-wins", "env-host")


def test_topology_file_device_type_changes_cluster(env, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"default": {"device_type": "npu", "vendor": "ascend"}}))
    env(FLAGCX_TOPO_FILE=str(path))
    rec = local_record()
    assert (rec.device_type, rec.vendor, rec.cluster) == ("npu", "ascend", "ascend:npu")


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", ["not valid JSON"]),
        ('["a"]', ["JSON object"]),
        ('{"nodes": {}}', ["unknown section", "nodes"]),
        ('{"default": {"colour": "red"}}', ["unknown field", "colour"]),
        ('{"ranks": {"x": {}}}', ["not a global rank"]),
        ('{"ranks": {"1": {"numa_node": "zero"}}}', ["numa_node", "int"]),
        ('{"hosts": {"a": 3}}', ["must be an object"]),
    ],
)
def test_topology_file_errors(env, tmp_path, content, words):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InvalidArgument) as info:
        load_topo_file(str(path))
    text = str(info.value)
    assert "FLAGCX_TOPO_FILE" in text and str(path) in text
    for w in words:
        assert w in text, text
    env(FLAGCX_TOPO_FILE=str(path))
    with pytest.raises(InvalidArgument):
        local_record()


def test_topology_file_missing(env, tmp_path):
    env(FLAGCX_TOPO_FILE=str(tmp_path / "absent.json"))
    with pytest.raises(InvalidArgument, match="cannot be read"):
        local_record()


def test_clusters_non_contiguous_and_ordered():
    records = [_rec(c) for c in "BACABB"]
    clusters = form_clusters(records)
    assert [(c.label, c.ranks) for c in clusters] == [("B", (0, 4, 5)), ("A", (1, 3)), ("C", (2,))]
    assert clusters[0].local_rank(4) == 1 and clusters[0].size == 3
    assert len(form_clusters([_rec("x")] * 3)) == 1


def test_clusters_hosts():
    records = [_rec("A", "h1"), _rec("A", "h2"), _rec("A", "h1"), _rec("B", "h3")]
    clusters = form_clusters(records)
    assert clusters[0].hosts == ("h1", "h2") and clusters[1].hosts == ("h3",)


def test_clusters_mixed_device_types_rejected():
    with pytest.raises(ValueError, match="mixes device types.*rank 0: cuda.*rank 1: cpu.*FLAGCX_CLUSTER_ID"):
        form_clusters([_rec("same", device_type="cuda"), _rec("same", device_type="cpu")])


def test_link_matrix_and_renderers():
    a = "00000000:19:00.0"
    b = "00000000:3b:00.0"
    records = [
        _rec("gpu", "h0", "cuda", 10, a, {b: "NV18"}),
        _rec("gpu", "h0", "cuda", 11, b, {a: "NV18"}),
        _rec("cpu", "h0", "cpu", 12),
        _rec("cpu", "h1", "cpu", 13),
    ]
    matrix = link_matrix(records)
    assert matrix[0] == ["X", "NV18", "HOST", "NET"]
    assert matrix[1][0] == "NV18" and matrix[3][0] == "NET" and matrix[2][2] == "X"
    data = as_json(records)
    assert data["mode"] == "heterogeneous" and data["world_size"] == 4
    assert [c["ranks"] for c in data["clusters"]] == [[0, 1], [2, 3]]
    text = as_text(records)
    assert "NV18" in text and "heterogeneous" in text and "h1: CPU ranks only" in text
    bad = as_json([_rec("x", device_type="cuda"), _rec("x")])
    assert bad["mode"] == "error" and "mixes device types" in bad["error"]


def test_nvml_unavailable_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    links, info = detect._nvml_links("00000000:19:00.0")
    assert links == {} and info.startswith("unknown") and "nvidia-ml-py" in info


def _run(args: list[str], env_extra: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a CLI with no FLAGCX_* / launcher variables and no GPU (the same output on every machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAGCX_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({"CUDA_VISIBLE_DEVICES": ""}, **(env_extra or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_alone_table_and_json():
    table = _run(["-m", "flagcx.topology"])
    assert table.returncode == 0, table.stderr
    assert "1 rank(s), 1 host(s), 1 cluster(s), homogeneous" in table.stdout
    assert "rank  host" in table.stdout and "host:cpu" in table.stdout
    out = _run(["-m", "flagcx.topology", "--json"], {"FLAGCX_CLUSTER_ID": "solo"})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["world_size"] == 1 and data["ranks"][0]["cluster"] == "solo" and data["links"] == [["X"]]


def test_cli_under_launcher_gathers_every_rank(tmp_path):
    topo = tmp_path / "topo.json"
    topo.write_text(json.dumps({"default": {"cluster": "even"}, "ranks": {"1": {"cluster": "odd"}}}))
    out = _run(["-m", "flagcx.launch", "--nproc", "3", "-m", "flagcx.topology", "--json"], {"FLAGCX_TOPO_FILE": str(topo)})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)  # rank 0 alone prints
    assert data["world_size"] == 3 and data["mode"] == "heterogeneous"
    assert [(c["label"], c["ranks"]) for c in data["clusters"]] == [("even", [0, 2]), ("odd", [1])]
    assert [r["local_rank"] for r in data["ranks"]] == [0, 1, 2]
    assert len({r["pid"] for r in data["ranks"]}) == 3
