"""`tally serve` as a process: the first admin key only on an empty store, --json, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import httpx

from tests.support.server import STOP_TIMEOUT, running_server


def test_the_admin_key_is_printed_once_and_works(database_url: str, tmp_path: Path) -> None:
    with running_server(database_url, tmp_path) as first:
        assert first.admin_key.startswith("tly_"), first.logs()
        headers = {"Authorization": f"Bearer {first.admin_key}"}
        made = httpx.post(
            f"{first.base_url}/v1/tenants", json={"id": "acme"}, headers=headers, timeout=10
        )
        assert made.status_code == 201, made.text
    assert first.admin_key not in first.stderr.read_text(errors="replace")  # logs never hold it

    # Restarted on the same store: no new key, the old one still works, data is still there.
    with running_server(database_url, tmp_path) as second:
        assert second.admin_key == "", second.logs()
        assert "tly_" not in second.stdout.read_text(errors="replace")
        listed = httpx.get(
            f"{second.base_url}/v1/tenants",
            headers={"Authorization": f"Bearer {first.admin_key}"},
            timeout=10,
        )
        assert listed.status_code == 200, listed.text
        assert [tenant["id"] for tenant in listed.json()] == ["acme"]


def test_serve_json_prints_the_admin_key_as_json(database_url: str, tmp_path: Path) -> None:
    with running_server(database_url, tmp_path, "--json") as server:
        [line] = [
            line for line in server.stdout.read_text(errors="replace").splitlines() if line.strip()
        ]
        printed = json.loads(line)
        assert printed["key"] == server.admin_key
        assert printed["scopes"] == ["admin"]
        assert printed["id"]


def test_sigterm_stops_the_server_cleanly(database_url: str, tmp_path: Path) -> None:
    with running_server(database_url, tmp_path) as server:
        assert httpx.get(f"{server.base_url}/healthz", timeout=5).status_code == 200
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        # uvicorn shuts down gracefully, then re-raises the signal it caught, so the exit
        # status is "killed by SIGTERM" (-15) after a clean shutdown, or 0.
        assert code in (0, -signal.SIGTERM), f"exit {code} after SIGTERM\n{server.logs()}"
        assert "Traceback" not in server.stderr.read_text(errors="replace")
