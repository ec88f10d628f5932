"""`tally serve` as a process: the first admin key only on an empty store (on the terminal, or
in an owner-only file), a first start that cannot succeed writing nothing, --json, SIGTERM."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tally.crypto import keyring as keyrings
from tests.conftest import new_database
from tests.e2e.test_keyring_serve import serve_once
from tests.support.server import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    TALLY,
    admin_key_file,
    first_admin_key,
    free_port,
    running_server,
    stop,
)


def test_the_first_admin_key_is_left_in_an_owner_only_file_once(
    database_url: str, tmp_path: Path
) -> None:
    with running_server(database_url, tmp_path) as first:
        assert first.admin_key.startswith("tly_"), first.logs()
        printed = first.stdout.read_text(errors="replace")
        assert "tly_" not in printed  # a captured stdout usually ends in a log: no key there
        key_file = admin_key_file(printed)
        assert key_file is not None and key_file.parent == tmp_path
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        headers = {"Authorization": f"Bearer {first.admin_key}"}
        made = httpx.post(
            f"{first.base_url}/v1/tenants", json={"id": "acme"}, headers=headers, timeout=10
        )
        assert made.status_code == 201, made.text
    assert first.admin_key not in first.stderr.read_text(errors="replace")  # logs never hold it

    # Restarted on the same store: no new key, the old one still works, data is still there.
    with running_server(database_url, tmp_path) as second:
        assert second.admin_key == "", second.logs()
        assert admin_key_file(second.stdout.read_text(errors="replace")) is None
        listed = httpx.get(
            f"{second.base_url}/v1/tenants",
            headers={"Authorization": f"Bearer {first.admin_key}"},
            timeout=10,
        )
        assert listed.status_code == 200, listed.text
        assert [tenant["id"] for tenant in listed.json()] == ["acme"]
    assert list(tmp_path.glob("tally-admin-key-*")) == [key_file]


def test_serve_json_names_the_admin_key_file_in_json(database_url: str, tmp_path: Path) -> None:
    with running_server(database_url, tmp_path, "--json") as server:
        [line] = [
            line for line in server.stdout.read_text(errors="replace").splitlines() if line.strip()
        ]
        printed = json.loads(line)
        assert "key" not in printed
        assert Path(printed["key_file"]).read_text() == f"{server.admin_key}\n"
        assert printed["scopes"] == ["admin"]
        assert printed["id"]


def test_on_a_terminal_the_first_admin_key_is_printed_and_no_file_made(tmp_path: Path) -> None:
    controller, terminal = pty.openpty()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    environment["TALLY_DATABASE_URL"] = f"sqlite:///{tmp_path / 'tally.db'}"
    port = free_port()
    process = subprocess.Popen(
        [str(TALLY), "serve", "--port", str(port)],
        env=environment,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=subprocess.DEVNULL,
    )
    os.close(terminal)
    shown = b""
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while b"tly_" not in shown or not shown.rstrip().endswith(b"keys create'."):
            assert time.monotonic() < deadline, shown
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                shown += os.read(controller, 4096)
    finally:
        stop(process)
        os.close(controller)
    assert first_admin_key(shown.decode(errors="replace"))
    assert list(tmp_path.glob("tally-admin-key-*")) == []


@pytest.fixture
def fresh_postgres() -> Iterator[str]:
    """A new, empty PostgreSQL database of this test's own: no schema, no keys."""
    with new_database("tally_fresh") as url:
        yield url


def tables_of(url: str) -> list[str]:
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    return [row[0] for row in rows]


def test_a_first_postgres_start_that_cannot_succeed_writes_nothing(
    fresh_postgres: str, tmp_path: Path
) -> None:
    refused = serve_once(tmp_path, TALLY_DATABASE_URL=fresh_postgres)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "TALLY_KEYRING is not set" in " ".join(refused.stderr.split())
    assert tables_of(fresh_postgres) == []  # not migrated, so no key issued that nobody has

    keyring = tmp_path / "tally.keyring"
    keyrings.generate(keyring)
    bad_tls = serve_once(
        tmp_path,
        TALLY_DATABASE_URL=fresh_postgres,
        TALLY_KEYRING=str(keyring),
        TALLY_TLS_CERT=str(tmp_path / "missing.pem"),
        TALLY_TLS_KEY=str(tmp_path / "missing.key"),
    )
    assert bad_tls.returncode != 0 and "Traceback" not in bad_tls.stderr
    assert tables_of(fresh_postgres) == []
    assert list(tmp_path.glob("tally-admin-key-*")) == []

    # The next start, with a keyring, issues the first admin key and hands it over.
    with running_server(fresh_postgres, tmp_path, env={"TALLY_KEYRING": str(keyring)}) as server:
        assert server.admin_key.startswith("tly_"), server.logs()
        listed = httpx.get(
            f"{server.base_url}/v1/keys",
            headers={"Authorization": f"Bearer {server.admin_key}"},
            timeout=10,
        )
        assert listed.status_code == 200, listed.text


def test_sigterm_stops_the_server_cleanly(database_url: str, tmp_path: Path) -> None:
    with running_server(database_url, tmp_path) as server:
        assert httpx.get(f"{server.base_url}/healthz", timeout=5).status_code == 200
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        # A clean drain exits 0 (api/drain.py), not by the signal uvicorn would re-raise.
        assert code == 0, f"exit {code} after SIGTERM\n{server.logs()}"
        assert "Traceback" not in server.stderr.read_text(errors="replace")
