"""Soak: random collectives across 4 ranks, every result checked exactly (tests/ranks/soak_suite.py).

Short by default (300 ops per transport); FLAGCX_SOAK_OPS=10000 makes it a long run.
Transports: the default CPU path (shm on one host), Gloo (truly asynchronous ops), and
a heterogeneous communicator (two interleaved clusters on shm and Gloo, small chunks on
2 lanes). ``python -m tests.ranks.soak_suite --ops 10000 --out FILE`` runs the long default
soak and writes its summary.
"""

from __future__ import annotations

import os

import pytest
import torch

from flagcx.adapters.shm import ShmAdapter

from .ranks.soak_suite import format_summary, run_soak

NOPS = int(os.environ.get("FLAGCX_SOAK_OPS", "300"))
SHM_OK = ShmAdapter.unavailable_reason(torch.device("cpu")) is None


def _hetero(rank: int) -> dict:
    label = "ABAB"[rank]
    return {
        "FLAGCX_CLUSTER_ID": f"cl-{label}",
        "FLAGCX_CPU_ADAPTER": "shm" if label == "A" else "gloo",
        "FLAGCX_HETERO_CHUNK": "16K",
        "FLAGCX_HETERO_LANES": "2",
    }


TRANSPORTS = {
    "default": None,
    "gloo": lambda rank: {"FLAGCX_CPU_ADAPTER": "gloo"},
    "hetero": _hetero,
}


@pytest.mark.soak
@pytest.mark.parametrize(
    "transport", [t if t != "hetero" else pytest.param(t, marks=pytest.mark.skipif(not SHM_OK, reason="shm not built")) for t in TRANSPORTS]
)
def test_soak(transport):
    summary = run_soak(NOPS, env=TRANSPORTS[transport])
    print(format_summary(summary, "today"))
    assert summary["errors"] == [], summary["errors"]
    assert summary["mismatches"] == [], f"{len(summary['mismatches'])} mismatches, first: {summary['mismatches'][:5]}"
    assert summary["executed"] == [NOPS] * 4
    assert min(summary["checked"]) > NOPS // 2  # the rank outside the subgroup skips its ops
