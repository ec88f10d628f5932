"""The whole story as an operator and a billing system live it, with real processes: `tally
serve` takes events while `tally backup` runs; `tally backup verify` checks the file; `tally
restore` puts it into an empty store of the other kind; `tally serve` serves that, and the
billing system's saved cursor goes on with no gap and no repeat, and one that had read past
the backup is refused for the new epoch and resumes with no entry missing."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.backup.conftest import everything, identity
from tests.conftest import new_database
from tests.support.server import run_tally, running_server

pytestmark = pytest.mark.postgres


def tally(*args: str, url: str, keyring: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`tally <args>` on the store at `url` with `keyring`, as an operator runs it."""
    return run_tally(url, cwd, *args, env={"TALLY_KEYRING": str(keyring)}, timeout=120)


@contextmanager
def store_url(kind: str, tmp_path: Path, name: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / f'{name}.db'}"
    else:
        with new_database(f"h9_backup_{name}") as url:
            yield url


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def event(event_id: str, n: int) -> dict[str, Any]:
    return {
        "id": event_id,
        "tenant": ("acme", "globex")[n % 2],
        "type": "api.calls",
        "quantity": f"{n}.25",
        "time": datetime.now(UTC).isoformat(),
        "attributes": {"endpoint": f"/v1/things/{n % 5}", "ok": n % 3 != 0},
    }


@pytest.mark.parametrize(
    ("source_kind", "target_kind"), [("sqlite", "postgres"), ("postgres", "sqlite")]
)
def test_backup_under_load_verify_restore_elsewhere_and_the_saved_cursor_goes_on(
    tmp_path: Path, keyring_file: Path, source_kind: str, target_kind: str
) -> None:
    backup = tmp_path / "tally.tbk"
    env = {"TALLY_KEYRING": str(keyring_file), "TALLY_REGION": "local"}
    with (
        store_url(source_kind, tmp_path, "source") as source,
        store_url(target_kind, tmp_path, "target") as target,
    ):
        backup_and_restore(
            source=source,
            target=target,
            backup=backup,
            env=env,
            keyring=keyring_file,
            workdir=tmp_path,
        )


def backup_and_restore(
    *, source: str, target: str, backup: Path, env: dict[str, str], keyring: Path, workdir: Path
) -> None:
    with (
        running_server(source, workdir, env=env, label="source") as server,
        server.client() as client,
    ):
        admin = bearer(server.admin_key)
        for body in ({"id": "acme"}, {"id": "globex"}):
            assert client.post("/v1/tenants", json=body, headers=admin).is_success
        assert client.post("/v1/applications", json={"id": "vm"}, headers=admin).is_success
        writer = client.post(
            "/v1/keys", json={"scopes": ["events:write"], "application": "vm"}, headers=admin
        ).json()["key"]
        reader = client.post("/v1/keys", json={"scopes": ["events:read"]}, headers=admin).json()[
            "key"
        ]
        sent = client.post(
            "/v1/events",
            json={"events": [event(f"e-{n}", n) for n in range(40)]},
            headers=bearer(writer),
        )
        assert sent.json()["accepted"] == 40, sent.text
        cancelled = client.post(
            "/v1/events/vm/e-3/cancel", json={"reason": "duplicate report"}, headers=bearer(writer)
        )
        assert cancelled.status_code == 200, cancelled.text
        # The billing system reads a first page and saves its cursor.
        first = client.get("/v1/events", params={"limit": 15}, headers=bearer(reader)).json()
        saved, seen = first["next_cursor"], first["events"]

        stop = threading.Event()
        during: list[int] = []

        def write() -> None:
            with server.client() as own:
                n = 1000
                while not stop.is_set():
                    n += 1
                    response = own.post(
                        "/v1/events", json=event(f"w-{n}", n), headers=bearer(writer)
                    )
                    assert response.status_code == 200, response.text
                    during.append(n)

        writing = threading.Thread(target=write, daemon=True)
        writing.start()
        try:
            taken = tally("backup", "--out", str(backup), url=source, keyring=keyring, cwd=workdir)
        finally:
            stop.set()
            writing.join(timeout=30)
        assert taken.returncode == 0, taken.stderr
        assert "written to" in taken.stdout and taken.stderr == ""  # no progress bar off a terminal
        assert during, "no event was written while the backup ran"

        verified = tally("backup", "verify", str(backup), url=source, keyring=keyring, cwd=workdir)
        assert verified.returncode == 0, verified.stderr
        assert "is intact" in verified.stdout
        audit = client.get("/v1/audit", params={"action": "backup.create"}, headers=admin).json()
        assert len(audit["entries"]) == 1

        restored = tally("restore", str(backup), url=target, keyring=keyring, cwd=workdir)
        assert restored.returncode == 0, restored.stderr
        assert "Restored backup" in restored.stdout and "new epoch" in restored.stdout
        again = tally("restore", str(backup), url=target, keyring=keyring, cwd=workdir)
        assert again.returncode == 1 and "not empty" in again.stderr

        # A second billing system reads everything, past what the backup holds.
        source_entries, ahead = everything(client, reader)

    with (
        running_server(target, workdir, env=env, label="target") as restored_server,
        restored_server.client() as client,
    ):
        assert restored_server.admin_key == ""  # the keys came back: no new admin key
        in_backup, _ = everything(client, reader)
        # What the backup holds is what the source held up to its high-water marks.
        by_identity = {identity(e): e for e in source_entries}
        assert all(by_identity[identity(e)] == e for e in in_backup)
        assert 40 + 1 < len(in_backup) < len(source_entries)

        # The saved cursor is behind the backup's high-water marks: it continues as it is,
        # with every entry it had not read, once.
        resumed, cursor = everything(client, reader, saved)
        assert sorted(identity(e) for e in seen + resumed) == sorted(identity(e) for e in in_backup)

        # New events on the restored store follow that cursor, once each.
        writer_again = client.post("/v1/events", json=event("after", 7), headers=bearer(writer))
        assert writer_again.json()["status"] == "accepted", writer_again.text
        after, _ = everything(client, reader, cursor)
        assert [identity(e) for e in after] == [("event", "vm", "after")]

        # The cursor that had read past the backup is refused, with where to resume; following
        # it and de-duplicating by identity, that billing system misses nothing.
        refused = client.get("/v1/events", params={"cursor": ahead}, headers=bearer(reader))
        assert refused.status_code == 409, refused.text
        problem = refused.json()
        assert problem["type"] == "/problems/log-rewound"
        again_read, _ = everything(client, reader, problem["resume_cursor"])
        held = {identity(e) for e in source_entries} | {identity(e) for e in again_read}
        assert held >= {identity(e) for e in in_backup} | {("event", "vm", "after")}

        epochs = tally("epoch", "show", "--json", url=target, keyring=keyring, cwd=workdir)
        assert "restored from backup bk-" in epochs.stdout
