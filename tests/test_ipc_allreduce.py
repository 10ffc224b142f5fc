"""The peer-mapped small-message CUDA allreduce (flagcx.adapters.nccl.ipc_allreduce): 2 and 4 processes on one GPU.

Marked gpu; skipped without CUDA or Triton. Checks every dtype the path takes, one-shot
and two-shot, sizes from 4 B to its 4 MiB limit (odd ones included), in place and out of
place, eager and replayed from CUDA graphs with new data, bit for bit.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from .helpers.harness import assert_passed, run_suite

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton"),
]


@pytest.mark.parametrize("nproc", [2, 4])
def test_ipc_allreduce_on_one_gpu(nproc: int) -> None:
    assert_passed(run_suite("tests.ranks.ipc_suite:ipc_suite", nproc, env={"FLAGCX_TIMEOUT": "120"}, timeout=900), min_checks=13)
