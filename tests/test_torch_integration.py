"""DDP, FSDP2, DeviceMesh + DTensor and functional collectives (eager and compiled) on backend "flagcx"."""

from .helpers.harness import assert_passed, run_suite


def test_integration_4_ranks():
    assert_passed(run_suite("tests.ranks.integration_suite:integration", 4), min_checks=8)
