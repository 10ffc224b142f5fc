"""Ranks that leave or fail a collective: a rank that finished its part and destroyed its group is not an error
for its peers (shm); a collective that some ranks failed fails on a rank that enters it later (shm, Gloo, heterogeneous)."""

import pytest
import torch

from flagcx.adapters.shm import ShmAdapter

from .helpers.harness import assert_passed, run_suite

pytestmark = pytest.mark.skipif(ShmAdapter.unavailable_reason(torch.device("cpu")) is not None, reason="no shm transport here")


@pytest.mark.parametrize("nproc", [3, 4])
def test_peers_that_leave_early(nproc):
    assert_passed(run_suite("tests.ranks.leaver_suite:leavers", nproc, env={"FLAGCX_CPU_ADAPTER": "shm"}), min_checks=20)


def test_a_late_rank_fails_the_collective_its_peers_failed():
    assert_passed(run_suite("tests.ranks.leaver_suite:late", 3, env={"FLAGCX_CPU_ADAPTER": "shm"}), min_checks=2)
