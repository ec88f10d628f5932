"""gzip request bodies through a real `tally serve`: the body arrives in many pieces, as it does
from a socket, and is inflated piece by piece within TALLY_MAX_BODY_BYTES (after decoding)."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import event
from tests.support.server import Server, running_server

MAX_BODY = 65536


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp: Path = tmp_path_factory.mktemp("encoding")
    env = {"TALLY_MAX_BODY_BYTES": str(MAX_BODY), "TALLY_REGION": "local"}
    with running_server(f"sqlite:///{tmp / 'tally.db'}", tmp, env=env) as started:
        yield started


@pytest.fixture(scope="module")
def writer(server: Server) -> httpx.Client:
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    with server.client(headers=admin, timeout=30) as client:
        client.post("/v1/tenants", json={"id": "acme"}).raise_for_status()
        client.post("/v1/applications", json={"id": "vm"}).raise_for_status()
        issued = client.post("/v1/keys", json={"scopes": ["events:write"], "application": "vm"})
    issued.raise_for_status()
    return server.client(headers={"Authorization": f"Bearer {issued.json()['key']}"}, timeout=30)


def pieces(data: bytes, size: int = 97) -> Iterator[bytes]:
    """`data` in small pieces: httpx sends them chunked, the server receives many messages."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def post_gzip(client: httpx.Client, compressed: bytes, encoding: str = "gzip") -> httpx.Response:
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    return client.post("/v1/events", content=pieces(compressed), headers=headers)


def test_a_gzip_batch_sent_in_pieces_is_stored(writer: httpx.Client) -> None:
    batch = json.dumps({"events": [event(f"gz-{i}") for i in range(500)]}).encode()
    assert MAX_BODY // 2 < len(batch) < MAX_BODY  # over half the bound, inflated piece by piece

    response = post_gzip(writer, gzip.compress(batch))

    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 500


def test_a_zip_bomb_sent_in_pieces_is_a_413_and_the_server_carries_on(
    server: Server, writer: httpx.Client
) -> None:
    compressor = zlib.compressobj(9, wbits=31)
    bomb = compressor.compress(b" " * (64 * 1024 * 1024)) + compressor.flush()
    assert len(bomb) < MAX_BODY

    response = post_gzip(writer, bomb)

    assert response.status_code == 413, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"] == "/problems/payload-too-large"
    with server.client() as probe:
        assert probe.get("/healthz").status_code == 200


def test_another_coding_is_a_415(writer: httpx.Client) -> None:
    response = post_gzip(writer, json.dumps(event("br-1")).encode(), encoding="br")

    assert response.status_code == 415, response.text
    assert response.json()["type"] == "/problems/unsupported-media-type"
