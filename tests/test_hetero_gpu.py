"""Heterogeneous mode on a GPU machine: 2 CUDA ranks (NCCL cluster) + 2 CPU-only ranks, interleaved in rank order (1 + 3 on one GPU)."""

import pytest
import torch

from .helpers.harness import assert_passed, run_suite

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU (runs on the GPU machine)"),
]

GPU_RANKS = (0, 2) if torch.cuda.device_count() >= 2 else (0,)


def _env(rank: int) -> dict:
    gpu = rank in GPU_RANKS
    return {
        "CUDA_VISIBLE_DEVICES": str(GPU_RANKS.index(rank)) if gpu else "",
        "HETERO_GPU_RANKS": ",".join(map(str, GPU_RANKS)),
        "FLAGCX_HETERO_CHUNK": "256K",  # several chunks even for the matrix's larger sizes
        "NCCL_NVLS_ENABLE": "0",
    }


def test_hetero_cuda_and_cpu_ranks():
    assert_passed(run_suite("tests.ranks.hetero_gpu_suite:hetero_gpu_matrix", 4, env=_env), min_checks=300)


def test_hetero_bench_smoke(tmp_path):
    from benchmarks.hetero_bench import main

    out = tmp_path / "hetero"
    assert main(["--gpus", str(len(GPU_RANKS)), "--cpus", str(4 - len(GPU_RANKS)), "--min", "1M", "--max", "4M", "--out", str(out)]) == 0
    assert out.with_suffix(".json").exists() and out.with_suffix(".md").exists()
