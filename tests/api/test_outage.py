"""A PostgreSQL crash seen from the API: 503 while it is down, nothing lost, retries exact.

Uses a throwaway cluster (tests/support/pgcluster.py), never the shared server.
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.auth.service import Scope
from tally.bootstrap import build
from tally.registry.models import ApplicationIn, KeyIn, TenantIn
from tally.settings import Settings
from tally.store.postgres import PostgresStore
from tests.conftest import event
from tests.support.pgcluster import Cluster


def test_crash_gives_503_then_retries_store_each_event_once(
    cluster: Cluster, keyring_file: Path
) -> None:
    store = PostgresStore(cluster.url, connect_timeout=2)
    store.migrate()
    services = build(Settings(database_url=cluster.url, keyring=str(keyring_file)), store=store)
    services.registry.create_tenant(TenantIn(id="acme"))
    services.registry.create_application(ApplicationIn(id="vm"))
    writer = services.registry.create_key(KeyIn(scopes=[Scope.EVENTS_WRITE], application="vm")).key
    reader = services.registry.create_key(KeyIn(scopes=[Scope.EVENTS_READ])).key
    write = {"Authorization": f"Bearer {writer}"}
    read = {"Authorization": f"Bearer {reader}"}
    first, second = event("before-crash"), event("during-outage")

    with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
        assert client.post("/v1/events", json=first, headers=write).json()["status"] == "accepted"

        cluster.crash()
        down = client.post("/v1/events", json=second, headers=write)
        ready = client.get("/readyz")

        assert down.status_code == 503
        assert down.headers["retry-after"]
        assert down.json()["code"] == "ERR-SYS-503"
        assert ready.status_code == 503

        cluster.start()
        # As a client would: retry the whole batch while Tally answers 503, bounded (how soon
        # Tally serves again is tests/ha/test_recovery_time.py's).
        deadline = time.monotonic() + 30
        while True:
            retried = client.post("/v1/events", json={"events": [first, second]}, headers=write)
            if retried.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(float(retried.headers["retry-after"]))
        page = client.get("/v1/events", headers=read).json()

    services.close()
    assert retried.status_code == 200
    assert [e["status"] for e in retried.json()["events"]] == ["duplicate", "accepted"]
    assert sorted(e["id"] for e in page["events"]) == ["before-crash", "during-outage"]
    assert page["has_more"] is False
