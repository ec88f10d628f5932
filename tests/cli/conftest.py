"""The `tally` fixture: the command line against the test's store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from tally.cli.main import app

REGION = "eu-west"  # the region of the in-process API of tests/conftest.py

Tally = Callable[..., Result]


@pytest.fixture
def tally(database_url: str, keyring_file: Path) -> Tally:
    """Run `tally ARGS...` against the test's store (and the session's keyring, which a
    PostgreSQL store needs); the result keeps stdout and stderr apart."""
    runner = CliRunner()
    env = {"TALLY_DATABASE_URL": database_url, "TALLY_REGION": REGION}
    if not database_url.startswith("sqlite:"):
        env["TALLY_KEYRING"] = str(keyring_file)

    def run(*args: str) -> Result:
        return runner.invoke(app, list(args), env=env, catch_exceptions=False)

    run("migrate")
    return run
