"""The correctness matrix on the Gloo adapter (FLAGCX_CPU_ADAPTER=gloo), 2 and 4 ranks."""

import pytest

from .helpers.harness import assert_passed, run_suite


@pytest.mark.parametrize("nproc", [2, 4])
def test_gloo_matrix(nproc):
    assert_passed(run_suite("tests.helpers.matrix:comm_matrix", nproc, env={"FLAGCX_CPU_ADAPTER": "gloo"}), min_checks=100)
