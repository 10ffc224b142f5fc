"""flagcx's logging: the application's handlers see its records unless FLAGCX_DEBUG asks for flagcx's own."""

from __future__ import annotations

import logging
import sys

import pytest

from flagcx import config


def _ours(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if getattr(h, "_flagcx", False)]


@pytest.fixture
def flagcx_logger():
    yield logging.getLogger("flagcx")
    config.reload()  # the environment monkeypatch restored


def test_records_reach_the_applications_handlers_by_default(flagcx_logger, monkeypatch, caplog):
    monkeypatch.delenv("FLAGCX_DEBUG", raising=False)
    config.reload()
    assert not _ours(flagcx_logger) and flagcx_logger.propagate and flagcx_logger.level == logging.NOTSET
    with caplog.at_level(logging.INFO):
        logging.getLogger("flagcx.shm").info("seen by the application")
    assert ("flagcx.shm", logging.INFO, "seen by the application") in caplog.record_tuples


def test_flagcx_debug_installs_its_own_handler_and_keeps_records_from_the_root(flagcx_logger, monkeypatch, caplog, capsys):
    monkeypatch.setenv("FLAGCX_DEBUG", "debug")
    config.reload()
    (ours,) = _ours(flagcx_logger)
    assert not flagcx_logger.propagate and flagcx_logger.level == logging.DEBUG
    monkeypatch.setattr(ours, "stream", sys.stderr)  # built before capsys replaced stderr
    logging.getLogger("flagcx.nccl").debug("for flagcx's handler")
    assert "DEBUG flagcx.nccl: for flagcx's handler" in capsys.readouterr().err
    assert not [r for r in caplog.records if r.name == "flagcx.nccl"]
    config.reload()
    assert len(_ours(flagcx_logger)) == 1, "a reload adds no second handler"
    monkeypatch.delenv("FLAGCX_DEBUG")
    config.reload()
    assert not _ours(flagcx_logger) and flagcx_logger.propagate, "unsetting FLAGCX_DEBUG hands the records back"
