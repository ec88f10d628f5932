"""`/readyz` of a real `tally serve` checks what requests need (api/health.py): Redis down
leaves it ready but degraded (limits fall back to each process), a keyring that no longer
opens the store's data keys makes it 503, and neither answer names a URL or a file."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx

from tally.crypto import keyring as keyrings
from tests.conftest import event
from tests.e2e.test_ratelimit import register
from tests.ratelimit.redis_support import throwaway_redis
from tests.support.server import Server, running_server

# KeyringSource looks at its file at most once a second.
KEYRING_RELOAD = 1.5


def readiness(server: Server) -> httpx.Response:
    answer = httpx.get(f"{server.base_url}/readyz", timeout=10)
    assert "redis://" not in answer.text and "127.0.0.1" not in answer.text
    assert str(server.stdout.parent) not in answer.text  # no keyring or database path
    return answer


def test_readyz_stays_ready_but_degraded_while_redis_is_down(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tally.db'}"
    with throwaway_redis(tmp_path) as redis_server:
        env = {"TALLY_REDIS_URL": redis_server.url, "TALLY_REDIS_TIMEOUT_MS": "200"}
        with running_server(url, tmp_path, env=env) as server:
            up = readiness(server)
            assert up.status_code == 200, up.text
            assert up.json() == {
                "status": "ready",
                "checks": {"store": "ok", "keyring": "ok", "redis": "ok"},
            }

            redis_server.kill()
            down = readiness(server)
            assert down.status_code == 200, down.text
            assert down.json() == {
                "status": "degraded",
                "checks": {"store": "ok", "keyring": "ok", "redis": "unreachable"},
            }

            redis_server.start()  # the same port
            assert readiness(server).json()["status"] == "ready"


def test_readyz_is_503_while_the_keyring_does_not_open_the_data_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tally.db'}"
    with running_server(url, tmp_path) as server:
        keys = register(server)
        stored = httpx.post(
            f"{server.base_url}/v1/events",
            json=event("sealed", attributes={"sku": "m1"}),
            headers={"Authorization": f"Bearer {keys.writer}"},
            timeout=10,
        )
        assert stored.status_code == 200, stored.text  # acme has a data key now
        assert readiness(server).json()["checks"]["keyring"] == "ok"

        keyring = tmp_path / "tally.db.keyring"
        kept = tmp_path / "kept.keyring"
        shutil.copy2(keyring, kept)
        keyring.unlink()
        keyrings.generate(keyring)  # someone put another keyring in its place
        time.sleep(KEYRING_RELOAD)
        wrong = readiness(server)
        assert wrong.status_code == 503, wrong.text
        assert wrong.headers["retry-after"]
        problem = wrong.json()
        assert problem["code"] == "ERR-SYS-503"
        assert "keyring" in problem["detail"]
        assert "tally.db.keyring" not in wrong.text

        shutil.copy2(kept, keyring)
        time.sleep(KEYRING_RELOAD)
        assert readiness(server).status_code == 200
    logs = server.stderr.read_text(errors="replace")
    assert '"readiness_keyring_failed"' in logs
