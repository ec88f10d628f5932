"""PostgreSQL-only: the store's connection pool retires connections past their lifetime."""

from __future__ import annotations

import time

import psycopg

from tally.store.postgres import ConnectionPool, PostgresStore, _gone


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
        # Past its span while idle: retired when next asked for, not handed out once more.
        second = _backend(pool)
        assert second != first
        assert len(pool._retire_at) == 1  # only the open connection is remembered
    finally:
        pool.close()
    assert pool._retire_at == {}


def test_an_idle_connection_whose_server_went_away_is_replaced_not_handed_out(
    postgres_url: str,
) -> None:
    pool = _pool(postgres_url, max_lifetime=600)
    try:
        first = _backend(pool)
        with psycopg.connect(postgres_url, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (first,))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until its end reaches the idle connection
            (idle,) = pool._idle
            if _gone(idle):
                break
            time.sleep(0.01)
        # Checked without a query of its own, and replaced: the caller sees no error.
        second = _backend(pool)
        assert second != first
        assert len(pool._retire_at) == 1
    finally:
        pool.close()


def test_a_live_idle_connection_is_not_gone(postgres_url: str) -> None:
    pool = _pool(postgres_url, max_lifetime=600)
    try:
        _backend(pool)
        (idle,) = pool._idle
        assert not _gone(idle)
        idle.close()
        assert _gone(idle)
    finally:
        pool.close()


def test_a_snapshot_read_is_repeatable_and_read_only_and_leaves_the_connection_as_it_was(
    postgres_url: str,
) -> None:
    store = PostgresStore(postgres_url, pool_size=1)
    try:
        for _ in range(2):
            with store._read(snapshot=True) as session:
                (row,) = session.all(
                    "SELECT current_setting('transaction_isolation') AS isolation, "
                    "current_setting('transaction_read_only') AS read_only, pg_backend_pid() AS pid"
                )
            assert (row["isolation"], row["read_only"]) == ("repeatable read", "on")
            # The same connection (the pool holds one) writes again, in its own defaults.
            with store._write() as session:
                (after,) = session.all(
                    "SELECT current_setting('transaction_isolation') AS isolation, "
                    "current_setting('transaction_read_only') AS read_only, pg_backend_pid() AS pid"
                )
            assert after == {"isolation": "read committed", "read_only": "off", "pid": row["pid"]}
    finally:
        store.close()
