"""pytest wiring: every test hands its ``subtests`` fixture to the harness, which reports each rank-side check through it.

pytest >= 9 has the fixture built in (the test extra asks for it); under an older pytest
(the GPU machine's image) the harness reports failed checks in one assertion instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers import harness


@pytest.fixture(autouse=True)
def _checks_as_subtests(request: pytest.FixtureRequest) -> Iterator[None]:
    try:
        harness.SUBTESTS = request.getfixturevalue("subtests")
    except pytest.FixtureLookupError:
        harness.SUBTESTS = None
    try:
        yield
    finally:
        harness.SUBTESTS = None


@pytest.fixture(autouse=True, scope="session")
def _flight_dumps_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Flight-recorder dumps of every rank (on timeouts and aborts) go to the session's temporary folder, not /tmp."""
    key = "TORCH_FR_DUMP_TEMP_FILE"
    old = os.environ.get(key)
    os.environ[key] = str(tmp_path_factory.mktemp("flight") / "rank_")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
