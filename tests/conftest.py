"""pytest wiring: every test hands its ``subtests`` fixture to the harness, which reports each rank-side check through it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import harness


@pytest.fixture(autouse=True)
def _checks_as_subtests(subtests: Any) -> Iterator[None]:
    harness.SUBTESTS = subtests
    try:
        yield
    finally:
        harness.SUBTESTS = None
