"""The `tally` command line, on a real SQLite file and on the real PostgreSQL.

Every command runs through typer's CliRunner with TALLY_DATABASE_URL pointing at the test's
store; `--json` output is parsed as JSON, errors must say what is wrong and exit non-zero.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner, Result

from tally.cli.main import app
from tests.cli.conftest import REGION, Tally
from tests.conftest import event
from tests.support.caching import answered_within_bound


def ok_json(result: Result) -> Any:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def failed(result: Result, *fragments: str) -> str:
    """Asserts a non-zero exit with a message holding every fragment; returns the message."""
    assert result.exit_code != 0, result.stdout
    message = " ".join((result.stderr + result.stdout).split())  # unwrap the terminal's lines
    assert "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- migrate ---------------------------------------------------------------------------------


def test_migrate_is_idempotent(tally: Tally) -> None:
    assert ok_json(tally("migrate", "--json")) == {"status": "current"}
    again = tally("migrate")
    assert again.exit_code == 0
    assert "Schema is current." in again.stdout
    assert ok_json(tally("tenants", "list", "--json")) == []


def test_commands_on_a_store_without_schema_say_to_migrate(tmp_path: Any) -> None:
    runner = CliRunner()
    env = {"TALLY_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.db'}"}
    result = runner.invoke(app, ["tenants", "list", "--json"], env=env)
    failed(result, "tally migrate")
    assert runner.invoke(app, ["migrate", "--json"], env=env).exit_code == 0
    assert ok_json(runner.invoke(app, ["tenants", "list", "--json"], env=env)) == []


def test_a_malformed_database_url_is_a_clear_error() -> None:
    result = CliRunner().invoke(
        app, ["tenants", "list"], env={"TALLY_DATABASE_URL": "mysql://localhost/tally"}
    )
    assert result.exit_code == 2
    failed(result, "TALLY_DATABASE_URL")


# --- tenants ---------------------------------------------------------------------------------


def test_tenants_create_and_list(tally: Tally) -> None:
    acme = ok_json(
        tally(
            "tenants", "create", "acme", "--name", "Acme Corp", "--lateness-hours", "24", "--json"
        )
    )
    assert acme["id"] == "acme"
    assert acme["name"] == "Acme Corp"
    assert acme["region"] == REGION
    assert acme["lateness_hours"] == 24
    created = datetime.fromisoformat(acme["created_at"])
    assert abs(created - datetime.now(UTC)) < timedelta(minutes=1)

    globex = tally("tenants", "create", "globex", "--region", "us-east")
    assert globex.exit_code == 0, globex.stderr
    assert "Tenant globex registered." in globex.stdout

    listed = ok_json(tally("tenants", "list", "--json"))
    by_id = {row["id"]: row for row in listed}
    assert set(by_id) == {"acme", "globex"}
    assert by_id["globex"]["region"] == "us-east"
    assert by_id["globex"]["lateness_hours"] == 72
    assert by_id["globex"]["name"] is None

    table = tally("tenants", "list")
    assert table.exit_code == 0
    assert "acme" in table.stdout
    assert "globex" in table.stdout


def test_a_duplicate_tenant_is_refused(tally: Tally) -> None:
    ok_json(tally("tenants", "create", "acme", "--name", "First", "--json"))
    failed(tally("tenants", "create", "acme", "--name", "Second", "--json"), "exists")
    [only] = ok_json(tally("tenants", "list", "--json"))
    assert only["name"] == "First"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["bad id"], "id"),
        (["_starts-with-underscore"], "id"),
        (["x" * 65], "id"),
        (["acme", "--lateness-hours", "0"], "lateness_hours"),
        (["acme", "--lateness-hours", str(35 * 24 + 1)], "lateness_hours"),
        (["acme", "--region", "no such/region"], "region"),
    ],
)
def test_invalid_tenants_are_refused(tally: Tally, args: list[str], fragment: str) -> None:
    failed(tally("tenants", "create", *args, "--json"), fragment)
    assert ok_json(tally("tenants", "list", "--json")) == []


# --- applications ----------------------------------------------------------------------------


def test_applications_create_and_list(tally: Tally) -> None:
    vm = ok_json(tally("applications", "create", "vm-service", "--name", "VMs", "--json"))
    assert vm["id"] == "vm-service"
    assert vm["name"] == "VMs"
    plain = tally("applications", "create", "storage")
    assert plain.exit_code == 0
    assert "Application storage registered." in plain.stdout

    listed = ok_json(tally("applications", "list", "--json"))
    assert {row["id"] for row in listed} == {"vm-service", "storage"}
    table = tally("applications", "list")
    assert table.exit_code == 0
    assert "vm-service" in table.stdout


def test_applications_are_refused_when_duplicate_or_invalid(tally: Tally) -> None:
    ok_json(tally("applications", "create", "vm", "--json"))
    failed(tally("applications", "create", "vm", "--json"), "exists")
    failed(tally("applications", "create", "has space", "--json"), "id")
    assert [row["id"] for row in ok_json(tally("applications", "list", "--json"))] == ["vm"]


# --- keys ------------------------------------------------------------------------------------


@pytest.fixture
def registered(tally: Tally) -> Tally:
    ok_json(tally("tenants", "create", "acme", "--json"))
    ok_json(tally("tenants", "create", "globex", "--json"))
    ok_json(tally("applications", "create", "vm", "--json"))
    return tally


def test_keys_create_with_every_option(registered: Tally) -> None:
    before = datetime.now(UTC)
    issued = ok_json(
        registered(
            "keys", "create",
            "--scope", "events:write",
            "--application", "vm",
            "--tenant", "acme",
            "--tenant", "globex",
            "--expires-in", "90d",
            "--json",
        )
    )  # fmt: skip
    assert isinstance(issued["id"], str)
    assert issued["id"]
    assert issued["key"].startswith("tly_")
    assert len(issued["key"]) >= 32
    assert issued["scopes"] == ["events:write"]
    assert issued["application"] == "vm"
    assert issued["tenants"] == ["acme", "globex"]
    expires = datetime.fromisoformat(issued["expires_at"])
    assert before + timedelta(days=90) <= expires <= datetime.now(UTC) + timedelta(days=90)
    assert issued["revoked_at"] is None

    billing = ok_json(
        registered("keys", "create", "--scope", "events:read", "--scope", "usage:read", "--json")
    )
    assert set(billing["scopes"]) == {"events:read", "usage:read"}
    assert billing["application"] is None
    assert billing["tenants"] is None
    assert billing["expires_at"] is None
    assert billing["key"] != issued["key"]
    assert billing["id"] != issued["id"]


@pytest.mark.parametrize(
    ("text", "delta"),
    [
        ("45s", timedelta(seconds=45)),
        ("30m", timedelta(minutes=30)),
        ("12h", timedelta(hours=12)),
        ("2w", timedelta(weeks=2)),
    ],
)
def test_keys_expires_in_units(registered: Tally, text: str, delta: timedelta) -> None:
    before = datetime.now(UTC)
    issued = ok_json(
        registered("keys", "create", "--scope", "events:read", "--expires-in", text, "--json")
    )
    expires = datetime.fromisoformat(issued["expires_at"])
    assert before + delta <= expires <= datetime.now(UTC) + delta


def test_keys_create_plain_shows_the_secret_once(registered: Tally) -> None:
    result = registered("keys", "create", "--scope", "admin")
    assert result.exit_code == 0
    assert "tly_" in result.stdout
    assert "shown only now" in result.stdout


def test_keys_list_never_shows_secrets(registered: Tally) -> None:
    write = ok_json(
        registered("keys", "create", "--scope", "events:write", "--application", "vm", "--json")
    )
    read = ok_json(
        registered("keys", "create", "--scope", "events:read", "--tenant", "acme", "--json")
    )
    listing = registered("keys", "list", "--json")
    rows = ok_json(listing)
    by_id = {row["id"]: row for row in rows}
    assert set(by_id) == {write["id"], read["id"]}
    assert by_id[read["id"]]["tenants"] == ["acme"]
    assert by_id[write["id"]]["application"] == "vm"
    for row in rows:
        assert "key" not in row
        assert not any("hash" in name or "secret" in name for name in row)
    for secret in (write["key"], read["key"]):
        assert secret not in listing.stdout
        table = registered("keys", "list")
        assert table.exit_code == 0
        assert secret not in table.stdout
        assert "scopes" in table.stdout
    assert "tly_" not in registered("keys", "list").stdout


def test_keys_revoke(registered: Tally) -> None:
    issued = ok_json(registered("keys", "create", "--scope", "events:read", "--json"))
    other = ok_json(registered("keys", "create", "--scope", "events:read", "--json"))
    assert ok_json(registered("keys", "revoke", issued["id"], "--json")) == {
        "id": issued["id"],
        "revoked": True,
    }
    by_id = {row["id"]: row for row in ok_json(registered("keys", "list", "--json"))}
    revoked_at = datetime.fromisoformat(by_id[issued["id"]]["revoked_at"])
    assert abs(revoked_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert by_id[other["id"]]["revoked_at"] is None

    plain = registered("keys", "revoke", other["id"])
    assert plain.exit_code == 0
    assert f"Key {other['id']} revoked." in " ".join(plain.stdout.split())


def test_revoking_an_unknown_key_fails(registered: Tally) -> None:
    failed(registered("keys", "revoke", "no-such-key", "--json"), "no key")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--scope", "events:write", "--application", "nope"], ["application", "not a registered"]),
        (["--scope", "events:write"], ["application", "required"]),
        (["--scope", "events:read", "--application", "vm"], ["application"]),
        (["--scope", "events:read", "--tenant", "initech"], ["tenants/0", "not a registered"]),
        (["--scope", "events:read", "--tenant", "bad tenant"], ["tenants/0"]),
        (
            ["--scope", "events:read", "--expires-in", "ten days"],
            ["--expires-in", "a duration such as 24h, 7d or 30m"],
        ),
        (
            ["--scope", "events:read", "--expires-in", "90"],
            ["--expires-in", "a duration such as 24h, 7d or 30m"],
        ),
        (
            ["--scope", "events:read", "--expires-in", "5y"],
            ["--expires-in", "a duration such as 24h, 7d or 30m"],
        ),
        (["--scope", "events:read", "--expires-in", "0s"], ["expires_at", "future"]),
        (["--scope", "bogus"], ["scopes/0"]),
        (["--scope", "admin", "--scope", "events:read"], ["admin"]),
        (["--scope", "admin", "--tenant", "acme"], ["tenants"]),
        ([], ["--scope"]),
    ],
)
def test_keys_create_refuses_bad_requests(
    registered: Tally, args: list[str], fragments: list[str]
) -> None:
    result = registered("keys", "create", *args, "--json")
    failed(result, *fragments)
    assert "tly_" not in result.stdout
    assert ok_json(registered("keys", "list", "--json")) == []


# --- --json everywhere -----------------------------------------------------------------------


def test_every_command_prints_json_with_json(tally: Tally) -> None:
    outputs = {
        "migrate": tally("migrate", "--json"),
        "tenants create": tally("tenants", "create", "acme", "--json"),
        "tenants list": tally("tenants", "list", "--json"),
        "applications create": tally("applications", "create", "vm", "--json"),
        "applications list": tally("applications", "list", "--json"),
        "keys create": tally(
            "keys", "create", "--scope", "events:write", "--application", "vm", "--json"
        ),
        "keys list": tally("keys", "list", "--json"),
    }
    key_id = ok_json(outputs["keys create"])["id"]
    outputs["keys revoke"] = tally("keys", "revoke", key_id, "--json")
    for name, result in outputs.items():
        assert result.exit_code == 0, (name, result.stderr)
        lines = result.stdout.splitlines()
        assert len(lines) == 1, (name, result.stdout)  # one JSON document, nothing around it
        assert isinstance(json.loads(lines[0]), dict | list), name
    assert isinstance(ok_json(outputs["tenants list"]), list)
    assert isinstance(ok_json(outputs["keys list"]), list)


# --- keys made on the command line work against the API --------------------------------------


def test_keys_created_with_the_cli_work_against_the_api(
    tally: Tally, client: TestClient, database_url: str
) -> None:
    del database_url  # the `client` serves the very store the CLI writes to
    ok_json(tally("tenants", "create", "acme", "--json"))
    ok_json(tally("tenants", "create", "globex", "--json"))
    ok_json(tally("applications", "create", "vm", "--json"))
    admin = ok_json(tally("keys", "create", "--scope", "admin", "--json"))["key"]
    writer = ok_json(
        tally(
            "keys", "create", "--scope", "events:write", "--application", "vm",
            "--tenant", "acme", "--expires-in", "1h", "--json",
        )
    )["key"]  # fmt: skip
    reader = ok_json(tally("keys", "create", "--scope", "events:read", "--json"))
    acme_reader = ok_json(
        tally("keys", "create", "--scope", "events:read", "--tenant", "acme", "--json")
    )["key"]

    # The admin key administers; tenants made by the CLI and by the API are one registry.
    made = client.post("/v1/tenants", json={"id": "initech"}, headers=auth(admin))
    assert made.status_code == 201, made.text
    assert {row["id"] for row in ok_json(tally("tenants", "list", "--json"))} == {
        "acme",
        "globex",
        "initech",
    }

    sent = client.post("/v1/events", json=event("e-1", quantity="1.5"), headers=auth(writer))
    assert sent.status_code == 200, sent.text
    assert sent.json() == {"id": "e-1", "status": "accepted"}
    # The key is bound to acme: globex is outside it.
    other = client.post("/v1/events", json=event("e-2", tenant="globex"), headers=auth(writer))
    assert other.status_code == 403, other.text
    # The writer cannot read, the reader cannot write.
    assert client.get("/v1/events", headers=auth(writer)).status_code == 403
    assert (
        client.post("/v1/events", json=event("e-3"), headers=auth(reader["key"])).status_code == 403
    )

    page = client.get("/v1/events", headers=auth(reader["key"]))
    assert page.status_code == 200, page.text
    [stored] = page.json()["events"]
    assert (stored["application"], stored["id"], stored["quantity"]) == ("vm", "e-1", "1.5")
    assert client.get("/v1/events", headers=auth(acme_reader)).json()["events"] == [stored]
    assert client.get("/v1/events?tenant=globex", headers=auth(acme_reader)).status_code == 403

    # Revoked on the command line, another process: refused by the API within the bound it
    # may answer from its copy of the key (TALLY_CACHE_SECONDS).
    ok_json(tally("keys", "revoke", reader["id"], "--json"))
    refused = answered_within_bound(
        lambda: client.get("/v1/events", headers=auth(reader["key"])), 401
    )
    assert refused.json()["code"] == "ERR-AUTH-401"


def test_tenants_create_on_postgres_without_a_keyring_is_refused(postgres_url: str) -> None:
    from tests.conftest import empty_postgres  # noqa: PLC0415 - only this test empties it here

    empty_postgres(postgres_url)
    runner = CliRunner()
    env = {"TALLY_DATABASE_URL": postgres_url, "TALLY_REGION": REGION, "TALLY_KEYRING": None}
    result = runner.invoke(app, ["tenants", "create", "acme"], env=env, catch_exceptions=False)
    failed(result, "TALLY_KEYRING is not set")
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT count(*) FROM tenants").fetchone() == (0,)


def test_tenants_update_changes_name_and_window_and_list_shows_shredded(tally: Tally) -> None:
    ok_json(tally("tenants", "create", "acme", "--json"))
    ok_json(tally("tenants", "create", "globex", "--json"))
    updated = ok_json(
        tally("tenants", "update", "acme", "--name", "Acme", "--lateness-hours", "24", "--json")
    )
    assert (updated["name"], updated["lateness_hours"], updated["shredded"]) == ("Acme", 24, False)
    renamed = ok_json(tally("tenants", "update", "acme", "--name", "Acme Inc", "--json"))
    assert (renamed["name"], renamed["lateness_hours"]) == ("Acme Inc", 24)
    failed(tally("tenants", "update", "acme", "--lateness-hours", "0"), "lateness_hours")
    failed(tally("tenants", "update", "initech", "--name", "X"), "no tenant")
    [entry, *_] = ok_json(tally("audit", "list", "--action", "tenant.update", "--json"))["entries"]
    assert entry["details"] == {
        "old_lateness_hours": 24,
        "new_lateness_hours": 24,
        "name_changed": True,
    }

    ok_json(tally("tenants", "shred", "globex", "--yes", "--json"))
    listed = {row["id"]: row["shredded"] for row in ok_json(tally("tenants", "list", "--json"))}
    assert listed == {"acme": False, "globex": True}
    table = " ".join(tally("tenants", "list").stdout.split())
    assert "shredded" in table and "True" in table
