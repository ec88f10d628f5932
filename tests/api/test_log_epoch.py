"""The export log's epoch: a cursor ahead of the log (a restore rewound it) is refused with
where to resume, never answered by silently skipping what takes the offsets it has passed."""

from __future__ import annotations

import base64
import secrets
import struct
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from fastapi.testclient import TestClient

from tally.bootstrap import Services
from tally.client import Client, LogRewound
from tally.events.cursor import CursorCodec
from tally.events.log import ExportFilter, partition_of
from tests.api.helpers import assert_problem, auth, post_events
from tests.api.test_export import follow, page, v1_cursor
from tests.conftest import World, event


def ids(events: list[dict[str, Any]]) -> list[str]:
    return sorted(e["id"] for e in events)


def renew(services: Services) -> None:
    services.store.renew_log_epoch(reason="restored in a test", at=datetime.now(UTC))


def rewound(client: TestClient, key: str, cursor: str, **headers: str) -> dict[str, Any]:
    """The 409 log-rewound problem for `cursor`; returns it."""
    response = client.get("/v1/events", params={"cursor": cursor}, headers=auth(key) | headers)
    problem = assert_problem(response, 409, "ERR-VAL-409")
    assert problem["type"] == "/problems/log-rewound"
    assert "restored" in problem["detail"] and "resume_cursor" in problem["detail"]
    assert isinstance(problem["resume_cursor"], str)
    return problem


def cursor_at(services: Services, acme: int, *, epoch: bytes | None = None) -> str:
    """A cursor as Tally issues them, at offset `acme` of acme's partition (the others at
    0), in `epoch` (the current one by default): where a reader of an older log had read to."""
    partitions = services.store.partitions
    positions = [0] * partitions
    positions[partition_of("acme", partitions)] = acme
    epoch = epoch or services.store.log_epochs()[-1].id
    codec = CursorCodec(services.store.secret("cursor"))
    return codec.encode(positions, 0, ExportFilter().digest(), epoch)


def test_a_cursor_ahead_of_a_restored_log_is_refused_with_where_to_resume(
    client: TestClient, world: World, services: Services
) -> None:
    post_events(client, world.writer, {"events": [event(f"a-{i}") for i in range(6)]})
    first = page(client, world.reader, limit=4)
    _, end, _ = follow(client, world.reader, cursor=first["next_cursor"])
    old_epoch = services.store.log_epochs()[-1].id
    # The store "restored" from a backup of its six entries: a reader of the old log that
    # had read three more entries holds a cursor at offset 9. The events sent after the
    # restore take offsets 7 to 11: read from 9, the first three would be skipped.
    ahead = cursor_at(services, 9, epoch=old_epoch)
    renew(services)
    post_events(client, world.writer, {"events": [event(f"b-{i}") for i in range(5)]})
    after_restore = [f"b-{i}" for i in range(5)]

    problem = rewound(client, world.reader, ahead)

    resumed, _, _ = follow(client, world.reader, cursor=problem["resume_cursor"])
    assert ids(resumed) == after_restore  # from the restored point (6): nothing skipped
    # The NDJSON stream is refused the same way, before its first byte.
    rewound(client, world.reader, ahead, accept="application/x-ndjson")
    # Cursors of the old epoch behind the restored point continue as they are: no gap, no
    # repeat; the next cursors are of the new epoch.
    rest, last, _ = follow(client, world.reader, cursor=first["next_cursor"])
    assert ids(rest) == sorted(["a-4", "a-5", *after_restore])
    assert ids(follow(client, world.reader, cursor=end)[0]) == after_restore
    assert page(client, world.reader, cursor=last)["events"] == []


def test_a_cursor_past_the_log_end_in_the_same_epoch_is_refused(
    client: TestClient, world: World, services: Services
) -> None:
    """A point-in-time recovery before `tally epoch renew` keeps the epoch but rewinds the
    offsets: a cursor beyond a partition's head is refused, resuming at the head."""
    post_events(client, world.writer, {"events": [event(f"a-{i}") for i in range(3)]})
    assert page(client, world.reader, cursor=cursor_at(services, 3))["events"] == []

    # The reader had read four entries the recovered log no longer holds.
    problem = rewound(client, world.reader, cursor_at(services, 7))

    post_events(client, world.writer, {"events": [event(f"b-{i}") for i in range(5)]})
    resumed, _, _ = follow(client, world.reader, cursor=problem["resume_cursor"])
    assert ids(resumed) == [f"b-{i}" for i in range(5)]


def v2_cursor(secret: bytes, positions: list[int], start: int, digest: bytes) -> str:
    """A cursor as Tally issued them before epochs (version 2): sealed, without the epoch."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"tally export cursor v2")
    nonce, header = secrets.token_bytes(12), bytes([2])
    plain = struct.pack(f">12s{len(positions)}QH", digest, *positions, start)
    sealed = AESGCM(key.derive(secret)).encrypt(nonce, plain, header)
    return base64.urlsafe_b64encode(header + nonce + sealed).rstrip(b"=").decode()


def test_cursors_from_before_epochs_are_of_the_first_epoch(
    client: TestClient, world: World, services: Services
) -> None:
    post_events(client, world.writer, event("a-0"))
    partitions = services.store.partitions
    secret, digest = services.store.secret("cursor"), ExportFilter().digest()

    def legacy(acme: int) -> list[str]:
        positions = [0] * partitions
        positions[partition_of("acme", partitions)] = acme
        return [make(secret, positions, 0, digest) for make in (v1_cursor, v2_cursor)]

    assert all(page(client, world.reader, cursor=c)["events"] == [] for c in legacy(1))
    renew(services)  # restored with one entry
    post_events(client, world.writer, {"events": [event(f"b-{i}") for i in range(4)]})

    for cursor in legacy(0):  # behind the restored point: continues
        assert ids(page(client, world.reader, cursor=cursor)["events"]) == [
            "a-0", "b-0", "b-1", "b-2", "b-3"
        ]  # fmt: skip
    for cursor in legacy(3):  # had read two entries the restored log lost: refused
        problem = rewound(client, world.reader, cursor)
        resumed, _, _ = follow(client, world.reader, cursor=problem["resume_cursor"])
        assert ids(resumed) == ["b-0", "b-1", "b-2", "b-3"]


def test_the_sdk_raises_log_rewound_with_the_resume_cursor(
    client: TestClient, world: World, services: Services
) -> None:
    post_events(client, world.writer, {"events": [event(f"a-{i}") for i in range(3)]})
    end = cursor_at(services, 5)  # two entries past what the restored log holds
    renew(services)
    post_events(client, world.writer, event("b-0"))
    # The SDK over the app in this process (TestClient's transport), as over a network.
    transport = client._transport  # type: ignore[attr-defined]
    with Client("http://testserver", world.reader, transport=transport) as sdk:
        with pytest.raises(LogRewound) as caught:
            list(sdk.export(cursor=end))
        assert caught.value.status == 409 and caught.value.resume_cursor
        resumed = sdk.export(cursor=caught.value.resume_cursor)
        assert [entry["id"] for entry, _ in resumed] == ["b-0"]
