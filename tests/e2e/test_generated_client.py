"""A client generated from a real server's /openapi.json works, as billing teams use it.

openapi-python-client (pinned in requirements/codegen.lock, installed by `make test` into
.venv/codegen) generates a package from the served document; the test imports it and, with
its models and operations only, registers a tenant, posts a batch, reads problem documents as
parsed `Problem`s and pages the export to the end.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.support.server import Server

GENERATOR_BIN = Path(sys.executable).parent.parent / "codegen" / "bin"
PACKAGE = "tally_generated_client"


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """The document does not depend on the store: SQLite only."""
    return f"sqlite:///{tmp_path / 'tally.db'}"


@pytest.fixture
def generated(tally_server: Server, tmp_path: Path) -> Iterator[dict[str, ModuleType]]:
    """The generated package's modules that the test uses, by short name."""
    generator = GENERATOR_BIN / "openapi-python-client"
    if not generator.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{generator} is missing: `make test` installs it")
        pytest.skip(f"{generator} is missing: run `make test` (or make .venv/codegen/.installed)")
    document = tmp_path / "openapi.json"
    document.write_bytes(tally_server.client().get("/openapi.json").content)
    command = [generator, "generate", "--meta", "none", "--path", document]
    done = subprocess.run(
        [*command, "--output-path", tmp_path / PACKAGE],
        capture_output=True,
        timeout=180,
        check=False,
        # Its ruff (for the generated code's formatting) is in the same environment.
        env={**os.environ, "PATH": f"{GENERATOR_BIN}{os.pathsep}{os.environ['PATH']}"},
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")
    sys.path.insert(0, str(tmp_path))
    try:
        # Every module imports, not only the ones used below.
        for module in pkgutil.walk_packages([str(tmp_path / PACKAGE)], prefix=f"{PACKAGE}."):
            importlib.import_module(module.name)
        names = {
            "client": "client",
            "models": "models",
            "post_events": "api.events.post_events",
            "list_events": "api.events.list_events",
            "get_event": "api.events.get_event",
            "create_tenant": "api.registration.create_tenant",
            "create_application": "api.registration.create_application",
            "create_key": "api.registration.create_key",
        }
        yield {short: importlib.import_module(f"{PACKAGE}.{name}") for short, name in names.items()}
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def test_a_generated_client_posts_a_batch_reads_problems_and_pages_the_export(
    tally_server: Server, generated: dict[str, ModuleType]
) -> None:
    models: Any = generated["models"]
    api: Any = generated
    client_module: Any = generated["client"]

    def as_key(secret: str) -> Any:
        return client_module.AuthenticatedClient(base_url=tally_server.base_url, token=secret)

    admin = as_key(tally_server.admin_key)
    tenant = api["create_tenant"].sync(client=admin, body=models.TenantIn(id="acme"))
    assert isinstance(tenant, models.TenantOut), tenant
    application = models.ApplicationIn(id="vm-service")
    created = api["create_application"].sync(client=admin, body=application)
    assert isinstance(created, models.ApplicationOut), created
    issued = {
        scope: api["create_key"].sync(
            client=admin,
            body=models.KeyIn(
                scopes=[models.Scope(scope)],
                application="vm-service" if scope == "events:write" else None,
            ),
        )
        for scope in ("events:write", "events:read")
    }
    writer, reader = (as_key(issued[s].key) for s in ("events:write", "events:read"))

    now = datetime.now(UTC).replace(microsecond=0)
    events = [
        models.EventIn(
            id=f"evt-{n}", tenant="acme", type_="compute.vcpu_seconds", quantity="0.1", time=now
        )
        for n in range(5)
    ]
    batch = api["post_events"].sync(client=writer, body=models.BatchIn(events=events))
    assert isinstance(batch, models.BatchOut), batch
    assert (batch.accepted, batch.duplicates, batch.rejected) == (5, 0, 0)

    single = api["post_events"].sync(client=writer, body=events[0])
    assert isinstance(single, models.SingleOut), single
    assert (single.id, single.status.value) == ("evt-0", "duplicate")

    refused = api["list_events"].sync(client=as_key("tly_not_a_key"))
    assert isinstance(refused, models.Problem), refused
    assert (refused.status, refused.code) == (401, "ERR-AUTH-401")
    conflict = api["post_events"].sync(
        client=writer,
        body=models.EventIn(
            id="evt-0", tenant="acme", type_="compute.vcpu_seconds", quantity="2", time=now
        ),
    )
    assert isinstance(conflict, models.Problem), conflict
    assert (conflict.status, conflict.code, conflict.title) == (409, "ERR-VAL-409", "Conflict")
    assert [error.pointer for error in conflict.errors] == ["/id"]

    seen: list[str] = []
    cursor = None
    for _ in range(20):
        options = {"cursor": cursor} if cursor is not None else {}
        page = api["list_events"].sync(client=reader, tenant="acme", limit=2, **options)
        assert isinstance(page, models.ExportPageOut), page
        seen += [event.id for event in page.events]
        cursor = page.next_cursor
        if not page.has_more:
            break
    assert seen == [f"evt-{n}" for n in range(5)]
    one = api["get_event"].sync("vm-service", "evt-3", client=reader)
    assert isinstance(one, models.ExportedEvent), one
    assert (one.quantity, one.tenant) == ("0.1", "acme")
