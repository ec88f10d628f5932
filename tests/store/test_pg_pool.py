"""PostgreSQL-only: the store's connection pool retires connections past their lifetime."""

from __future__ import annotations

import time

from tally.store.postgres import ConnectionPool


def _backend(pool: ConnectionPool) -> int:
    with pool.connection() as connection:
        row = connection.execute("SELECT pg_backend_pid() AS pid").fetchone()
        assert row is not None
        return int(row["pid"])


def _pool(url: str, max_lifetime: float) -> ConnectionPool:
    return ConnectionPool(
        url, size=2, timeout=5, kwargs={"autocommit": True}, max_lifetime=max_lifetime
    )


def test_a_connection_is_kept_for_reuse_within_its_lifetime(postgres_url: str) -> None:
    pool = _pool(postgres_url, max_lifetime=600)
    try:
        assert len({_backend(pool) for _ in range(5)}) == 1
    finally:
        pool.close()


def test_a_connection_past_its_lifetime_is_closed_not_kept(postgres_url: str) -> None:
    pool = _pool(postgres_url, max_lifetime=0.3)
    try:
        first = _backend(pool)
        assert _backend(pool) == first  # young: reused
        time.sleep(0.4)
        # Used once more past its span, then retired as it comes back: the next is new.
        assert _backend(pool) == first
        second = _backend(pool)
        assert second != first
        assert len(pool._retire_at) == 1  # only the open connection is remembered
    finally:
        pool.close()
    assert pool._retire_at == {}
