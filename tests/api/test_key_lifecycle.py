"""Key rotation with a grace period (also under load), expiry, and last use, over the API.

The app here runs on a clock the test moves, so "after the grace period" needs no sleeping.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.bootstrap import Services, build
from tally.registry.models import ApplicationIn, KeyIn, TenantIn
from tally.settings import Settings
from tally.store.interface import EventStore
from tests.api.helpers import assert_problem, auth, post_events
from tests.conftest import event


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self.now += delta


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def timed(settings: Settings, store: EventStore, clock: Clock) -> Iterator[Services]:
    built = build(settings, store=store, clock=clock)
    built.registry.create_tenant(TenantIn(id="acme"))
    built.registry.create_application(ApplicationIn(id="vm"))
    yield built
    built.committer.close()


@pytest.fixture
def api(timed: Services) -> Iterator[TestClient]:
    with TestClient(create_app(services=timed), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def admin(timed: Services) -> dict[str, str]:
    return auth(timed.registry.create_key(KeyIn(scopes=["admin"])).key)


def new_writer(api: TestClient, admin: dict[str, str], **extra: Any) -> dict[str, Any]:
    spec = {"scopes": ["events:write"], "application": "vm", "tenants": ["acme"], **extra}
    response = api.post("/v1/keys", json=spec, headers=admin)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def rotate(api: TestClient, admin: dict[str, str], key_id: str, grace: object) -> Any:
    return api.post(f"/v1/keys/{key_id}/rotate", json={"grace_seconds": grace}, headers=admin)


def listed(api: TestClient, admin: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {k["id"]: k for k in api.get("/v1/keys", headers=admin).json()}


def test_rotation_issues_a_like_key_and_both_work_during_the_grace(
    api: TestClient, admin: dict[str, str], clock: Clock
) -> None:
    old = new_writer(api, admin, expires_at=(clock.now + timedelta(days=90)).isoformat())

    response = rotate(api, admin, old["id"], 3600)

    assert response.status_code == 201, response.text
    new = response.json()
    assert new["key"].startswith("tly_")
    assert new["key"] != old["key"]
    assert new["id"] != old["id"]
    same = ("scopes", "application", "tenants")
    assert {f: new[f] for f in same} == {f: old[f] for f in same}
    lifetime = datetime.fromisoformat(new["expires_at"]) - datetime.fromisoformat(new["created_at"])
    assert lifetime == timedelta(days=90)
    assert new["rotated_from"] == old["id"]
    keys = listed(api, admin)
    assert keys[old["id"]]["replaced_by"] == new["id"]
    assert keys[new["id"]]["rotated_from"] == old["id"]
    assert datetime.fromisoformat(keys[old["id"]]["expires_at"]) == clock.now + timedelta(hours=1)
    assert new["key"] not in str(keys)

    assert post_events(api, old["key"], event("e-old")).status_code == 200
    assert post_events(api, new["key"], event("e-new")).status_code == 200
    clock.advance(timedelta(minutes=59))
    assert post_events(api, old["key"], event("e-old-2")).status_code == 200
    clock.advance(timedelta(minutes=1))
    assert_problem(post_events(api, old["key"], event("e-old-3")), 401, "ERR-AUTH-401")
    assert post_events(api, new["key"], event("e-new-2")).status_code == 200


def test_rotating_a_key_without_expiry_gives_a_key_without_expiry(
    api: TestClient, admin: dict[str, str]
) -> None:
    old = new_writer(api, admin)
    new = rotate(api, admin, old["id"], 60).json()
    assert new["expires_at"] is None


def test_grace_never_extends_an_earlier_expiry(
    api: TestClient, admin: dict[str, str], clock: Clock
) -> None:
    soon = clock.now + timedelta(minutes=5)
    old = new_writer(api, admin, expires_at=soon.isoformat())
    assert rotate(api, admin, old["id"], 7 * 24 * 3600).status_code == 201
    assert datetime.fromisoformat(listed(api, admin)[old["id"]]["expires_at"]) == soon


def test_grace_zero_retires_the_old_key_at_once_with_the_usual_401(
    api: TestClient, admin: dict[str, str]
) -> None:
    old = new_writer(api, admin)
    new = rotate(api, admin, old["id"], 0).json()
    refused = assert_problem(post_events(api, old["key"], event("e-1")), 401, "ERR-AUTH-401")
    unknown = post_events(api, "tly_" + "A" * 42, event("e-1")).json()
    assert {k: v for k, v in refused.items() if k != "request_id"} == {
        k: v for k, v in unknown.items() if k != "request_id"
    }
    assert post_events(api, new["key"], event("e-1")).status_code == 200


@pytest.mark.parametrize(
    ("grace", "status"),
    [(-1, 400), (30 * 24 * 3600 + 1, 400), ("60", 400), (1.5, 400), (None, 400)],
)
def test_a_bad_grace_is_a_400_and_changes_nothing(
    api: TestClient, admin: dict[str, str], grace: object, status: int
) -> None:
    old = new_writer(api, admin)
    problem = assert_problem(rotate(api, admin, old["id"], grace), status, "ERR-VAL-400")
    assert "/grace_seconds" in [e.get("pointer") for e in problem["errors"]]
    assert listed(api, admin)[old["id"]]["replaced_by"] is None
    assert len(listed(api, admin)) == 2


def test_the_longest_grace_is_thirty_days(api: TestClient, admin: dict[str, str]) -> None:
    old = new_writer(api, admin)
    assert rotate(api, admin, old["id"], 30 * 24 * 3600).status_code == 201


def test_revoked_expired_and_rotated_keys_cannot_be_rotated(
    api: TestClient, admin: dict[str, str], clock: Clock
) -> None:
    revoked = new_writer(api, admin)
    assert api.delete(f"/v1/keys/{revoked['id']}", headers=admin).status_code == 204
    expiring = new_writer(api, admin, expires_at=(clock.now + timedelta(hours=1)).isoformat())
    rotated = new_writer(api, admin)
    assert rotate(api, admin, rotated["id"], 60).status_code == 201
    clock.advance(timedelta(hours=1))
    before = len(listed(api, admin))

    for key, word in ((revoked, "revoked"), (expiring, "expired"), (rotated, "rotated")):
        problem = assert_problem(rotate(api, admin, key["id"], 60), 409, "ERR-VAL-409")
        assert problem["type"] == "/problems/conflict"
        assert word in problem["detail"]
    assert len(listed(api, admin)) == before


def test_rotating_an_unknown_key_is_a_404(api: TestClient, admin: dict[str, str]) -> None:
    assert_problem(rotate(api, admin, "key_0000000000000000", 60), 404, "ERR-RES-404")


def test_a_rotated_key_can_be_rotated_again_and_the_chain_is_listed(
    api: TestClient, admin: dict[str, str]
) -> None:
    first = new_writer(api, admin)
    second = rotate(api, admin, first["id"], 60).json()
    third = rotate(api, admin, second["id"], 60).json()
    keys = listed(api, admin)
    assert (keys[first["id"]]["rotated_from"], keys[first["id"]]["replaced_by"]) == (
        None,
        second["id"],
    )
    assert (keys[second["id"]]["rotated_from"], keys[second["id"]]["replaced_by"]) == (
        first["id"],
        third["id"],
    )
    assert (keys[third["id"]]["rotated_from"], keys[third["id"]]["replaced_by"]) == (
        second["id"],
        None,
    )


def test_rotation_under_load_fails_no_request_during_the_grace(
    api: TestClient, admin: dict[str, str], clock: Clock
) -> None:
    old = new_writer(api, admin)
    statuses: list[int] = []
    stop = threading.Event()
    sent_after_rotation = threading.Event()
    rotated = threading.Event()

    def load() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            statuses.append(post_events(api, old["key"], event(f"load-{n}")).status_code)
            if rotated.is_set():
                sent_after_rotation.set()

    sender = threading.Thread(target=load)
    sender.start()
    try:
        while len(statuses) < 20 and sender.is_alive():
            threading.Event().wait(0.01)
        response = rotate(api, admin, old["id"], 600)
        rotated.set()
        assert response.status_code == 201, response.text
        # Keep the load going until it has sent requests after the rotation too.
        assert sent_after_rotation.wait(timeout=60)
        while len(statuses) < 60 and sender.is_alive():
            threading.Event().wait(0.01)
    finally:
        stop.set()
        sender.join(timeout=60)

    assert len(statuses) >= 21
    assert set(statuses) == {200}, statuses
    new = response.json()
    clock.advance(timedelta(seconds=600))
    assert_problem(post_events(api, old["key"], event("late-old")), 401, "ERR-AUTH-401")
    assert post_events(api, new["key"], event("late-new")).status_code == 200


def test_last_use_is_listed_and_a_key_used_only_in_its_grace_shows_it(
    api: TestClient, admin: dict[str, str], clock: Clock
) -> None:
    old = new_writer(api, admin)
    assert listed(api, admin)[old["id"]]["last_used_at"] is None
    new = rotate(api, admin, old["id"], 3600).json()
    clock.advance(timedelta(minutes=10))
    used_at = clock.now
    assert post_events(api, old["key"], event("e-1")).status_code == 200

    keys = listed(api, admin)
    assert datetime.fromisoformat(keys[old["id"]]["last_used_at"]) == used_at
    assert keys[new["id"]]["last_used_at"] is None
    [admin_key] = [k for k in keys.values() if k["scopes"] == ["admin"]]
    assert admin_key["last_used_at"] is not None  # it has been listing them


def test_a_failed_authentication_records_no_use(api: TestClient, admin: dict[str, str]) -> None:
    key = new_writer(api, admin)
    assert api.delete(f"/v1/keys/{key['id']}", headers=admin).status_code == 204
    assert_problem(post_events(api, key["key"], event("e-1")), 401, "ERR-AUTH-401")
    assert listed(api, admin)[key["id"]]["last_used_at"] is None


def admin_ids(api: TestClient, admin: dict[str, str]) -> list[str]:
    return [k["id"] for k in listed(api, admin).values() if k["scopes"] == ["admin"]]


def test_the_last_valid_admin_key_cannot_be_revoked(api: TestClient, admin: dict[str, str]) -> None:
    [only] = admin_ids(api, admin)
    refused = api.delete(f"/v1/keys/{only}", headers=admin)
    problem = assert_problem(refused, 409, refused.json()["code"])
    assert "last admin key" in problem["detail"]
    assert api.get("/v1/keys", headers=admin).status_code == 200  # it still works

    second = api.post("/v1/keys", json={"scopes": ["admin"]}, headers=admin).json()
    assert api.delete(f"/v1/keys/{only}", headers=admin).status_code == 204
    other = auth(second["key"])
    assert_problem(api.delete(f"/v1/keys/{second['id']}", headers=other), 409, problem["code"])
    assert api.get("/v1/keys", headers=other).status_code == 200


def test_an_admin_key_retiring_or_expiring_does_not_count_as_another(
    api: TestClient, admin: dict[str, str], clock: Clock
) -> None:
    [old] = admin_ids(api, admin)
    rotated = rotate(api, admin, old, 3600)
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    # The old key works for the grace, but it is retiring: the new one is the last that stays.
    refused = api.delete(f"/v1/keys/{new['id']}", headers=admin)
    assert refused.status_code == 409, refused.text
    assert api.delete(f"/v1/keys/{old}", headers=admin).status_code == 204

    soon = (clock() + timedelta(minutes=5)).isoformat()
    brief = api.post(
        "/v1/keys", json={"scopes": ["admin"], "expires_at": soon}, headers=auth(new["key"])
    ).json()
    clock.advance(timedelta(minutes=6))
    assert api.delete(f"/v1/keys/{new['id']}", headers=auth(new["key"])).status_code == 409
    # An expired admin key takes nothing away: revoking it is never refused.
    assert api.delete(f"/v1/keys/{brief['id']}", headers=auth(new["key"])).status_code == 204
