"""Request bodies with a Content-Encoding (api/encoding.py): gzip is read within the size bound,
measured after decompression and never inflated past it; any other coding is a 415."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import assert_problem, auth, export_all
from tests.conftest import World, event

LIMIT = 1024 * 1024  # the default TALLY_MAX_BODY_BYTES


def post(
    client: TestClient, key: str, body: bytes, encoding: str, path: str = "/v1/events"
) -> httpx.Response:
    response: httpx.Response = client.post(
        path,
        content=body,
        headers={**auth(key), "Content-Type": "application/json", "Content-Encoding": encoding},
    )
    return response


def batch(count: int, prefix: str = "e") -> bytes:
    return json.dumps({"events": [event(f"{prefix}-{i}") for i in range(count)]}).encode()


@pytest.mark.parametrize("encoding", ["gzip", "GZip", "x-gzip", "identity, gzip", "gzip, identity"])
def test_a_gzip_batch_is_decoded_and_stored(
    client: TestClient, world: World, encoding: str
) -> None:
    response = post(client, world.writer, gzip.compress(batch(3)), encoding)

    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 3
    assert len(export_all(client, world.reader)) == 3


def test_a_gzip_body_in_several_members_is_read_whole(client: TestClient, world: World) -> None:
    text = batch(2)
    members = gzip.compress(text[:10]) + gzip.compress(text[10:])

    assert post(client, world.writer, members, "gzip").json()["accepted"] == 2
    assert post(client, world.writer, batch(1, "plain"), "identity").json()["accepted"] == 1


def test_a_gzip_body_larger_than_the_bound_compressed_small_is_read_up_to_the_bound(
    client: TestClient, world: World
) -> None:
    text = batch(1)
    padded = text[:-1] + b" " * (LIMIT - len(text)) + b"}"  # exactly at the bound, decoded
    assert len(padded) == LIMIT
    assert post(client, world.writer, gzip.compress(padded), "gzip").json()["accepted"] == 1
    over = text[:-1] + b" " * (LIMIT + 1 - len(text)) + b"}"
    problem = assert_problem(
        post(client, world.writer, gzip.compress(over), "gzip"), 413, "ERR-VAL-400"
    )
    assert problem["type"] == "/problems/payload-too-large"
    assert len(export_all(client, world.reader)) == 1


def test_a_zip_bomb_is_a_413_without_inflating_it_in_memory(
    client: TestClient, world: World
) -> None:
    # 256 MiB of spaces, about 250 KiB compressed: within the bound on the wire.
    compressor = zlib.compressobj(9, wbits=31)
    chunk = b" " * (1024 * 1024)
    bomb = b"".join(compressor.compress(chunk) for _ in range(256)) + compressor.flush()
    assert len(bomb) < LIMIT
    tracemalloc.start()
    try:
        response = post(client, world.writer, bomb, "gzip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert_problem(response, 413, "ERR-VAL-400")
    # The bomb itself, a copy or two of it and at most the bound decoded: not 256 MiB.
    assert peak < 16 * LIMIT, peak
    assert export_all(client, world.reader) == []


@pytest.mark.parametrize(
    "body",
    [b"not gzip at all", gzip.compress(batch(2))[:-9], gzip.compress(batch(1)) + b"trailing"],
    ids=["not_gzip", "truncated", "trailing_garbage"],
)
def test_corrupt_gzip_is_a_400_storing_nothing(
    client: TestClient, world: World, body: bytes
) -> None:
    problem = assert_problem(post(client, world.writer, body, "gzip"), 400, "ERR-VAL-400")
    assert "gzip" in problem["detail"]
    assert export_all(client, world.reader) == []


@pytest.mark.parametrize("encoding", ["br", "deflate", "zstd", "gzip, gzip", "compress", "x\x01"])
def test_a_content_encoding_tally_does_not_decode_is_a_415(
    client: TestClient, world: World, encoding: str
) -> None:
    # The key is judged before the body: without one it is a 401 whatever the coding.
    assert_problem(post(client, "not-a-key", batch(1), encoding), 401, "ERR-AUTH-401")
    response = post(client, world.writer, batch(1), encoding)

    problem = assert_problem(response, 415, "ERR-VAL-400")
    assert problem["type"] == "/problems/unsupported-media-type"
    assert export_all(client, world.reader) == []


def test_admin_bodies_are_decoded_and_refused_the_same_way(
    client: TestClient, world: World
) -> None:
    tenant = json.dumps({"id": "initech", "name": "Initech"}).encode()
    created = post(client, world.admin, gzip.compress(tenant), "gzip", "/v1/tenants")
    assert created.status_code == 201, created.text
    other = json.dumps({"id": "hooli"}).encode()
    refused = post(client, world.admin, other, "br", "/v1/tenants")
    assert assert_problem(refused, 415, "ERR-VAL-400")["type"] == "/problems/unsupported-media-type"
    listed = client.get("/v1/tenants", headers=auth(world.admin)).json()
    assert "initech" in [t["id"] for t in listed]
    assert "hooli" not in [t["id"] for t in listed]
