"""`tally keyring generate|rotate|status`, `tally reencrypt` and `tally tenants shred`."""

from __future__ import annotations

import dataclasses
import json
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner, Result

from tally.api.app import create_app
from tally.auth.service import Scope
from tally.bootstrap import build
from tally.cli.main import app
from tally.events.validation import EventIn
from tally.registry.models import ApplicationIn, KeyIn, TenantIn
from tally.services.ingest import seal_event
from tally.settings import Settings
from tests.api.helpers import export_all, post_events
from tests.conftest import event, open_store

Run = Callable[..., Result]


def ok_json(result: Result) -> Any:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def message(result: Result) -> str:
    assert result.exit_code != 0, result.stdout
    text = " ".join((result.stderr + result.stdout).split())
    assert "Traceback" not in text
    return text


@pytest.fixture
def keyring_path(tmp_path: Path) -> Path:
    return tmp_path / "cli.keyring"


@pytest.fixture
def tally(database_url: str, keyring_path: Path) -> Run:
    runner = CliRunner()
    env = {"TALLY_DATABASE_URL": database_url, "TALLY_KEYRING": str(keyring_path)}

    def run(*args: str, **options: Any) -> Result:
        return runner.invoke(app, list(args), env=env, catch_exceptions=False, **options)

    run("migrate")
    return run


def with_events(settings: Settings, database_url: str, keyring_path: Path) -> tuple[str, str]:
    """Two tenants with events (so with data keys); returns (writer, reader) keys."""
    services = build(
        settings.model_copy(update={"keyring": str(keyring_path)}), store=open_store(database_url)
    )
    try:
        for tenant in ("acme", "globex"):
            services.registry.create_tenant(TenantIn(id=tenant))
        services.registry.create_application(ApplicationIn(id="vm"))
        writer = services.registry.create_key(
            KeyIn(scopes=[Scope.EVENTS_WRITE], application="vm")
        ).key
        reader = services.registry.create_key(KeyIn(scopes=[Scope.EVENTS_READ])).key
        with TestClient(create_app(services=services)) as client:
            batch = {
                "events": [
                    event("a", attributes={"sku": "one"}),
                    event("g", tenant="globex", attributes={"sku": "two"}),
                ]
            }
            assert post_events(client, writer, batch).json()["accepted"] == 2
    finally:
        services.close()
    return writer, reader


def exported(settings: Settings, database_url: str, keyring_path: Path, reader: str) -> dict:
    services = build(
        settings.model_copy(update={"keyring": str(keyring_path)}), store=open_store(database_url)
    )
    try:
        with TestClient(create_app(services=services)) as client:
            return {e["id"]: e for e in export_all(client, reader)}
    finally:
        services.close()


def test_generate_rotate_reencrypt_and_status(
    tally: Run, settings: Settings, database_url: str, keyring_path: Path
) -> None:
    made = ok_json(tally("keyring", "generate", "--json"))
    assert made["path"] == str(keyring_path)
    assert stat.S_IMODE(keyring_path.stat().st_mode) == 0o600
    assert "exists already" in message(tally("keyring", "generate"))
    _, reader = with_events(settings, database_url, keyring_path)

    rotated = ok_json(tally("keyring", "rotate", "--json"))
    assert rotated["keys"] == [made["newest"], rotated["newest"]]
    status = ok_json(tally("keyring", "status", "--json"))
    assert [(row["id"], row["data_keys"]) for row in status] == [
        (made["newest"], 2),
        (rotated["newest"], 0),
    ]

    assert ok_json(tally("reencrypt", "--json", "--batch", "1")) == {
        "newest": rotated["newest"],
        "moved": 2,
        "left": 0,
    }
    assert ok_json(tally("reencrypt", "--json"))["moved"] == 0  # resumable: nothing left
    status = ok_json(tally("keyring", "status", "--json"))
    assert [row["data_keys"] for row in status] == [0, 2]
    events = exported(settings, database_url, keyring_path, reader)
    assert events["a"]["attributes"] == {"sku": "one"}
    actions = [entry["action"] for entry in ok_json(tally("audit", "list", "--json"))["entries"]]
    assert "keyring.rotate" in actions and "keyring.reencrypt" in actions


def test_shred_asks_first_then_destroys_the_tenant_key(
    tally: Run, settings: Settings, database_url: str, keyring_path: Path
) -> None:
    tally("keyring", "generate")
    _, reader = with_events(settings, database_url, keyring_path)

    declined = tally("tenants", "shred", "acme", input="n\n")
    assert declined.exit_code != 0
    assert exported(settings, database_url, keyring_path, reader)["a"]["attributes"]

    assert ok_json(tally("tenants", "shred", "acme", "--yes", "--json")) == {
        "id": "acme",
        "shredded": True,
    }
    events = exported(settings, database_url, keyring_path, reader)
    assert events["a"]["shredded"] is True and events["a"]["attributes"] is None
    assert events["g"]["attributes"] == {"sku": "two"}
    assert "no tenant" in message(tally("tenants", "shred", "nobody", "--yes")).lower()
    entries = ok_json(tally("audit", "list", "--json", "--action", "tenant.shred"))["entries"]
    assert [entry["target"] for entry in entries] == ["acme"]


def test_a_wrong_keyring_is_a_message_not_a_traceback(
    tally: Run, settings: Settings, database_url: str, keyring_path: Path, tmp_path: Path
) -> None:
    tally("keyring", "generate")
    with_events(settings, database_url, keyring_path)
    other = tmp_path / "other.keyring"
    CliRunner().invoke(app, ["keyring", "generate", "--out", str(other)])
    runner = CliRunner()
    env = {"TALLY_DATABASE_URL": database_url, "TALLY_KEYRING": str(other)}
    result = runner.invoke(app, ["reencrypt"], env=env)
    assert "does not have" in message(result)


def test_reindex_gives_events_stored_before_tokens_theirs_and_resumes(
    tally: Run, settings: Settings, database_url: str, keyring_path: Path
) -> None:
    ok_json(tally("keyring", "generate", "--json"))
    with_events(settings, database_url, keyring_path)  # stored with tokens: nothing to do
    services = build(
        settings.model_copy(update={"keyring": str(keyring_path)}), store=open_store(database_url)
    )
    try:
        cipher = services.keys.ciphers_of(["acme"])["acme"]
        assert cipher is not None
        draft = EventIn.model_validate(event("old", attributes={"sku": "one"})).draft()
        sealed = seal_event(draft, application="vm", region="eu-west", cipher=cipher)
        # As stored before migration 0006: no tokens, no dictionary entry.
        old = dataclasses.replace(sealed, attribute_tokens=None, dictionary=())
        services.store.append([old], received_at=datetime.now(UTC))

        assert ok_json(tally("reindex", "--json", "--batch", "1")) == {"filled": 1}
        assert ok_json(tally("reindex", "--json")) == {"filled": 0}  # resumable: none left
        assert services.store.events_without_tokens(after=(-1, 0), limit=10) == []
    finally:
        services.close()
