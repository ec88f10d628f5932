"""The `tally` fixture: the command line against the test's store."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from typer.testing import CliRunner, Result

from tally.cli.main import app

REGION = "eu-west"  # the region of the in-process API of tests/conftest.py

Tally = Callable[..., Result]


@pytest.fixture
def tally(database_url: str) -> Tally:
    """Run `tally ARGS...` against the test's store; the result keeps stdout and stderr apart."""
    runner = CliRunner()
    env = {"TALLY_DATABASE_URL": database_url, "TALLY_REGION": REGION}

    def run(*args: str) -> Result:
        return runner.invoke(app, list(args), env=env, catch_exceptions=False)

    run("migrate")
    return run
