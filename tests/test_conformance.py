"""Conformance checks on backend "flagcx": FlagCX's example calls, sparse all_reduce, all_gather_coalesced, monitored_barrier; config errors."""

import pytest

from flagcx import ConfigError, config

from .helpers.harness import assert_passed, run_suite


@pytest.mark.parametrize("nproc", [3, 4])
def test_conformance(nproc):
    assert_passed(run_suite("tests.ranks.conformance_suite:conformance", nproc), min_checks=15)


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("FLAGCX_TIMEOUT", "ten", ["FLAGCX_TIMEOUT='ten'", "FLAGCX_TIMEOUT=300"]),
        ("FLAGCX_TIMEOUT", "-1", ["must be positive"]),
        ("FLAGCX_SHM_BUFFER", "lots", ["byte count", "FLAGCX_SHM_BUFFER=4M"]),
        ("FLAGCX_DEBUG", "LOUD", ["WARN, INFO, DEBUG"]),
    ],
)
def test_bad_environment_gives_config_error(name, value, words, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        config.reload()
    for w in words:
        assert w in str(info.value)
    assert isinstance(info.value, ValueError) and str(info.value).startswith("flagcx")
    monkeypatch.delenv(name)
    config.reload()
