"""The fault-injection suite's fixtures (its summary of scenario lines is in tests/conftest.py,
since tests/ha's failover scenario reports there too)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.conftest import new_database
from tests.support import faults


@pytest.fixture
def fresh_postgres() -> Iterator[str]:
    """A new, empty database on the shared PostgreSQL server (its servers migrate it)."""
    with new_database("tally_faults") as url:
        yield url


@pytest.fixture(autouse=True)
def record(record_property: Callable[[str, object], None]) -> Iterator[None]:
    """Each scenario's line also goes to the JUnit report as a property."""
    before = len(faults.LINES)
    yield
    for line in faults.LINES[before:]:
        record_property("scenario", line)
