"""The fault-injection suite's fixtures, and its summary: every scenario's line at the end of
the run, so the counts show under plain `pytest` (and -ra) as well as with -s."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.conftest import IN_CI, new_database
from tests.support import faults
from tests.support.pgcluster import Cluster, throwaway_cluster


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if faults.LINES:
        terminalreporter.section("fault injection")
        for line in faults.LINES:
            terminalreporter.write_line(line)


@pytest.fixture
def fresh_postgres() -> Iterator[str]:
    """A new, empty database on the shared PostgreSQL server (its servers migrate it)."""
    with new_database("tally_faults") as url:
        yield url


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster, for scenarios that stop the database."""
    try:
        with throwaway_cluster() as started:
            yield started
    except FileNotFoundError as missing:  # no PostgreSQL server programs on this machine
        if IN_CI:
            raise
        pytest.skip(f"PostgreSQL server programs are not installed: {missing}")


@pytest.fixture(autouse=True)
def record(record_property: Callable[[str, object], None]) -> Iterator[None]:
    """Each scenario's line also goes to the JUnit report as a property."""
    before = len(faults.LINES)
    yield
    for line in faults.LINES[before:]:
        record_property("scenario", line)
