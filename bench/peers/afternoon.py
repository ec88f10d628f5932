"""The afternoon peer: what a team writes in an afternoon to take usage events.

FastAPI + a pydantic v2 model of the event + psycopg 3 with a small connection pool; one
`INSERT ... ON CONFLICT DO NOTHING` (multi-row for a batch `{"events": [...]}`) and one commit
per request. No auth, no encryption, no rate limits, no group commit, no export log.

    PEER_DATABASE_URL=postgresql://... uvicorn bench.peers.afternoon:app \
        --loop uvloop --http httptools --workers N

The table (`TABLE`, made by `create_table`) has a unique (application, id). The answers have
Tally's shape (`{"id", "status"}` for one event, counts for a batch), so the same wrk script
drives both. The pool is a queue of connections: psycopg_pool is not among the project's
dependencies, and this is all an afternoon's pool does.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from fastapi import FastAPI
from psycopg.types.json import Jsonb
from pydantic import BaseModel, Field

TABLE = "peer_events"
POOL_SIZE = 10
APPLICATION = "peer-app"


class Event(BaseModel):
    id: str = Field(min_length=1, max_length=128)
    tenant: str = Field(min_length=1, max_length=64)
    type: str = Field(min_length=1, max_length=128)
    quantity: Decimal = Field(ge=0)
    time: datetime
    subject: str | None = None
    unit: str | None = None
    attributes: dict[str, str | int | float | bool] = Field(default_factory=dict)


class Batch(BaseModel):
    events: list[Event] = Field(min_length=1, max_length=1000)


def create_table(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} ("
            "application text NOT NULL, id text NOT NULL, tenant text NOT NULL, "
            "type text NOT NULL, quantity numeric NOT NULL, time timestamptz NOT NULL, "
            "subject text, unit text, attributes jsonb NOT NULL, "
            "received_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (application, id))"
        )


class Pool:
    def __init__(self, url: str, size: int) -> None:
        self._url = url
        self._idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()
        for _ in range(size):
            self._idle.put(psycopg.connect(url))

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        connection = self._idle.get()
        try:
            if connection.closed:
                connection = psycopg.connect(self._url)
            yield connection
        finally:
            self._idle.put(connection)


app = FastAPI(title="afternoon peer")
_pool: Pool | None = None
_pool_lock = threading.Lock()


def pool() -> Pool:
    global _pool  # noqa: PLW0603 - one pool per worker process, made on first use
    with _pool_lock:
        if _pool is None:
            _pool = Pool(os.environ["PEER_DATABASE_URL"], POOL_SIZE)
        return _pool


def insert(events: list[Event]) -> int:
    """Insert `events` in one statement and commit; the number actually inserted."""
    values = ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s, %s)"] * len(events))
    params: list[Any] = []
    for e in events:
        params += [
            APPLICATION,
            e.id,
            e.tenant,
            e.type,
            e.quantity,
            e.time,
            e.subject,
            e.unit,
            Jsonb(e.attributes),
        ]
    with pool().connection() as connection:
        try:
            cursor = connection.execute(
                f"INSERT INTO {TABLE} (application, id, tenant, type, quantity, time, subject, "
                f"unit, attributes) VALUES {values} ON CONFLICT (application, id) DO NOTHING",
                params,
            )
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
        return cursor.rowcount


@app.post("/v1/events")
def ingest(body: Batch | Event) -> dict[str, Any]:
    if isinstance(body, Event):
        inserted = insert([body])
        return {"id": body.id, "status": "accepted" if inserted else "duplicate"}
    inserted = insert(body.events)
    duplicates = len(body.events) - inserted
    return {"accepted": inserted, "duplicates": duplicates, "rejected": 0}
