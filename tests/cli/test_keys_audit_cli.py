"""`tally keys rotate`, last use in `tally keys list`, and `tally audit list`, on both stores."""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.cli.test_cli import Tally, auth, failed, ok_json
from tests.conftest import event

OPERATOR = f"cli:{getpass.getuser()}"


@pytest.fixture
def registered(tally: Tally) -> Tally:
    ok_json(tally("tenants", "create", "acme", "--json"))
    ok_json(tally("applications", "create", "vm", "--json"))
    return tally


def keys_by_id(tally: Tally) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in ok_json(tally("keys", "list", "--json"))}


def test_rotate_prints_a_like_key_once_and_links_both(registered: Tally) -> None:
    old = ok_json(
        registered(
            "keys", "create", "--scope", "events:write", "--application", "vm",
            "--tenant", "acme", "--expires-in", "30d", "--json",
        )
    )  # fmt: skip
    new = ok_json(registered("keys", "rotate", old["id"], "--grace", "24h", "--json"))

    assert new["key"].startswith("tly_")
    assert new["key"] != old["key"]
    assert (new["scopes"], new["application"], new["tenants"]) == (
        ["events:write"],
        "vm",
        ["acme"],
    )
    assert new["rotated_from"] == old["id"]
    created = datetime.fromisoformat(new["created_at"])
    # The same lifetime (the CLI took "30d" from its own clock, a moment before the store's).
    lifetime = datetime.fromisoformat(new["expires_at"]) - created
    assert abs(lifetime - timedelta(days=30)) < timedelta(minutes=1)
    keys = keys_by_id(registered)
    assert keys[old["id"]]["replaced_by"] == new["id"]
    retire = datetime.fromisoformat(keys[old["id"]]["expires_at"])
    assert retire - created == timedelta(hours=24)

    table = registered("keys", "list")
    assert table.exit_code == 0
    assert "replaced" in table.stdout
    assert new["key"] not in table.stdout
    plain = registered("keys", "rotate", new["id"], "--grace", "0s")
    assert plain.exit_code == 0
    assert "shown only now" in plain.stdout
    assert "tly_" in plain.stdout


@pytest.mark.parametrize(
    ("grace", "fragment"),
    [
        ("31d", "grace_seconds"),
        ("soon", "a duration such as 24h"),
        ("-1h", "a duration such as 24h"),
    ],
)
def test_rotate_refuses_a_bad_grace(registered: Tally, grace: str, fragment: str) -> None:
    old = ok_json(registered("keys", "create", "--scope", "events:read", "--json"))
    result = registered("keys", "rotate", old["id"], "--grace", grace, "--json")
    failed(result, fragment)
    assert "tly_" not in result.stdout
    assert list(keys_by_id(registered)) == [old["id"]]


def test_rotate_refuses_revoked_unknown_and_already_rotated_keys(registered: Tally) -> None:
    revoked = ok_json(registered("keys", "create", "--scope", "events:read", "--json"))
    ok_json(registered("keys", "revoke", revoked["id"], "--json"))
    failed(registered("keys", "rotate", revoked["id"], "--grace", "1h"), "revoked")
    failed(registered("keys", "rotate", "key_nope", "--grace", "1h"), "no key")
    rotated = ok_json(registered("keys", "create", "--scope", "events:read", "--json"))
    ok_json(registered("keys", "rotate", rotated["id"], "--grace", "1h", "--json"))
    failed(registered("keys", "rotate", rotated["id"], "--grace", "1h"), "rotated already")
    assert len(keys_by_id(registered)) == 3


def test_a_key_rotated_on_the_cli_keeps_working_for_the_grace_only(
    registered: Tally, client: TestClient, database_url: str
) -> None:
    del database_url  # the `client` serves the very store the CLI writes to
    old = ok_json(
        registered("keys", "create", "--scope", "events:write", "--application", "vm", "--json")
    )
    assert client.post("/v1/events", json=event("e-0"), headers=auth(old["key"])).status_code == 200
    in_grace = ok_json(registered("keys", "rotate", old["id"], "--grace", "1h", "--json"))
    assert client.post("/v1/events", json=event("e-1"), headers=auth(old["key"])).status_code == 200
    ok_json(registered("keys", "rotate", in_grace["id"], "--grace", "0s", "--json"))
    refused = client.post("/v1/events", json=event("e-2"), headers=auth(in_grace["key"]))
    assert refused.status_code == 401
    assert refused.json()["code"] == "ERR-AUTH-401"


def test_keys_list_shows_the_last_use(
    registered: Tally, client: TestClient, database_url: str
) -> None:
    del database_url
    key = ok_json(registered("keys", "create", "--scope", "events:read", "--json"))
    assert keys_by_id(registered)[key["id"]]["last_used_at"] is None
    before = datetime.now(UTC)
    assert client.get("/v1/events", headers=auth(key["key"])).status_code == 200
    used = datetime.fromisoformat(keys_by_id(registered)[key["id"]]["last_used_at"])
    assert before <= used <= datetime.now(UTC)


def audit_entries(tally: Tally, *args: str) -> list[dict[str, Any]]:
    page = ok_json(tally("audit", "list", "--json", *args))
    assert set(page) == {"entries", "next_cursor", "has_more"}
    return list(page["entries"])


def test_every_cli_action_is_audited_as_the_operator(registered: Tally) -> None:
    key = ok_json(registered("keys", "create", "--scope", "events:read", "--json"))
    new = ok_json(registered("keys", "rotate", key["id"], "--grace", "1h", "--json"))
    ok_json(registered("keys", "revoke", new["id"], "--json"))

    found = audit_entries(registered)
    assert [(e["action"], e["target"]) for e in found] == [
        ("key.revoke", new["id"]),
        ("key.rotate", key["id"]),
        ("key.create", key["id"]),
        ("application.create", "vm"),
        ("tenant.create", "acme"),
    ]
    assert {(e["actor"], e["source"], e["request_id"]) for e in found} == {(OPERATOR, "cli", None)}
    text = registered("audit", "list").stdout + json.dumps(found)
    assert "tly_" not in text
    for secret in (key["key"], new["key"]):
        assert secret not in text


def test_api_actions_are_listed_by_the_cli_with_key_address_and_request_id(
    registered: Tally, client: TestClient, database_url: str
) -> None:
    del database_url
    admin = ok_json(registered("keys", "create", "--scope", "admin", "--json"))
    made = client.post(
        "/v1/tenants",
        json={"id": "initech"},
        headers={**auth(admin["key"]), "X-Request-ID": "made-by-api"},
    )
    assert made.status_code == 201
    [entry] = audit_entries(registered, "--actor", admin["id"])
    assert (entry["action"], entry["target"], entry["source"], entry["request_id"]) == (
        "tenant.create",
        "initech",
        "testclient",
        "made-by-api",
    )


def test_audit_list_filters_and_pages(registered: Tally) -> None:
    for n in range(4):
        ok_json(registered("tenants", "create", f"t{n}", "--json"))
    assert [e["target"] for e in audit_entries(registered, "--action", "tenant.create")] == [
        "t3",
        "t2",
        "t1",
        "t0",
        "acme",
    ]
    assert audit_entries(registered, "--actor", "cli:nobody") == []
    assert len(audit_entries(registered, "--since", "1h")) == 6
    assert audit_entries(registered, "--since", "2999-01-01T00:00:00Z") == []
    first = ok_json(registered("audit", "list", "--limit", "2", "--json"))
    assert [e["target"] for e in first["entries"]] == ["t3", "t2"]
    assert first["has_more"]
    rest = audit_entries(registered, "--cursor", first["next_cursor"])
    assert [e["target"] for e in rest] == ["t1", "t0", "vm", "acme"]
    table = registered("audit", "list", "--limit", "2")
    assert table.exit_code == 0
    assert "tenant.create" in table.stdout
    assert f"--cursor {first['next_cursor']}" in table.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--since", "last tuesday"], "since"),
        (["--limit", "0"], "limit"),
        (["--cursor", "x"], "cursor"),
        (["--action", "Bad Action"], "action"),
    ],
)
def test_audit_list_refuses_bad_options(registered: Tally, args: list[str], fragment: str) -> None:
    failed(registered("audit", "list", *args, "--json"), fragment)


def test_revoking_the_last_admin_key_needs_force(registered: Tally) -> None:
    first = ok_json(registered("keys", "create", "--scope", "admin", "--json"))
    refused = registered("keys", "revoke", first["id"])
    failed(refused, "last admin key", "--force")
    assert keys_by_id(registered)[first["id"]]["revoked_at"] is None

    # The host's recovery path: another admin key, then the old one goes without --force.
    second = ok_json(registered("keys", "create", "--scope", "admin", "--json"))
    assert ok_json(registered("keys", "revoke", first["id"], "--json"))["revoked"] is True
    forced = ok_json(registered("keys", "revoke", second["id"], "--force", "--json"))
    assert forced["revoked"] is True
    [entry] = [
        e
        for e in ok_json(registered("audit", "list", "--action", "key.revoke", "--json"))["entries"]
        if e["target"] == second["id"]
    ]
    assert entry["details"] == {"forced": True}
