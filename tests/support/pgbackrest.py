"""Physical backups with point-in-time recovery of a throwaway cluster (tests/support/
pgcluster.py), by pgBackRest: the cycle docs/operations.md tells an operator to run.

Everything pgBackRest keeps is in the cluster's own temporary folder: its configuration file
(given to every command with --config, so neither /etc/pgbackrest.conf nor, with --config
alone, an include folder is read), the repository, its lock and log folders. The server
archives each WAL segment with `pgbackrest archive-push`; a recovery target is a named
restore point (pg_create_restore_point), which recovery reaches exactly, where a time target
would depend on clocks and commit timestamps.

No pytest here, like server.py. Every pgBackRest command is bounded in time and runs in a
process group of its own that is killed on timeout; the cluster's own clean-up stops the server
(restored or not), and with it the only process that calls pgBackRest behind our back.
"""

from __future__ import annotations

import json
import secrets
import shlex
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from tests.support.pgcluster import Cluster

STANZA = "tally"
STEP_TIMEOUT = 60.0  # any one pgBackRest command on a cluster of a few MiB: seconds in fact
PROMOTE_TIMEOUT = 60.0

# [global] holds what every stanza shares, [tally] the cluster. The repository is encrypted,
# as docs/operations.md advises (so the file is the server user's only). start-fast: a
# backup asks for an immediate checkpoint instead of waiting for the next one;
# archive-timeout: how long a backup (or `check`) waits for its WAL to reach the archive.
_CONFIG = """\
[global]
repo1-path={repo}
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass={cipher_pass}
repo1-retention-full=2
repo1-retention-diff=6
compress-type=lz4
process-max=1
start-fast=y
archive-timeout=30
lock-path={lock}
log-path={log}
log-level-console=warn
log-level-file=detail

[{stanza}]
pg1-path={datadir}
pg1-port={port}
pg1-socket-path={socket_dir}
"""


@dataclass
class Repository:
    """A pgBackRest repository and stanza for `cluster`."""

    cluster: Cluster
    folder: Path
    stanza: str = STANZA
    program: str = "pgbackrest"

    @property
    def config(self) -> Path:
        return self.folder / "pgbackrest.conf"

    def command(self, *args: str) -> list[str]:
        return [self.program, f"--config={self.config}", f"--stanza={self.stanza}", *args]

    @property
    def archive_command(self) -> str:
        return shlex.join(self.command("archive-push", "%p"))

    def run(self, *args: str, timeout: float = STEP_TIMEOUT) -> str:
        """pgBackRest's output; RuntimeError with it and pgBackRest's log when it fails."""
        try:
            return self.cluster.run(*self.command(*args), timeout=timeout)
        except RuntimeError as error:
            raise RuntimeError(f"{error}\n{self.logs()}") from None

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name} ---\n{log.read_text(errors='replace')[-4000:]}"
            for log in sorted((self.folder / "log").glob("*.log"))
        )

    def _execute(self, statement: str, *params: object) -> Any:
        with psycopg.connect(self.cluster.url, autocommit=True, connect_timeout=5) as connection:
            row = connection.execute(statement, params).fetchone()
            return row[0] if row else None

    def backup(self, kind: str = "full") -> dict[str, Any]:
        """Take a `kind` (full, diff, incr) backup while the cluster runs; pgBackRest waits
        until the WAL that makes it consistent is archived. Returns its entry in `info`."""
        self.run("backup", f"--type={kind}")
        return self.backups()[-1]

    def backups(self) -> list[dict[str, Any]]:
        """The stanza's backups, oldest first, as `pgbackrest info --output=json` has them."""
        (stanza,) = json.loads(self.run("info", "--output=json"))
        backups: list[dict[str, Any]] = stanza["backup"]
        return backups

    def mark(self, name: str) -> str:
        """A named restore point in the WAL (a recovery target); its LSN."""
        lsn: str = self._execute("SELECT pg_create_restore_point(%s)::text", name)
        return lsn

    def archive_current_wal(self) -> None:
        """Close the current WAL segment and wait until it is in the repository: what was
        committed until now (a restore point, and what followed) can then be replayed.
        `pgbackrest check` does both, within archive-timeout."""
        self.run("check")

    def restore(self, point: str) -> Path:
        """Restore the newest backup into a fresh data directory in place of the stopped
        cluster's, replay the archived WAL up to the restore point `point` and no further,
        start the cluster and wait until recovery has ended and it is promoted (on a new
        timeline, read-write). Returns where the old data directory was moved.

        Raises RuntimeError when the cluster still runs, or recovery does not end at `point`.
        """
        datadir = self.cluster.datadir
        if (datadir / "postmaster.pid").exists():
            raise RuntimeError(f"the cluster in {datadir} is running: stop it first")
        # Kept, as an operator keeps the damaged copy until the restored one is proved.
        moved = datadir.with_name(f"{datadir.name}.before-restore-{time.monotonic_ns()}")
        datadir.rename(moved)
        self.cluster.make_folder(datadir)
        self.run("restore", "--type=name", f"--target={point}", "--target-action=promote")
        self.cluster.start()
        self._wait_promoted(point)
        return moved

    def _wait_promoted(self, point: str) -> None:
        deadline = time.monotonic() + PROMOTE_TIMEOUT
        while True:
            try:
                if self._execute("SELECT pg_is_in_recovery()") is False:
                    break
            except psycopg.OperationalError:
                pass  # a recovery that fails shuts the server down: the log says why
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"recovery did not end within {PROMOTE_TIMEOUT:.0f}s:\n"
                    f"{self.cluster.server_log()[-4000:]}"
                )
            time.sleep(0.1)
        stopped_at = f'recovery stopping at restore point "{point}"'
        if stopped_at not in self.cluster.server_log():
            raise RuntimeError(
                f"recovery ended without {stopped_at!r}:\n{self.cluster.server_log()[-4000:]}"
            )


@contextmanager
def repository(cluster: Cluster, *, stanza: str = STANZA) -> Iterator[Repository]:
    """A stanza for the running `cluster`, which now archives its WAL into it (it is
    restarted for archive_mode). Raises FileNotFoundError when pgBackRest is not installed.
    """
    program = shutil.which("pgbackrest")
    if program is None:
        raise FileNotFoundError("pgbackrest")
    folder = cluster.make_folder(cluster.folder / "pgbackrest")
    made = Repository(cluster, folder, stanza, program)
    made.config.touch(mode=0o600)
    cluster.own(made.config)
    made.config.write_text(
        _CONFIG.format(
            repo=cluster.make_folder(folder / "repo"),
            lock=cluster.make_folder(folder / "lock"),
            log=cluster.make_folder(folder / "log"),
            cipher_pass=secrets.token_urlsafe(32),
            stanza=stanza,
            datadir=cluster.datadir,
            socket_dir=cluster.socket_dir,
            port=cluster.port,
        )
    )
    with psycopg.connect(cluster.url, autocommit=True, connect_timeout=5) as connection:
        connection.execute("ALTER SYSTEM SET archive_mode = on")
        # ALTER SYSTEM takes no bound parameters: a literal, quoted by psycopg.
        connection.execute(
            sql.SQL("ALTER SYSTEM SET archive_command = {}").format(
                sql.Literal(made.archive_command)
            )
        )
    cluster.restart()
    made.run("stanza-create")
    made.run("check")  # archiving works: a segment switched now reaches the repository
    yield made
