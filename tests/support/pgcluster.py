"""A throwaway PostgreSQL cluster for tests that crash or restart the database, or need it
configured in a way the shared server is not (TLS).

initdb into a fresh folder and a port of its own, so the machine's shared server is never
touched. As root, the server's programs run as the `postgres` user (PostgreSQL refuses root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
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

    @property
    def folder(self) -> Path:
        """The cluster's temporary folder (its data directory is in it), owned by the user
        the server runs as and deleted with the cluster: room for the tools' files."""
        return self.datadir.parent

    @property
    def socket_dir(self) -> Path:
        """Where the server's Unix socket and its lock file are: beside the data directory,
        not in it, so that a copy of the data directory (a physical backup) holds no lock
        file of a server that ran there."""
        return self.folder / "run"

    def run(self, *command: str, timeout: float = 60.0) -> str:
        """`command`'s output, run as the server's user in a session of its own, so that on
        timeout its whole process group is killed (runuser does not pass SIGKILL on to its
        child). Raises RuntimeError with the output when it fails or times out."""
        process = subprocess.Popen(
            [*self.as_user, *command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            raise RuntimeError(
                f"{' '.join(command)} did not finish within {timeout:.0f}s:\n"
                f"{output.decode(errors='replace')}"
            ) from None
        if process.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited with {process.returncode}:\n"
                f"{output.decode(errors='replace')}"
            )
        return output.decode(errors="replace")

    def make_folder(self, path: Path) -> Path:
        """A new folder for the server or its tools: owned by the server's user, mode 0700
        (what PostgreSQL demands of a data directory)."""
        path.mkdir(mode=0o700, parents=True)
        return self.own(path)

    def own(self, path: Path) -> Path:
        """`path`, given to the server's user (when we are root and it is another)."""
        if self.as_user:
            owner = pwd.getpwnam("postgres")
            os.chown(path, owner.pw_uid, owner.pw_gid)
        return path

    def _pg_ctl(self, *args: str) -> None:
        self.run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1"
        options += "".join(f" -c {setting}" for setting in self.settings)
        try:
            self._pg_ctl("-o", options, "-l", str(self.datadir / "server.log"), "-w", "start")
        except RuntimeError as error:
            raise RuntimeError(f"{error}\n{self.server_log()[-4000:]}") from None

    def crash(self) -> None:
        """Stop at once, without a checkpoint: what is not in the WAL is lost."""
        self._pg_ctl("-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        """A clean (fast) shutdown: sessions ended, a shutdown checkpoint written."""
        self._pg_ctl("-m", "fast", "-w", "stop")

    def restart(self) -> None:
        """Stop cleanly and start again, for settings that only take effect at start-up."""
        self.stop()
        self.start()

    def server_log(self) -> str:
        log = self.datadir / "server.log"
        return log.read_text(errors="replace") if log.exists() else ""


@contextmanager
def throwaway_cluster(*, tls: tuple[bytes, bytes] | None = None) -> Iterator[Cluster]:
    """A started cluster, stopped and deleted on exit. With `tls` (a PEM certificate chain
    and its private key) it also accepts TLS connections (`ssl=on`) with that certificate.
    """
    bindir = _bindir()
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="tally-pg-"))
    datadir = folder / "data"
    try:
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
        cluster.make_folder(cluster.socket_dir)
        cluster.start()
        yield cluster
    finally:
        # Also when initdb or the start failed: nothing of the folder stays behind.
        with suppress(OSError):  # a program missing (initdb's error is the one to see)
            subprocess.run(
                [*as_user, str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"],
                check=False,
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(folder, ignore_errors=True)
