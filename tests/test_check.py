"""FLAGCX_CHECK=1: call fingerprints are compared across ranks before every collective."""

from .helpers.harness import assert_passed, run_suite


def test_check_mode_3_ranks():
    assert_passed(run_suite("tests.ranks.check_suite:check_suite", 3, env={"FLAGCX_CHECK": "1"}), min_checks=20)
