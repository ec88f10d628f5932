"""A throwaway pg_auto_failover formation: a monitor, a primary and a secondary with
synchronous replication, from the machine's `pg_autoctl` and PostgreSQL binaries, each in a
temporary folder on a port of its own (the shared server is never touched).

Every node runs `pg_autoctl … --run` in its own process group, as the `postgres` user when we
are root (PostgreSQL refuses root), so a test can SIGKILL a node's keeper and its postmaster
and let the monitor promote the other one. The monitor's health checks are tuned down from
their defaults (a failover in ~20-30 s) so that one takes a few seconds.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.support.pgcluster import _bindir, _free_port

PG_AUTOCTL = shutil.which("pg_autoctl") or "/usr/bin/pg_autoctl"
DATABASE = "tally"
STEP_TIMEOUT = 60.0

# The monitor's failure detection (GUCs of its pgautofailover extension, milliseconds),
# from ~20-30 s to a few seconds: check each node every 500 ms, give up after one retry,
# and call a node unhealthy 2 s after its keeper last reported.
MONITOR_SETTINGS: Mapping[str, str] = {
    "pgautofailover.health_check_period": "500",
    "pgautofailover.health_check_timeout": "500",
    "pgautofailover.health_check_max_retries": "1",
    "pgautofailover.health_check_retry_delay": "200",
    "pgautofailover.node_considered_unhealthy_timeout": "2000",
    "pgautofailover.startup_grace_period": "1000",
    # After a promotion, how long the monitor waits for the old primary to demote itself
    # before it lets the new one take writes: above the keepers' network_partition_timeout
    # (KEEPER_SETTINGS), after which an isolated primary demotes itself.
    "pgautofailover.primary_demote_timeout": "4000",
}

# Each keeper's own timeouts (seconds; `pg_autoctl config set`), from 20 s.
KEEPER_SETTINGS: Mapping[str, str] = {
    "timeout.network_partition_timeout": "2",
}


@dataclass
class Node:
    name: str
    pgdata: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid, from the first line of postmaster.pid, if that process is
        running and is this node's postgres (a stale file's pid may be another's by now)."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ValueError):
            return None
        return pid if str(self.pgdata).encode() in command else None


@dataclass
class Formation:
    folder: Path
    as_user: list[str]
    monitor: Node
    nodes: list[Node] = field(default_factory=list)

    @property
    def monitor_url(self) -> str:
        return f"postgresql://autoctl_node@127.0.0.1:{self.monitor.port}/pg_auto_failover"

    @property
    def url(self) -> str:
        """The multi-host URL a client of the formation uses: it finds the primary."""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"postgresql://postgres@{hosts}/{DATABASE}?target_session_attrs=read-write"

    def _env(self) -> dict[str, str]:
        bindir = str(_bindir())
        return {
            "PATH": f"{bindir}:/usr/bin:/bin",
            "PG_CONFIG": f"{bindir}/pg_config",
            # pg_autoctl keeps each node's configuration and state under these.
            "XDG_CONFIG_HOME": str(self.folder / "config"),
            "XDG_DATA_HOME": str(self.folder / "share"),
            "HOME": str(self.folder),
            "LANG": "C.UTF-8",
        }

    def _command(self, *args: str) -> list[str]:
        environment = [f"{name}={value}" for name, value in self._env().items()]
        return [*self.as_user, "env", *environment, PG_AUTOCTL, *args]

    def autoctl(self, *args: str, timeout: float = STEP_TIMEOUT) -> str:
        done = subprocess.run(
            self._command(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_autoctl {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def _run(self, node: Node, *args: str) -> None:
        """`pg_autoctl <args>` (a `run`, or a `create … --run`) for `node` in the background, in
        a process group of its own, its output in the node's log."""
        node.log = self.folder / f"{node.name}.log"
        with node.log.open("ab") as log:
            node.process = subprocess.Popen(
                self._command(*args),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def states(self) -> dict[str, str]:
        """Each data node's name and the state it reports to the monitor."""
        shown = json.loads(
            self.autoctl("show", "state", "--pgdata", str(self.monitor.pgdata), "--json")
        )
        return {str(row["nodename"]): str(row["current_group_state"]) for row in shown}

    def wait_for(
        self,
        wanted: Mapping[str, set[str]],
        timeout: float = STEP_TIMEOUT,
        nudge: Callable[[], object] | None = None,
    ) -> None:
        """Until each named node reports one of its wanted states (calling `nudge` between
        looks, its errors ignored)."""
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            with suppress(RuntimeError, ValueError):
                seen = self.states()
                if all(seen.get(name) in states for name, states in wanted.items()):
                    return
            if nudge is not None:
                with suppress(psycopg.Error):
                    nudge()
            time.sleep(0.2)
        raise RuntimeError(
            f"the formation did not reach {wanted} in {timeout}s: {seen}\n{self.logs()}"
        )

    def primary(self) -> Node:
        states = self.states()
        for node in self.nodes:
            if states.get(node.name) in {"primary", "wait_primary", "single"}:
                return node
        raise RuntimeError(f"no primary: {states}")

    def kill(self, node: Node) -> None:
        """SIGKILL the node's pg_autoctl (its whole process group: supervisor, keeper) and
        its postmaster: nothing is left to restart PostgreSQL there."""
        pid = node.postmaster_pid()
        if node.process is not None:
            with suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait(timeout=10)
        if pid is not None:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self, node: Node) -> None:
        """SIGTERM the node's pg_autoctl (it stops its PostgreSQL), SIGKILL if it lingers."""
        if node.process is not None and node.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGTERM)
            try:
                node.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill(node)
        pid = node.postmaster_pid()
        if pid is not None:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(
            f"--- {node.name} ---\n{node.log.read_text(errors='replace')[-4000:]}"
            for node in [self.monitor, *self.nodes]
            if node.log is not None and node.log.exists()
        )


def _wait_accepting(port: int, dbname: str, user: str, timeout: float = STEP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(
                host="127.0.0.1", port=port, dbname=dbname, user=user, connect_timeout=2
            ).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _execute(port: int, statement: str) -> None:
    with psycopg.connect(
        host="127.0.0.1", port=port, dbname="postgres", user="postgres", connect_timeout=2,
        autocommit=True,
    ) as connection:  # fmt: skip
        connection.execute(statement)  # type: ignore[arg-type]


@contextmanager
def formation() -> Iterator[Formation]:
    """A running monitor, primary and synchronous secondary; stopped and deleted on exit.

    Raises FileNotFoundError when pg_autoctl is not installed.
    """
    if not Path(PG_AUTOCTL).exists():
        raise FileNotFoundError(PG_AUTOCTL)
    folder = Path(tempfile.mkdtemp(prefix="tally-pgaf-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    found = Formation(
        folder=folder,
        as_user=as_user,
        monitor=Node("monitor", folder / "monitor", _free_port()),
    )
    try:
        found.autoctl(
            "create", "monitor", "--pgdata", str(found.monitor.pgdata),
            "--pgport", str(found.monitor.port), "--hostname", "127.0.0.1",
            "--listen", "127.0.0.1", "--auth", "trust", "--no-ssl",
        )  # fmt: skip
        found._run(found.monitor, "run", "--pgdata", str(found.monitor.pgdata))
        _wait_accepting(found.monitor.port, "pg_auto_failover", "postgres")
        with psycopg.connect(
            host="127.0.0.1", port=found.monitor.port, dbname="pg_auto_failover",
            user="postgres", autocommit=True,
        ) as monitor:  # fmt: skip
            for name, value in MONITOR_SETTINGS.items():
                monitor.execute(f"ALTER SYSTEM SET {name} = {value}")
            monitor.execute("SELECT pg_reload_conf()")
        for number in (1, 2):
            node = Node(f"node_{number}", folder / f"node{number}", _free_port())
            found.nodes.append(node)
            found._run(
                node, "create", "postgres", "--pgdata", str(node.pgdata),
                "--pgport", str(node.port), "--hostname", "127.0.0.1", "--listen", "127.0.0.1",
                "--name", node.name, "--dbname", DATABASE, "--monitor", found.monitor_url,
                "--auth", "trust", "--no-ssl", "--run",
            )  # fmt: skip
            if number == 1:
                found.wait_for({node.name: {"single"}})
        # The standby's pg_basebackup waits for a spread checkpoint (minutes by default): ask
        # for an immediate one, which finishes the one under way at once.
        found.wait_for(
            {"node_1": {"primary"}, "node_2": {"secondary"}},
            nudge=lambda: _execute(found.nodes[0].port, "CHECKPOINT"),
        )
        for node in found.nodes:
            for name, value in KEEPER_SETTINGS.items():
                found.autoctl("config", "set", "--pgdata", str(node.pgdata), name, value)
        yield found
    finally:
        for node in [*found.nodes, found.monitor]:
            found.stop(node)
        shutil.rmtree(folder, ignore_errors=True)
