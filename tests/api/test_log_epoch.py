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


def test_a_cursor_of_an_earlier_epoch_is_refused_with_where_to_resume(
    client: TestClient, world: World, services: Services
) -> None:
    post_events(client, world.writer, {"events": [event(f"a-{i}") for i in range(6)]})
    first = page(client, world.reader, limit=4)
    _, end, _ = follow(client, world.reader, cursor=first["next_cursor"])
    # The store is "restored" at its current end: the log then holds all six, and a new
    # epoch begins there. Events sent after it take the offsets the old cursors had passed.
    renew(services)
    post_events(client, world.writer, {"events": [event(f"b-{i}") for i in range(3)]})

    for old in (first["next_cursor"], end):
        problem = rewound(client, world.reader, old)
        resumed, _, _ = follow(client, world.reader, cursor=problem["resume_cursor"])
        # Resumed at what the reader had read, before the epoch's base: nothing it had not
        # seen is missing, and nothing it had seen comes again here.
        assert ids(resumed) == sorted(
            [f"b-{i}" for i in range(3)] + ([] if old == end else ["a-4", "a-5"])
        )
    # The NDJSON stream is refused the same way, before its first byte.
    rewound(client, world.reader, end, accept="application/x-ndjson")
    # The resume cursor is of the new epoch: followed again, it is simply served.
    fresh = page(client, world.reader, cursor=rewound(client, world.reader, end)["resume_cursor"])
    assert page(client, world.reader, cursor=fresh["next_cursor"])["events"] == []


def test_a_cursor_past_the_log_end_in_the_same_epoch_is_refused(
    client: TestClient, world: World, services: Services
) -> None:
    """A point-in-time recovery before `tally epoch renew` keeps the epoch but rewinds the
    offsets: a cursor beyond a partition's head is refused, resuming at the head."""
    post_events(client, world.writer, {"events": [event(f"a-{i}") for i in range(3)]})
    partitions = services.store.partitions
    heads = [0] * partitions
    acme = partition_of("acme", partitions)
    heads[acme] = 3
    ahead = list(heads)
    ahead[acme] = 7  # the reader had read four entries the restored log no longer holds
    epoch = services.store.log_epochs()[-1].id
    codec = CursorCodec(services.store.secret("cursor"))
    digest = ExportFilter(tenants=None).digest()
    assert page(client, world.reader, cursor=codec.encode(heads, 0, digest, epoch))["events"] == []

    problem = rewound(client, world.reader, codec.encode(ahead, 0, digest, epoch))

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
    post_events(client, world.writer, {"events": [event(f"a-{i}") for i in range(5)]})
    partitions = services.store.partitions
    positions = [0] * partitions
    positions[partition_of("acme", partitions)] = 2
    secret, digest = services.store.secret("cursor"), ExportFilter().digest()
    legacy = [make(secret, positions, 0, digest) for make in (v1_cursor, v2_cursor)]
    for cursor in legacy:
        assert ids(page(client, world.reader, cursor=cursor)["events"]) == ["a-2", "a-3", "a-4"]

    renew(services)

    for cursor in legacy:
        problem = rewound(client, world.reader, cursor)
        resumed, _, _ = follow(client, world.reader, cursor=problem["resume_cursor"])
        assert ids(resumed) == ["a-2", "a-3", "a-4"]


def test_the_sdk_raises_log_rewound_with_the_resume_cursor(
    client: TestClient, world: World, services: Services
) -> None:
    post_events(client, world.writer, {"events": [event(f"a-{i}") for i in range(3)]})
    _, end, _ = follow(client, world.reader)
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
