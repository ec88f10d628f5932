"""`tally serve` and its keyring, as a new user meets them: the embedded default makes one and
says so; a store whose keyring is missing or wrong does not start, and says what to set."""

from __future__ import annotations

import os
import stat
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.server import TALLY, running_server


def serve_once(workdir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A `tally serve` that is expected to stop at start-up."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")} | env
    return subprocess.run(
        [str(TALLY), "serve", "--port", "1"],
        env=environment,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_first_start_makes_an_owner_only_keyring_and_a_later_one_reuses_it(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'tally.db'}"
    keyring = tmp_path / "tally.db.keyring"
    with running_server(url, tmp_path, label="first") as server:
        printed = " ".join(server.stdout.read_text().split())
        assert f"Created keyring {keyring}" in printed
        assert stat.S_IMODE(keyring.stat().st_mode) == 0o600
        with server.client() as client:
            admin = {"Authorization": f"Bearer {server.admin_key}"}
            assert client.post("/v1/tenants", json={"id": "acme"}, headers=admin).is_success
            assert client.post("/v1/applications", json={"id": "vm"}, headers=admin).is_success
            writer = client.post(
                "/v1/keys", json={"scopes": ["events:write"], "application": "vm"}, headers=admin
            ).json()["key"]
            sent = {
                "id": "e1",
                "tenant": "acme",
                "type": "api.calls",
                "quantity": 1,
                "time": datetime.now(UTC).isoformat(),
                "attributes": {"endpoint": "/very/secret/path"},
            }
            response = client.post(
                "/v1/events", json=sent, headers={"Authorization": f"Bearer {writer}"}
            )
            assert response.json()["status"] == "accepted"
    first = keyring.read_text()
    with running_server(url, tmp_path, label="second") as server:
        assert "Created keyring" not in server.stdout.read_text()
    assert keyring.read_text() == first

    keyring.rename(tmp_path / "elsewhere.keyring")
    missing = serve_once(tmp_path, TALLY_DATABASE_URL=url)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "is missing" in " ".join(missing.stderr.split())
    assert not keyring.exists()  # no new, wrong keyring made in its place

    other = tmp_path / "other.keyring"
    subprocess.run([str(TALLY), "keyring", "generate", "--out", str(other)], check=True)
    wrong = serve_once(tmp_path, TALLY_DATABASE_URL=url, TALLY_KEYRING=str(other))
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert "set TALLY_KEYRING" in " ".join(wrong.stderr.split())


def test_postgres_without_a_keyring_says_what_to_set(postgres_url: str, tmp_path: Path) -> None:
    result = serve_once(tmp_path, TALLY_DATABASE_URL=postgres_url)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "TALLY_KEYRING is not set" in " ".join(result.stderr.split())


def test_the_database_and_its_wal_and_keyring_are_owner_only(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tally.db'}"
    # A permissive umask, as on most hosts, which SQLite would otherwise apply (0644).
    previous = os.umask(0o022)
    try:
        with running_server(url, tmp_path) as server, server.client() as client:
            admin = {"Authorization": f"Bearer {server.admin_key}"}
            assert client.post("/v1/tenants", json={"id": "acme"}, headers=admin).is_success
            made = sorted(path.name for path in tmp_path.glob("tally.db*"))
            assert made[:5] == [
                "tally.db",
                "tally.db-shm",
                "tally.db-wal",
                "tally.db-writer",  # the writers' turns (store/sqlite.py, WriterLock)
                "tally.db.keyring",
            ]
            modes = {
                path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.glob("tally.db*")
            }
    finally:
        os.umask(previous)
    assert modes == dict.fromkeys(modes, 0o600), modes


def test_the_checkout_ignores_the_database_its_keyring_and_the_admin_key_file() -> None:
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / ".git").exists():
        pytest.skip("not a git checkout")
    names = [
        "tally.db",
        "tally.db-wal",
        "tally.db-shm",
        "tally.db-writer",
        "tally.db.keyring",
        "tally-admin-key-0123abcd",
    ]
    found = subprocess.run(
        ["git", "check-ignore", "--no-index", *names],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.stdout.split() == names, found.stderr
