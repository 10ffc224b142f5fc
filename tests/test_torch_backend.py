"""Every torch.distributed op through backend "flagcx" (and "cpu:gloo,cuda:flagcx"), 2 and 4 ranks."""

import pytest

from .harness import assert_passed, run_suite


@pytest.mark.parametrize("nproc", [2, 4])
def test_torch_ops(nproc):
    assert_passed(run_suite("tests.torch_suite:torch_ops", nproc), min_checks=100)


def test_mixed_backend_string():
    outcome = run_suite("tests.torch_suite:torch_ops", 2, env={"FLAGCX_TEST_BACKEND": "cpu:gloo,cuda:flagcx"})
    assert_passed(outcome, min_checks=100)
