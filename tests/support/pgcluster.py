"""A throwaway PostgreSQL cluster for tests that crash or restart the database, or need it
configured in a way the shared server is not (TLS).

initdb into a fresh folder and a port of its own, so the machine's shared server is never
touched. As root, the server's programs run as the `postgres` user (PostgreSQL refuses root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def _bindir() -> Path:
    found = subprocess.run(
        ["pg_config", "--bindir"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return Path(found)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Cluster:
    datadir: Path
    port: int
    bindir: Path
    as_user: list[str]
    settings: tuple[str, ...] = ()  # extra `-c name=value` server settings

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1"
        options += "".join(f" -c {setting}" for setting in self.settings)
        self._pg_ctl("-o", options, "-l", str(self.datadir / "server.log"), "-w", "start")

    def crash(self) -> None:
        """Stop at once, without a checkpoint: what is not in the WAL is lost."""
        self._pg_ctl("-m", "immediate", "-w", "stop")


@contextmanager
def throwaway_cluster(*, tls: tuple[bytes, bytes] | None = None) -> Iterator[Cluster]:
    """A started cluster, stopped and deleted on exit. With `tls` (a PEM certificate chain
    and its private key) it also accepts TLS connections (`ssl=on`) with that certificate.
    """
    bindir = _bindir()
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="tally-pg-"))
    datadir = folder / "data"
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(datadir), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    settings: tuple[str, ...] = ()
    if tls is not None:
        cert, key = datadir / "server.crt", datadir / "server.key"
        cert.write_bytes(tls[0])
        key.write_bytes(tls[1])
        key.chmod(0o600)  # PostgreSQL refuses a key that others can read
        if as_user:
            for path in (cert, key):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        settings = ("ssl=on", f"ssl_cert_file={cert}", f"ssl_key_file={key}")
    cluster = Cluster(
        datadir=datadir, port=_free_port(), bindir=bindir, as_user=as_user, settings=settings
    )
    cluster.start()
    try:
        yield cluster
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(folder, ignore_errors=True)
