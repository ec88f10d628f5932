"""The servers under test as processes on 127.0.0.1: Tally (`tally serve`, through
tests/support/server.py as the end-to-end tests run it), the afternoon peer and the bare ASGI
app (uvicorn), and the throwaway PostgreSQL databases they use."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.support.server import (  # noqa: E402 - after the repository is on the path
    Server,
    free_port,
    running_server,
    stop,
)

PG_ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
HTTP_TIMEOUT = 60.0
APPLICATION = "bench-app"
# Rate limits stay on (every request and event is checked), at the highest rate the settings
# take (ratelimit/interface.py MAX_RATE), far above what this machine can offer, so they
# measure their cost without refusing the load.
RATE_LIMIT = "1000000"
TALLY_ENV = {
    "TALLY_RATE_KEY_REQUESTS_PER_SECOND": RATE_LIMIT,
    "TALLY_RATE_KEY_EVENTS_PER_SECOND": RATE_LIMIT,
    "TALLY_RATE_TENANT_REQUESTS_PER_SECOND": RATE_LIMIT,
    "TALLY_RATE_TENANT_EVENTS_PER_SECOND": RATE_LIMIT,
    "TALLY_LOG_LEVEL": "warning",
}


def database_url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


@contextmanager
def throwaway_database(kind: str) -> Iterator[str]:
    """A new empty database bench_<kind>_<pid>_<random>, dropped on exit whatever happened."""
    name = f"bench_{kind}_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield database_url(name)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class Keys:
    write: str
    read: str
    usage: str
    admin: str = ""


@contextmanager
def tally(
    database: str, workdir: Path, label: str, workers: int, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """`tally serve --workers N --json` over `database` with the bench's settings."""
    with running_server(
        database,
        workdir,
        "--json",
        "--workers",
        str(workers),
        env=TALLY_ENV | (env or {}),
        label=label,
    ) as server:
        yield server


def register(server: Server, tenants: int) -> Keys:
    """Through the API with the first admin key: tenants t00000.., the application, keys."""
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    with server.client(headers=headers, timeout=HTTP_TIMEOUT) as client:
        for n in range(tenants):
            client.post("/v1/tenants", json={"id": f"t{n:05d}"}).raise_for_status()
        client.post("/v1/applications", json={"id": APPLICATION}).raise_for_status()

        def key(scopes: list[str], **more: str) -> str:
            issued = client.post("/v1/keys", json={"scopes": scopes, **more})
            issued.raise_for_status()
            return str(issued.json()["key"])

        return Keys(
            write=key(["events:write"], application=APPLICATION),
            read=key(["events:read"]),
            usage=key(["usage:read"]),
            admin=server.admin_key,
        )


def issue_keys(database: str, keyring: Path) -> Keys:
    """Keys for a store made without the API (the big store), issued in-process by Tally's
    registry as `tally keys create` would."""
    from bench.bigstore import services_of  # noqa: PLC0415 - bigstore imports this module
    from tally.auth.service import Scope  # noqa: PLC0415
    from tally.registry.models import KeyIn  # noqa: PLC0415

    services = services_of(database, keyring)
    try:

        def key(scope: Scope, application: str | None = None) -> str:
            return services.registry.create_key(KeyIn(scopes=[scope], application=application)).key

        return Keys(
            write=key(Scope.EVENTS_WRITE, APPLICATION),
            read=key(Scope.EVENTS_READ),
            usage=key(Scope.USAGE_READ),
            admin=key(Scope.ADMIN),
        )
    finally:
        services.close()


@dataclass(frozen=True)
class Peer:
    base_url: str
    process: subprocess.Popen[bytes]


@contextmanager
def uvicorn_app(
    app: str, workdir: Path, label: str, workers: int, env: dict[str, str] | None = None
) -> Iterator[Peer]:
    """`uvicorn APP --loop uvloop --http httptools --workers N` on a free port."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    out = (workdir / f"{label}.stdout").open("wb")
    err = (workdir / f"{label}.stderr").open("wb")
    process = subprocess.Popen(  # noqa: S603 - fixed argument list
        command, cwd=ROOT, env=os.environ | (env or {}), stdout=out, stderr=err
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{label} exited with {process.returncode}:\n"
                    f"{(workdir / f'{label}.stderr').read_text(errors='replace')}"
                )
            try:
                httpx.get(base_url + "/", timeout=1.0)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label} did not answer within 30 s") from None
                time.sleep(0.1)
        yield Peer(base_url, process)
    finally:
        stop(process)
        out.close()
        err.close()
