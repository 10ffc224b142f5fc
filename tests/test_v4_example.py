"""examples/deepseek_v4_oproj.py end to end: real ranks through ``python -m flagcx.launch``, CPU over Gloo.

World TP 16 / o-group TP 8 on 16 ranks over 2 simulated hosts (FLAGCX_HOST_ID per rank,
read back by host detection inside init_tp_groups), plus smaller runs: interleaved hosts,
bfloat16 with data-parallel copies and a block with no tokens. The example itself compares the nested-TP
output with a one-process float64 reference and exits non-zero on a mismatch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flagcx.topology import plan_tp_groups

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "deepseek_v4_oproj.py"


def run_example(tmp_path: Path, nproc: int, *args: str, timeout: float = 420) -> dict:
    report = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLAGCX_TIMEOUT": os.environ.get("FLAGCX_TEST_TIMEOUT", "120")}
    cmd = [sys.executable, "-m", "flagcx.launch", "--nproc", str(nproc), str(EXAMPLE), *args, "--report", str(report)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert " OK" in proc.stdout, proc.stdout
    data = json.loads(report.read_text())
    assert data["ok"] and data["max_rel_error"] <= data["tolerance"]
    assert data["world_size"] == nproc
    return data


def assert_blocks_single_host(data: dict, nhosts: int) -> None:
    hosts = data["hosts"]
    assert len(set(hosts)) == nhosts, f"detected hosts {sorted(set(hosts))}"
    assert data["cross_host_blocks"] == []
    for block in data["ogroup_tp_groups"]:
        assert len({hosts[r] for r in block}) == 1, f"block {block} spans hosts"
    plan = plan_tp_groups(data["world_size"], data["tp"], data["ogroup_tp"], hosts=hosts, o_groups=data["o_groups"])
    assert plan.ogroup_tp_groups == data["ogroup_tp_groups"]
    assert plan.ogroup_replica_groups == data["ogroup_replica_groups"]


def test_world_tp16_ogroup_tp8_two_hosts(tmp_path):
    data = run_example(tmp_path, 16, "--hosts", "2")
    assert (data["tp"], data["ogroup_tp"]) == (16, 8)
    assert_blocks_single_host(data, 2)
    assert data["ogroup_tp_groups"] == [list(range(8)), list(range(8, 16))]
    assert data["hosts"] == ["sim-host-0"] * 8 + ["sim-host-1"] * 8


@pytest.mark.parametrize(
    "nproc,args,nhosts",
    [
        (4, ["--tp", "4", "--ogroup-tp", "2", "--hosts", "2", "--interleave", "--tokens", "13"], 2),
        (4, ["--tp", "2", "--ogroup-tp", "1", "--dtype", "bfloat16", "--tokens", "1", "--hidden", "24"], 1),
    ],
    ids=["tp4-otp2-interleaved", "tp2-otp1-bf16-dp2-empty-share"],
)
def test_small_layouts(tmp_path, nproc, args, nhosts):
    data = run_example(tmp_path, nproc, *args)
    assert_blocks_single_host(data, nhosts)
    if "--interleave" in args:
        assert data["ogroup_tp_groups"] == [[0, 2], [1, 3]] and data["ogroup_replica_groups"] == [[0, 1], [2, 3]]
