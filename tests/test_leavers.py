"""A rank that finished its part of a collective and destroyed its group is not an error for its peers (shm)."""

import pytest
import torch

from flagcx.adapters.shm import ShmAdapter

from .helpers.harness import assert_passed, run_suite

pytestmark = pytest.mark.skipif(ShmAdapter.unavailable_reason(torch.device("cpu")) is not None, reason="no shm transport here")


@pytest.mark.parametrize("nproc", [3, 4])
def test_peers_that_leave_early(nproc):
    assert_passed(run_suite("tests.ranks.leaver_suite:leavers", nproc, env={"FLAGCX_CPU_ADAPTER": "shm"}), min_checks=20)
