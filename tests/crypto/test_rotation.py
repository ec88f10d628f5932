"""Master key rotation and re-encryption while events keep arriving."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.auth.service import Scope
from tally.bootstrap import build
from tally.crypto import keyring as keyrings
from tally.crypto.keyring import Keyring
from tally.registry.models import ApplicationIn, KeyIn, TenantIn
from tally.settings import Settings
from tests.api.helpers import export_all, post_events
from tests.conftest import event, open_store

TENANTS = [f"t{n}" for n in range(6)]


def test_rotate_and_reencrypt_under_load_then_drop_the_old_key(
    settings: Settings, database_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "tally.keyring"
    old = keyrings.generate(path).newest
    configured = settings.model_copy(update={"keyring": str(path)})
    services = build(configured, store=open_store(database_url))
    sent: dict[str, dict[str, str]] = {}
    failures: list[str] = []
    stop = threading.Event()
    try:
        for tenant in TENANTS:
            services.registry.create_tenant(TenantIn(id=tenant))
        services.registry.create_application(ApplicationIn(id="vm"))
        writer = services.registry.create_key(
            KeyIn(scopes=[Scope.EVENTS_WRITE], application="vm")
        ).key

        with TestClient(create_app(services=services)) as client:

            def write() -> None:
                n = 0
                while not stop.is_set() or n < 3 * len(TENANTS):
                    tenant = TENANTS[n % len(TENANTS)]
                    attributes = {"n": str(n), "tenant": tenant}
                    response = post_events(
                        client, writer, event(f"e{n}", tenant=tenant, attributes=attributes)
                    )
                    if response.status_code != 200:
                        failures.append(response.text)
                    sent[f"e{n}"] = attributes
                    n += 1

            thread = threading.Thread(target=write)
            thread.start()
            while len(sent) < 2 * len(TENANTS):  # every tenant has its data key by now
                time.sleep(0.01)
            new = keyrings.rotate(str(path)).newest
            time.sleep(1.1)  # servers re-read a changed keyring file within a second
            moved = 0
            while step := services.keys.rewrap(limit=2):
                moved += step
            stop.set()
            thread.join()
        assert failures == []
        assert moved == len(TENANTS)
        assert services.keys.pending() == {}
        assert services.store.data_key_usage() == {new.id: len(TENANTS)}
    finally:
        stop.set()
        services.close()

    # Without the old master key, everything still opens: nothing depends on it any more.
    keyrings.write(path, Keyring((new,), str(path)), replace=True)
    assert old.id not in path.read_text()
    reader_services = build(configured, store=open_store(database_url))
    try:
        reader = reader_services.registry.create_key(KeyIn(scopes=[Scope.EVENTS_READ])).key
        with TestClient(create_app(services=reader_services)) as client:
            exported = {e["id"]: e["attributes"] for e in export_all(client, reader)}
    finally:
        reader_services.close()
    assert exported == sent
