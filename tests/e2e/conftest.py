"""A real `tally serve` process for end-to-end tests, on the test's own store.

`database_url` (tests/conftest.py) is a fresh SQLite file or an emptied PostgreSQL database, so
the server finds no key and prints a first admin key, which `tally_server` hands on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import Server, running_server


@pytest.fixture
def tally_server(database_url: str, tmp_path: Path) -> Iterator[Server]:
    """`tally serve` over the test's (empty) store, with the admin key it printed."""
    try:
        with running_server(database_url, tmp_path, env={"TALLY_REGION": "local"}) as server:
            assert server.admin_key, f"no admin key printed\n{server.logs()}"
            yield server
    except RuntimeError as error:
        pytest.fail(str(error))
