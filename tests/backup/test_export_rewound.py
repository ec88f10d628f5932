"""`tally export` into a file when Tally is restored from an older backup under it: it stops
with the log-rewound problem, or with `--on-rewind resume` goes on from where the file and
the restored log agree, never writing an entry the file holds twice."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.backup.test_cli_e2e import tally
from tests.support.server import Server, running_server


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def send(server: Server, key: str, *ids: str) -> None:
    events = [
        {"id": i, "tenant": "acme", "type": "api.calls", "quantity": "1", "time": TIME} for i in ids
    ]
    with server.client(headers=bearer(key)) as client:
        answer = client.post("/v1/events", json={"events": events})
    assert answer.status_code == 200 and answer.json()["accepted"] + answer.json()[
        "duplicates"
    ] == len(ids), answer.text


TIME = datetime.now(UTC).isoformat()


def ids_in(out: Path, form: str) -> list[str]:
    with out.open(encoding="utf-8", newline="") as file:
        if form == "ndjson":
            return [json.loads(line)["id"] for line in file]
        return [row["id"] for row in csv.DictReader(file)]


@pytest.mark.parametrize("form", ["ndjson", "csv"])
def test_export_resumes_after_a_restore_without_writing_an_entry_twice(
    tmp_path: Path, keyring_file: Path, form: str
) -> None:
    source, target = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    env = {"TALLY_KEYRING": str(keyring_file)}
    out, backup = tmp_path / f"billing.{form}", tmp_path / "old.tbk"

    def export(server: Server, key: str, *extra: str) -> Any:
        args = ["export", "--url", server.base_url, "--key", key, "--out", str(out)]
        return tally(
            *args, "--format", form, *extra, url=source, keyring=keyring_file, cwd=tmp_path
        )

    with running_server(source, tmp_path, env=env, label="source") as server:
        with server.client(headers=bearer(server.admin_key)) as admin:
            admin.post("/v1/tenants", json={"id": "acme"}).raise_for_status()
            admin.post("/v1/applications", json={"id": "vm"}).raise_for_status()
            keys = [
                admin.post("/v1/keys", json=spec).json()["key"]
                for spec in ({"scopes": ["events:write"], "application": "vm"},
                             {"scopes": ["events:read"]})
            ]  # fmt: skip
        writer, reader = keys
        send(server, writer, "e1", "e2", "e3")
        made = tally("backup", "--out", str(backup), url=source, keyring=keyring_file, cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        send(server, writer, "e4", "e5", "e6")  # lost by the restore below
        assert export(server, reader).returncode == 0
        assert ids_in(out, form) == ["e1", "e2", "e3", "e4", "e5", "e6"]

    restored = tally("restore", str(backup), url=target, keyring=keyring_file, cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    with running_server(target, tmp_path, env=env, label="restored") as server:
        # The application sends e5 again (it had no answer it trusted), and new events.
        send(server, writer, "n1", "e5", "n2")
        stopped = export(server, reader)
        assert stopped.returncode == 1
        message = " ".join(stopped.stderr.split())
        assert "Log rewound" in message and "--on-rewind resume" in message, message
        assert ids_in(out, form) == ["e1", "e2", "e3", "e4", "e5", "e6"]  # unchanged

        resumed = export(server, reader, "--on-rewind", "resume", "--json")
        assert resumed.returncode == 0, resumed.stderr
        assert ids_in(out, form) == ["e1", "e2", "e3", "e4", "e5", "e6", "n1", "n2"]
        assert json.loads(resumed.stdout)["totals"]["entries"] == 8

        # From now on the file is in the new epoch, and e5 is never written twice.
        send(server, writer, "n3", "e6")
        assert export(server, reader).returncode == 0
        assert ids_in(out, form) == ["e1", "e2", "e3", "e4", "e5", "e6", "n1", "n2", "n3"]
