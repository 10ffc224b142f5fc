"""GPU tests (2 CUDA devices): the core's CUDA path over NCCL and the torch backend on CUDA."""

import pytest
import torch

from .helpers.harness import assert_passed, run_suite

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (runs on the GPU machine)"),
]


def test_comm_matrix_cuda():
    assert_passed(run_suite("tests.ranks.gpu_suite:gpu_comm_matrix", 2), min_checks=100)


def test_torch_backend_cuda_bound_device():
    assert_passed(run_suite("tests.ranks.gpu_suite:gpu_torch", 2), min_checks=5)


def test_ddp_identical_to_nccl():
    assert_passed(run_suite("tests.ranks.gpu_suite:gpu_ddp", 2), min_checks=3)


def test_mixed_backend_string_cuda():
    assert_passed(run_suite("tests.ranks.gpu_suite:gpu_ddp", 2, env={"FLAGCX_TEST_BACKEND": "cpu:gloo,cuda:flagcx"}), min_checks=3)
