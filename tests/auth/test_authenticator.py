"""The authenticator: constant-time acceptance, expiry at the boundary, and last use recorded
at most once a minute per key, without ever failing a request."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tally.auth import keys
from tally.auth.records import KeyRecord
from tally.auth.service import Authenticator
from tally.errors import StoreUnavailable, Unauthenticated
from tally.store.interface import EventStore
from tally.store.sqlite import SQLiteStore

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
SRC = Path(__file__).parents[2] / "src" / "tally"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def issue(store: EventStore, **fields: object) -> tuple[str, KeyRecord]:
    secret = keys.new_secret()
    base: dict[str, object] = {
        "id": keys.new_key_id(),
        "secret_hash": keys.secret_hash(secret),
        "scopes": ("events:read",),
        "application": None,
        "tenants": None,
        "created_at": NOW - timedelta(days=1),
        "expires_at": None,
        "revoked_at": None,
    }
    base.update(fields)
    record = KeyRecord(**base)  # type: ignore[arg-type]
    store.create_key(record)
    return secret, record


def bearer(secret: str) -> str:
    return f"Bearer {secret}"


def last_used(store: EventStore, key_id: str) -> datetime | None:
    found = store.get_key(key_id)
    assert found is not None
    return found.last_used_at


class LooseLookupStore(SQLiteStore):
    """A store whose lookup matches too much (as a case-insensitive collation or a prefix
    index would): it answers the first key whatever hash it is asked for."""

    def find_key(self, secret_hash: bytes) -> KeyRecord | None:
        del secret_hash
        found = self.list_keys()
        return found[0] if found else None


class FailingTouchStore(SQLiteStore):
    def touch_key(self, key_id: str, *, at: datetime, every: timedelta) -> None:
        raise StoreUnavailable("The SQLite store is busy or unwritable.")


def test_a_key_is_accepted_only_if_its_whole_hash_matches(tmp_path: Path) -> None:
    store = LooseLookupStore(tmp_path / "t.db")
    store.migrate()
    secret, record = issue(store)
    authenticator = Authenticator(store, clock=Clock())

    assert authenticator.authenticate(bearer(secret)).key_id == record.id
    with pytest.raises(Unauthenticated):
        authenticator.authenticate(bearer(keys.new_secret()))


def test_no_secret_or_hash_is_compared_with_equality_operators() -> None:
    """Secrets and their hashes are compared with hmac.compare_digest only."""
    suspicious: list[str] = []
    for path in [*(SRC / "auth").glob("*.py"), *(SRC / "registry").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(op, ast.Eq | ast.NotEq) for op in node.ops
            ):
                # A value (a name, an attribute, a call's result) named like a secret, a hash
                # or a checksum; lengths and arithmetic on them are public.
                values = [
                    ast.unparse(o.func if isinstance(o, ast.Call) else o).lower()
                    for o in (node.left, *node.comparators)
                    if isinstance(o, ast.Name | ast.Attribute | ast.Call)
                ]
                words = ("secret", "hash", "check", "digest")
                if any(word in value for value in values for word in words):
                    suspicious.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert suspicious == []


def test_a_key_stops_working_at_its_expiry(store: EventStore) -> None:
    clock = Clock()
    secret, record = issue(store, expires_at=NOW + timedelta(seconds=10))
    authenticator = Authenticator(store, clock=clock)
    clock.now = NOW + timedelta(seconds=9)
    assert authenticator.authenticate(bearer(secret)).key_id == record.id
    clock.now = NOW + timedelta(seconds=10)
    with pytest.raises(Unauthenticated):
        authenticator.authenticate(bearer(secret))


def test_last_use_is_recorded_on_first_use_then_at_most_once_a_minute(store: EventStore) -> None:
    clock = Clock()
    secret, record = issue(store)
    authenticator = Authenticator(store, clock=clock)
    assert last_used(store, record.id) is None

    authenticator.authenticate(bearer(secret))
    assert last_used(store, record.id) == NOW
    clock.now = NOW + timedelta(seconds=30)
    authenticator.authenticate(bearer(secret))
    assert last_used(store, record.id) == NOW  # within the minute: not written again
    clock.now = NOW + timedelta(seconds=61)
    authenticator.authenticate(bearer(secret))
    assert last_used(store, record.id) == NOW + timedelta(seconds=61)


def test_other_processes_do_not_write_a_fresh_last_use_again(store: EventStore) -> None:
    clock = Clock()
    secret, record = issue(store)
    first, second = Authenticator(store, clock=clock), Authenticator(store, clock=clock)
    first.authenticate(bearer(secret))
    clock.now = NOW + timedelta(seconds=20)
    second.authenticate(bearer(secret))  # its own first use, but the row is fresh enough
    assert last_used(store, record.id) == NOW


def test_revoked_and_expired_keys_record_no_use(store: EventStore) -> None:
    authenticator = Authenticator(store, clock=Clock())
    for fields in ({"revoked_at": NOW - timedelta(seconds=1)}, {"expires_at": NOW}):
        secret, record = issue(store, **fields)
        with pytest.raises(Unauthenticated):
            authenticator.authenticate(bearer(secret))
        assert last_used(store, record.id) is None


def test_a_use_that_cannot_be_recorded_does_not_fail_the_request(tmp_path: Path) -> None:
    store = FailingTouchStore(tmp_path / "t.db")
    store.migrate()
    secret, record = issue(store)
    authenticator = Authenticator(store, clock=Clock())
    assert authenticator.authenticate(bearer(secret)).key_id == record.id
    assert authenticator.authenticate(bearer(secret)).key_id == record.id
