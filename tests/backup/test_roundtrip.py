"""A backup restored into an empty store of either kind brings back every row as it was: the
four round trips SQLite and PostgreSQL allow, checked table by table, through the export, the
reconciliation figures, the keys, and a billing system's saved cursor."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from tally.backup import service
from tally.crypto.keyring import Keyring
from tally.events.model import parse_time
from tests.api.helpers import auth
from tests.backup.conftest import (
    KINDS,
    Clock,
    MakeStore,
    ev,
    everything,
    export,
    fill,
    identity,
    ingest,
    reconciliation,
    restore_into,
    serving,
    table_rows,
)

pytestmark = pytest.mark.postgres


def follow_all(client: Any, key: str, cursor: str) -> tuple[list[dict[str, Any]], int]:
    """Every entry after `cursor`, following a log-rewound refusal's resume_cursor; and how
    many refusals there were."""
    entries: list[dict[str, Any]] = []
    refusals = 0
    while True:
        response = client.get("/v1/events", params={"cursor": cursor}, headers=auth(key))
        if response.status_code == 409 and refusals == 0:
            problem = response.json()
            assert problem["type"] == "/problems/log-rewound", problem
            cursor = problem["resume_cursor"]
            refusals += 1
            continue
        assert response.status_code == 200, response.text
        page = response.json()
        entries.extend(page["events"])
        cursor = page["next_cursor"]
        if not page["has_more"]:
            return entries, refusals


@pytest.mark.parametrize(("source_kind", "target_kind"), list(itertools.product(KINDS, KINDS)))
def test_a_restore_brings_back_every_row_on_either_store(
    make_store: MakeStore, keyring: Keyring, tmp_path: Path, source_kind: str, target_kind: str
) -> None:
    source = make_store(source_kind)
    clock = Clock()
    path = tmp_path / "store.tbk"
    with serving(source, clock) as (_, client):
        keys = fill(_, client, clock)
        exported = export(client, keys)
        reconciled = reconciliation(client, keys)
        # A billing system has read the first three entries and saved its cursor.
        saved = client.get("/v1/events", params={"limit": 3}, headers=auth(keys.reader)).json()
        manifest = service.take(source.store, path, keyring=keyring, now=clock())
        before = table_rows(source.store)
        # Another reads on after the backup, past what it holds.
        ingest(client, keys.writer, [ev("late-1", "2026-03-02T10:00:00Z", "1")])
        ahead, ahead_cursor = everything(client, keys.reader)

    target = make_store(target_kind)
    restored = restore_into(target, path, keyring)
    after = table_rows(target.reopen())

    assert restored.manifest.backup_id == manifest.backup_id
    assert set(after) == set(before)
    for table in sorted(before):
        if table not in ("audit_log", "log_epochs"):
            assert after[table] == before[table], table
    # The audit log as it was, then the restore's own entries; the epochs as they were, then
    # a new one at the backup's high-water marks, which is the log's from now on.
    assert after["audit_log"][: len(before["audit_log"])] == before["audit_log"]
    assert [row[3] for row in after["audit_log"][len(before["audit_log"]) :]] == [
        "backup.restore",
        "log.epoch_renew",
    ]
    assert after["log_epochs"][:-1] == before["log_epochs"]
    assert restored.epoch.id.hex() != manifest.figures.log_epoch
    assert restored.epoch.base == manifest.figures.high_water_marks
    assert restored.epoch.seq == len(before["log_epochs"]) + 1
    assert len(before["events"]) == 7 and len(before["cancellations"]) == 2
    assert {row[0] for row in before["tenant_keys"]} == {"acme", "globex", "initech"}

    # The manifest's figures are GET /v1/reconciliation's, digests included.
    by_key = {(p.tenant, p.type, parse_time(p.period_start)): p for p in manifest.figures.periods}
    assert len(by_key) == len(reconciled) == 5
    for row in reconciled:
        period = by_key[(row["tenant"], row["type"], parse_time(row["period_start"]))]
        assert (period.count, period.sum, period.digest) == (
            row["count"],
            row["sum"],
            row["digest"],
        )
        assert (period.cancelled_count, period.cancelled_sum) == (
            row["cancelled"]["count"],
            row["cancelled"]["sum"],
        )

    with serving(target, Clock()) as (services, client):
        assert export(client, keys) == exported
        assert reconciliation(client, keys) == reconciled
        assert services.store.list_meters()[0].id == "vcpu"
        # The saved cursor, behind the backup's high-water marks, continues as it is: every
        # entry it had not read, once.
        rest, refusals = follow_all(client, keys.reader, saved["next_cursor"])
        assert refusals == 0
        seen = [identity(e) for e in saved["events"]]
        assert sorted(seen + [identity(e) for e in rest]) == sorted(identity(e) for e in exported)
        # The cursor that read past the backup is refused (the log was rewound under it) with
        # where to resume; de-duplicating by identity, it then has every entry, and new ones.
        ingest(client, keys.writer, [ev("new-1", "2026-03-02T10:00:00Z", "2")])
        resumed, refusals = follow_all(client, keys.reader, ahead_cursor)
        assert refusals == 1
        held = {identity(e) for e in ahead} | {identity(e) for e in resumed}
        assert held >= {identity(e) for e in exported} | {("event", "vm", "new-1")}
        # Usage still groups by attribute: tokens and their dictionary came along.
        usage = client.get(
            "/v1/usage",
            params={
                "from": "2026-02-01T00:00:00Z",
                "to": "2026-03-03T00:00:00Z",
                "window": "month",
                "tenant": "acme",
                "type": "compute.vcpu_seconds",
                "group_by": "attributes.sku",
            },
            headers=auth(keys.reader),
        )
        assert usage.status_code == 200, usage.text
        assert "std" in json.dumps(usage.json())
