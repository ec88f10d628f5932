"""What every command shares: `--version`, errors (JSON under `--json`), time and duration
options, the reason a PostgreSQL store cannot be reached, and tables on an 80-column terminal.

Against real SQLite files and the real PostgreSQL; the tables through a real `tally` process,
whose stdout is a pipe (not a terminal) and whose width is forced with COLUMNS=80.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from rich.cells import cell_len
from typer.testing import CliRunner, Result

from tally.cli.main import app
from tests.cli.conftest import Tally

PASSWORD = "s3cr3t-Pw"


@pytest.fixture
def sqlite_tally(tmp_path: Path) -> Tally:
    """`tally ARGS...` on a migrated SQLite file with its own keyring."""
    runner = CliRunner()
    env = {
        "TALLY_DATABASE_URL": f"sqlite:///{tmp_path / 'tally.db'}",
        "TALLY_KEYRING": str(tmp_path / "tally.keyring"),
        "TALLY_REGION": "eu-west",
    }

    def run(*args: str) -> Result:
        return runner.invoke(app, list(args), env=env, catch_exceptions=False)

    assert run("migrate").exit_code == 0
    assert run("keyring", "generate").exit_code == 0
    return run


def ok_json(result: Result) -> Any:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def json_error(result: Result, code: str, exit_code: int) -> dict[str, Any]:
    """The one JSON object a failed `--json` command prints on stdout; stderr stays empty."""
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    assert result.stderr == ""
    document = json.loads(result.stdout)
    assert set(document) == {"error"}
    error: dict[str, Any] = document["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    return error


# --- --version -------------------------------------------------------------------------------


def test_version_prints_the_installed_version_and_exits_0() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"tally {metadata.version('tally')}\n"


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "exit_code", "fragment"),
    [
        (["audit", "list", "--limit", "many", "--json"], "usage", 2, "--limit"),
        (["keys", "rotate", "--json"], "usage", 2, "ID"),
        (["tenants", "list", "--json", "--colour"], "usage", 2, "--colour"),
        (["keys", "rotate", "key_0", "--grace", "soon", "--json"], "usage", 2, "--grace"),
        (["tenants", "create", "bad id", "--json"], "invalid-input", 2, "id:"),
        (["audit", "list", "--limit", "0", "--json"], "invalid-input", 2, "limit"),
        (["keys", "revoke", "key_0123456789abcdef", "--json"], "not-found", 1, "no key"),
        (["tenants", "create", "acme", "--json"], "conflict", 1, "exists already"),
        (["tenants", "shred", "acme", "--json"], "usage", 2, "--yes"),
    ],
)
def test_with_json_every_error_is_one_json_object_on_stdout(
    sqlite_tally: Tally, args: list[str], code: str, exit_code: int, fragment: str
) -> None:
    ok_json(sqlite_tally("tenants", "create", "acme", "--json"))
    error = json_error(sqlite_tally(*args), code, exit_code)
    assert fragment in " ".join([error["message"], *error.get("details", [])])
    if "shred" not in args:  # without --json, shred asks instead
        # Without --json the same error is text for people, on stderr.
        text = sqlite_tally(*(arg for arg in args if arg != "--json"))
        assert text.exit_code == exit_code
        assert text.stdout == ""
        assert text.stderr.strip() and not text.stderr.lstrip().startswith("{")


def test_with_json_a_bad_setting_is_a_json_error_too(tmp_path: Path) -> None:
    env = {"TALLY_DATABASE_URL": f"sqlite:///{tmp_path / 't.db'}", "TALLY_REGION": "bad region"}
    result = CliRunner().invoke(app, ["tenants", "list", "--json"], env=env)
    assert "TALLY_REGION" in json_error(result, "invalid-setting", 2)["message"]


# --- times and durations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option", "forms"),
    [
        (["audit", "list", "--since", "yesterday"], "--since", ["RFC 3339", "24h, 7d or 30m"]),
        (["audit", "list", "--since", "2026-02-30T00:00:00Z"], "--since", ["RFC 3339", "24h"]),
        (["audit", "list", "--since", "24 h"], "--since", ["RFC 3339", "24h, 7d or 30m"]),
        (
            ["keys", "create", "--scope", "events:read", "--expires-in", "ten days"],
            "--expires-in",
            ["24h, 7d or 30m"],
        ),
        (["keys", "rotate", "key_0123456789abcdef", "--grace", "1y"], "--grace", ["24h, 7d"]),
    ],
)
def test_time_and_duration_errors_name_the_option_and_the_accepted_forms(
    sqlite_tally: Tally, args: list[str], option: str, forms: list[str]
) -> None:
    for as_json in (True, False):
        result = sqlite_tally(*args, *(["--json"] if as_json else []))
        assert result.exit_code == 2, result.output
        text = json_error(result, "usage", 2)["message"] if as_json else result.stderr
        message = " ".join(text.replace("│", " ").split())  # unwrap Rich's error panel
        assert option in message
        for form in forms:
            assert form in message, message


# --- audit list ------------------------------------------------------------------------------


def test_the_audit_hint_for_more_keeps_the_filters(sqlite_tally: Tally) -> None:
    for n in range(5):
        ok_json(sqlite_tally("tenants", "create", f"t{n}", "--json"))
    ok_json(sqlite_tally("applications", "create", "vm", "--json"))
    actor = f"cli:{getpass.getuser()}"
    filters = ["--action", "tenant.create", "--actor", actor, "--since", "1h", "--limit", "2"]

    shown = []
    command = ["audit", "list", *filters]
    for _ in range(5):
        page = sqlite_tally(*command)
        assert page.exit_code == 0, page.output
        found = [t for t in ("t0", "t1", "t2", "t3", "t4", "vm") if t in page.stdout]
        shown += sorted(found, key=page.stdout.index)
        hints = [line for line in page.stdout.splitlines() if line.startswith("More: ")]
        if not hints:
            break
        hinted = shlex.split(hints[0].removeprefix("More: "))
        assert hinted[:3] == ["tally", "audit", "list"]
        for option in ("--action", "--actor", "--since", "--limit", "--cursor"):
            assert option in hinted, hints
        assert hinted[hinted.index("--limit") + 1] == "2"
        command = hinted[1:]
    # Page by page, the hints list what one unpaged query lists: the filters were kept.
    assert shown == ["t4", "t3", "t2", "t1", "t0"]


# --- PostgreSQL: libpq's reason, never the password --------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _with(url: str, *, port: int | None = None, database: str | None = None) -> str:
    """`url` with a password, and another port or database."""
    parts = urlsplit(url)
    host = f"{parts.username or 'postgres'}:{PASSWORD}@{parts.hostname}:{port or parts.port}"
    path = f"/{database}" if database else parts.path
    return urlunsplit(parts._replace(netloc=host, path=path))


def _unreachable_urls(postgres_url: str) -> Iterator[tuple[str, str]]:
    yield _with(postgres_url, port=_free_port()), "Connection refused"
    database = "tally_no_such_database"
    yield _with(postgres_url, database=database), f'database "{database}" does not exist'


@pytest.mark.parametrize("command", [["tenants", "list"], ["migrate"], ["keys", "list"]])
def test_an_unreachable_postgresql_store_shows_libpqs_reason_and_no_password(
    postgres_url: str, command: list[str]
) -> None:
    runner = CliRunner()
    for url, reason in _unreachable_urls(postgres_url):
        env = {"TALLY_DATABASE_URL": url, "TALLY_KEYRING": "/nonexistent/tally.keyring"}
        text = runner.invoke(app, command, env=env)
        assert text.exit_code == 1, text.output
        assert "cannot be reached" in text.stderr
        assert reason in " ".join(text.stderr.split())
        error = json_error(
            runner.invoke(app, [*command, "--json"], env=env), "store-unavailable", 1
        )
        assert any(reason in detail for detail in error["details"]), error
        for output in (text.stdout, text.stderr, json.dumps(error)):
            assert PASSWORD not in output


def test_redact_removes_passwords_that_a_driver_echoes(monkeypatch: pytest.MonkeyPatch) -> None:
    from tally.cli.common import redact  # noqa: PLC0415 - the one name under test here

    monkeypatch.setenv("TALLY_DATABASE_URL", f"postgresql://tally:{PASSWORD}@db:5432/tally")
    echoed = (
        'end of string reached when looking for matching "]" in IPv6 host address in URI: '
        f'"postgresql://tally:{PASSWORD}@[::1/tally"'
    )
    assert PASSWORD not in redact(echoed)
    assert "postgresql://tally:***@[::1/tally" in redact(echoed)
    assert redact("host=db password='a b' user=x") == "host=db password=*** user=x"
    assert redact(f"the password {PASSWORD} was refused") == "the password *** was refused"
    # A short password is removed as a word, not from inside other words.
    monkeypatch.setenv("TALLY_DATABASE_URL", "postgresql://tally:on@db:5432/tally")
    assert redact("connection refused: on db") == "connection refused: *** db"
    # A replicated store's multi-host URL: its password is found all the same.
    hosts = "[::1]:5432,db2:5433"
    monkeypatch.setenv("TALLY_DATABASE_URL", f"postgresql://tally:{PASSWORD}@{hosts}/tally")
    assert redact(f"the password {PASSWORD} was refused") == "the password *** was refused"
    assert redact(f"postgresql://tally:{PASSWORD}@{hosts}/t") == f"postgresql://tally:***@{hosts}/t"


# --- tables at 80 columns --------------------------------------------------------------------

TENANT = "acme-corporation-emea-production-eu-central"
APPLICATION = "metering-gateway-eu-central-frankfurt-1"
REGION = "eu-central-frankfurt-1"


def _tally_process(tmp_path: Path, *args: str) -> str:
    """`tally ARGS` as its own process, stdout a pipe, on an 80-column terminal."""
    env = {
        **os.environ,
        "TALLY_DATABASE_URL": f"sqlite:///{tmp_path / 'tally.db'}",
        "TALLY_KEYRING": str(tmp_path / "tally.keyring"),
        "COLUMNS": "80",
    }
    done = subprocess.run(
        [sys.executable, "-c", "from tally.cli.main import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _whole(output: str, tokens: set[str]) -> None:
    """Each token is printed whole on one line, and no line is wider than 80 columns."""
    lines = output.splitlines()
    assert all(cell_len(line) <= 80 for line in lines), output
    for token in tokens:
        assert any(token in line for line in lines), f"{token!r} is split:\n{output}"


def test_list_tables_never_split_a_word_at_80_columns(sqlite_tally: Tally, tmp_path: Path) -> None:
    name = "Acme Corporation Europe, Middle East and Africa (production)"
    ok_json(sqlite_tally("tenants", "create", TENANT, "--name", name, "--region", REGION, "--json"))
    ok_json(sqlite_tally("tenants", "create", "initech", "--json"))
    app_name = "Metering gateway for the Frankfurt region"
    ok_json(sqlite_tally("applications", "create", APPLICATION, "--name", app_name, "--json"))
    writer = ["--scope", "events:write", "--application", APPLICATION]
    ok_json(
        sqlite_tally("keys", "create", *writer, "--tenant", TENANT, "--tenant", "initech", "--json")
    )
    reader = ["--scope", "events:read", "--scope", "usage:read", "--tenant", TENANT]
    ok_json(sqlite_tally("keys", "create", *reader, "--expires-in", "30d", "--json"))
    admin = ok_json(sqlite_tally("keys", "create", "--scope", "admin", "--json"))
    new = ok_json(sqlite_tally("keys", "rotate", admin["id"], "--grace", "24h", "--json"))

    tenants = ok_json(sqlite_tally("tenants", "list", "--json"))
    _whole(
        _tally_process(tmp_path, "tenants", "list"),
        {word for t in tenants for word in [t["id"], t["region"], *(t["name"] or "").split()]},
    )
    applications = ok_json(sqlite_tally("applications", "list", "--json"))
    _whole(
        _tally_process(tmp_path, "applications", "list"),
        {w for a in applications for w in [a["id"], a["created_at"], *(a["name"] or "").split()]},
    )
    keys = ok_json(sqlite_tally("keys", "list", "--json"))
    times = [k[field] for k in keys for field in ("expires_at", "revoked_at") if k[field]]
    _whole(
        _tally_process(tmp_path, "keys", "list"),
        {k["id"] for k in keys}
        | {word for k in keys for word in [*k["scopes"], *(k["tenants"] or [])]}
        | {APPLICATION}
        | {part for time in times for part in (time[:10], time[11:16])},
    )
    entries = ok_json(sqlite_tally("audit", "list", "--json"))["entries"]
    _whole(
        _tally_process(tmp_path, "audit", "list"),
        {word for e in entries for word in (e["target"], e["action"], e["actor"], e["at"][:10])}
        | {e["at"][11:19] for e in entries}
        | {f'replaced_by="{new["id"]}"'},
    )
    status = ok_json(sqlite_tally("keyring", "status", "--json"))
    _whole(_tally_process(tmp_path, "keyring", "status"), {row["id"] for row in status})


def test_lists_that_fit_stay_tables_and_wrap_only_between_words(
    sqlite_tally: Tally, tmp_path: Path
) -> None:
    name = "Initech Incorporated, the software company from Office Space, in Austin Texas"
    ok_json(sqlite_tally("tenants", "create", "initech", "--name", name, "--json"))
    ok_json(sqlite_tally("tenants", "create", "acme", "--json"))
    ok_json(sqlite_tally("applications", "create", "vm", "--json"))
    ok_json(sqlite_tally("keys", "create", "--scope", "admin", "--json"))
    writer = ["--scope", "events:write", "--application", "vm", "--tenant", "acme"]
    ok_json(sqlite_tally("keys", "create", *writer, "--json"))

    tenants = _tally_process(tmp_path, "tenants", "list")
    assert "┃ id " in tenants  # a table: the long name wraps inside its column
    _whole(tenants, {"initech", "acme", "lateness_hours", *name.split()})
    keys = ok_json(sqlite_tally("keys", "list", "--json"))
    listed = _tally_process(tmp_path, "keys", "list")
    assert "┃ id " in listed
    _whole(listed, {"events:write", "admin", "application", *(k["id"] for k in keys)})
