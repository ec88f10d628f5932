# ruff: noqa: T201
# (T201: this harness reports its figures on the terminal; printing is its job.)
"""Benchmark harness: a real `tally serve` under wrk load, figures printed, no thresholds.

    .venv/bin/python bench/run.py [--store sqlite|postgres|both] [--duration 10] [--connections 32]

Per store it measures single-event POSTs, 100-event batches, single-event POSTs with group
commit effectively off (TALLY_COMMIT_MAX_EVENTS=1), and a full export through the cursor, all in
one run so that the ratios between them compare like with like. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

# The harness shares the end-to-end tests' way of running a server (tests/support/server.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.server import STOP_TIMEOUT, TALLY, Server, running_server

HERE = Path(__file__).resolve().parent
LUA_SCRIPT = HERE / "events.lua"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

TENANT = "bench"
APPLICATION = "bench-app"
BATCH_SIZE = 100
WARMUP_SECONDS = 2
LOAD_BUDGET_SECONDS = 180  # wrk time per invocation, all stores together
EXPORT_PAGE = 1000
EXPORT_TIME_LIMIT = 60.0
MAX_REQUESTS_PER_THREAD = 5_000_000  # far above what one process serves in a minute
HTTP_TIMEOUT = 30.0


# --- results ---------------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured line of the table."""

    store: str
    name: str
    events_per_s: float
    requests_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    server_cpu: float | None = None
    events: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class WrkResult:
    raw: dict[str, int | float]
    output: str

    def get(self, name: str) -> int:
        return int(self.raw.get(name, 0))

    @property
    def seconds(self) -> float:
        return self.raw["duration_us"] / 1e6

    def problems(self) -> list[str]:
        found: list[str] = []
        socket_errors = {
            name: self.get(name)
            for name in ("connect_errors", "read_errors", "write_errors", "timeouts")
        }
        if any(socket_errors.values()):
            found.append(f"socket errors {socket_errors}")
        if self.get("non2xx") or self.get("status_errors"):
            found.append(
                f"{self.get('non2xx')} non-2xx responses ({self.get('status_errors')} >= 400)"
            )
        if self.get("not_accepted"):
            found.append(f"{self.get('not_accepted')} events in 2xx answers were not 'accepted'")
        if self.get("capped"):
            found.append("a wrk thread hit the request cap: the rate is a lower bound")
        if self.get("ok") == 0:
            found.append("no successful request")
        return found


@dataclass(frozen=True)
class Keys:
    admin: str
    write: str
    read: str


@dataclass
class StoreRun:
    store: str
    figures: list[Figure] = field(default_factory=list)
    acknowledged: int = 0
    in_flight_bound: int = 0
    log_findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- the store under test --------------------------------------------------------------------


@contextmanager
def sqlite_database(workdir: Path) -> Iterator[str]:
    yield f"sqlite:///{workdir / 'bench.db'}"


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A throwaway database bench_<pid> on the local server, dropped on exit."""
    name = f"bench_{os.getpid()}"
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- the server ------------------------------------------------------------------------------


@contextmanager
def tally_server(
    database_url: str, workdir: Path, label: str, extra_env: dict[str, str] | None = None
) -> Iterator[Server]:
    """`tally serve --json` on a free port of 127.0.0.1, stopped (TERM, then KILL) on exit."""
    with running_server(database_url, workdir, "--json", env=extra_env, label=label) as server:
        yield server
    if server.process.returncode == -signal.SIGKILL:
        print(f"  warning: tally serve did not stop within {STOP_TIMEOUT:.0f}s; it was killed")


def log_findings(server: Server, label: str) -> list[str]:
    """What the server logged (it runs at TALLY_LOG_LEVEL=warning), counted by kind."""
    counts: Counter[str] = Counter()
    for path in (server.stdout, server.stderr):
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    counts[line[:200]] += 1
                    continue
                if "key" in entry and "scopes" in entry:
                    continue  # the admin key document printed on first start
                kind = ", ".join(
                    f"{name}={entry[name]}"
                    for name in ("level", "logger", "event", "error_type")
                    if name in entry
                )
                counts[kind] += 1
            elif not line.startswith("INFO:"):
                counts[line[:200]] += 1
    return [f"{label}: {count} x {kind}" for kind, count in counts.most_common()]


def register(base_url: str, admin_key: str) -> Keys:
    """A tenant, an application, and an events:write and an events:read key, via the API."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=HTTP_TIMEOUT) as client:
        client.post("/v1/tenants", json={"id": TENANT, "name": "Bench"}).raise_for_status()
        client.post("/v1/applications", json={"id": APPLICATION}).raise_for_status()
        write = client.post(
            "/v1/keys", json={"scopes": ["events:write"], "application": APPLICATION}
        )
        write.raise_for_status()
        read = client.post("/v1/keys", json={"scopes": ["events:read"]})
        read.raise_for_status()
    return Keys(admin=admin_key, write=write.json()["key"], read=read.json()["key"])


# --- load ------------------------------------------------------------------------------------


def cpu_seconds(process: subprocess.Popen[bytes]) -> float:
    """User + system CPU time of the server process so far (Linux /proc), 0.0 elsewhere."""
    stat = Path(f"/proc/{process.pid}/stat")
    if not stat.exists():
        return 0.0
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rfc3339_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_wrk(
    server: Server,
    keys: Keys,
    *,
    batch: int,
    seconds: int,
    connections: int,
    threads: int,
    prefix: str,
) -> WrkResult:
    env = os.environ | {
        "BENCH_TOKEN": keys.write,
        "BENCH_PREFIX": prefix,
        "BENCH_TIME": rfc3339_now(),
        "BENCH_TENANT": TENANT,
        "BENCH_BATCH": str(batch),
        "BENCH_MAX_REQUESTS": str(MAX_REQUESTS_PER_THREAD),
    }
    wrk = shutil.which("wrk") or "wrk"
    cpu_before = cpu_seconds(server.process)
    command = [
        wrk,
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={seconds}s",
        "--timeout=10s",
        f"--script={LUA_SCRIPT}",
        f"{server.base_url}/v1/events",
    ]
    done = subprocess.run(  # noqa: S603 - fixed argument list; target is 127.0.0.1 only
        command, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            raw: dict[str, int | float] = json.loads(line.removeprefix("BENCH_RESULT "))
            raw["server_cpu_s"] = cpu_seconds(server.process) - cpu_before
            return WrkResult(raw=raw, output=done.stdout)
    raise RuntimeError(f"wrk printed no BENCH_RESULT line:\n{done.stdout}\n{done.stderr}")


def load_figure(store: str, name: str, result: WrkResult) -> Figure:
    seconds = result.seconds
    return Figure(
        store=store,
        name=name,
        events_per_s=result.get("accepted") / seconds,
        requests_per_s=result.get("responses") / seconds,
        p50_ms=result.get("p50_us") / 1000,
        p99_ms=result.get("p99_us") / 1000,
        server_cpu=float(result.raw["server_cpu_s"]) / seconds,
        events=result.get("accepted"),
        problems=result.problems(),
    )


@dataclass(frozen=True)
class Export:
    events: int
    unique: int
    pages: int
    seconds: float
    page_ms: list[float]
    complete: bool
    non2xx: list[str]
    server_cpu_s: float


def export_all(server: Server, keys: Keys, max_pages: int) -> Export:
    """GET /v1/events?limit=1000, following next_cursor until has_more is false (bounded)."""
    headers = {"Authorization": f"Bearer {keys.read}"}
    identities: set[tuple[str, str]] = set()
    events = pages = 0
    page_ms: list[float] = []
    non2xx: list[str] = []
    cursor: str | None = None
    complete = False
    cpu_before = cpu_seconds(server.process)
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=HTTP_TIMEOUT) as client:
        start = time.perf_counter()
        while pages < max_pages and time.perf_counter() - start < EXPORT_TIME_LIMIT:
            params: dict[str, str | int] = {"limit": EXPORT_PAGE}
            if cursor is not None:
                params["cursor"] = cursor
            asked = time.perf_counter()
            answer = client.get("/v1/events", params=params)
            page_ms.append((time.perf_counter() - asked) * 1000)
            if not answer.is_success:
                non2xx.append(f"page {pages}: {answer.status_code} {answer.text[:200]}")
                break
            page: dict[str, Any] = answer.json()
            pages += 1
            events += len(page["events"])
            identities.update((e["application"], e["id"]) for e in page["events"])
            cursor = page["next_cursor"]
            if not page["has_more"]:
                complete = True
                break
        seconds = time.perf_counter() - start
    server_cpu_s = cpu_seconds(server.process) - cpu_before
    return Export(events, len(identities), pages, seconds, page_ms, complete, non2xx, server_cpu_s)


def export_figure(store: str, export: Export, run: StoreRun) -> Figure:
    problems = list(export.non2xx)
    if not export.complete:
        problems.append(f"export stopped at the bound after {export.pages} pages (incomplete)")
    if export.unique != export.events:
        problems.append(f"export repeated events: {export.events} read, {export.unique} unique")
    if export.complete and export.unique < run.acknowledged:
        problems.append(
            f"export holds {export.unique} events but {run.acknowledged} were acknowledged"
        )
    if export.complete and export.unique > run.acknowledged + run.in_flight_bound:
        problems.append(
            f"export holds {export.unique} events, more than {run.acknowledged} acknowledged "
            f"+ {run.in_flight_bound} possibly in flight"
        )
    ordered = sorted(export.page_ms)
    return Figure(
        store=store,
        name=f"export, limit={EXPORT_PAGE}",
        events_per_s=export.events / export.seconds if export.seconds else 0.0,
        requests_per_s=export.pages / export.seconds if export.seconds else 0.0,
        p50_ms=ordered[len(ordered) // 2] if ordered else None,
        p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else None,
        server_cpu=export.server_cpu_s / export.seconds if export.seconds else None,
        events=export.events,
        problems=problems,
    )


# --- one store -------------------------------------------------------------------------------


def measure_store(
    store: str, database_url: str, workdir: Path, args: argparse.Namespace
) -> StoreRun:
    run = StoreRun(store=store)
    prefix = secrets.token_hex(4)

    def wrk(server: Server, keys: Keys, label: str, batch: int, seconds: int) -> WrkResult:
        result = run_wrk(
            server,
            keys,
            batch=batch,
            seconds=seconds,
            connections=args.connections,
            threads=args.threads,
            prefix=f"{prefix}{label}",
        )
        run.acknowledged += result.get("accepted")
        run.in_flight_bound += args.connections * batch
        return result

    # Group commit effectively off first, on the fresh store: it prints the admin key.
    print(f"[{store}] single events, group commit off (TALLY_COMMIT_MAX_EVENTS=1) ...")
    extra = {"TALLY_COMMIT_MAX_EVENTS": "1"}
    with tally_server(database_url, workdir, f"{store}-gc-off", extra) as server:
        if not server.admin_key:
            raise RuntimeError(f"tally serve printed no admin key:\n{server.logs()}")
        keys = register(server.base_url, server.admin_key)
        wrk(server, keys, "w0", 1, WARMUP_SECONDS)
        off = wrk(server, keys, "s0", 1, args.duration)
        run.log_findings += log_findings(server, "gc-off server")
    run.figures.append(load_figure(store, "single, group commit off", off))

    print(f"[{store}] single events, group commit on (default) ...")
    with tally_server(database_url, workdir, f"{store}-gc-on") as server:
        wrk(server, keys, "w1", 1, WARMUP_SECONDS)
        single = wrk(server, keys, "s1", 1, args.duration)
        run.figures.insert(0, load_figure(store, "single, group commit on", single))
        print(f"[{store}] batches of {BATCH_SIZE} events ...")
        batch = wrk(server, keys, "b1", BATCH_SIZE, args.duration)
        run.figures.insert(1, load_figure(store, f"batch of {BATCH_SIZE}", batch))
        print(f"[{store}] export of everything stored ...")
        max_pages = (run.acknowledged + run.in_flight_bound) // EXPORT_PAGE + 10
        export = export_all(server, keys, max_pages)
        run.figures.append(export_figure(store, export, run))
        run.log_findings += log_findings(server, "gc-on server")
    return run


# --- report ----------------------------------------------------------------------------------


def machine(stores: list[str]) -> list[tuple[str, str]]:
    cpu = "?"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk = subprocess.run(  # noqa: S603 - fixed argument list
        [shutil.which("wrk") or "wrk", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    rows = [
        ("nproc", str(os.cpu_count())),
        ("cpu", cpu),
        ("python", platform.python_version()),
        ("sqlite", sqlite3.sqlite_version),
        ("wrk", ((wrk.stdout or wrk.stderr or "?").splitlines() or ["?"])[0].split(" [")[0]),
    ]
    if "postgres" in stores:
        with psycopg.connect(PG_ADMIN_URL) as connection:
            found = connection.execute("SHOW server_version").fetchone()
        rows.append(("postgresql", str(found[0]) if found else "?"))
    return rows


def number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def ratio(top: Figure | None, bottom: Figure | None) -> str:
    if top is None or bottom is None or not bottom.events_per_s:
        return "-"
    value = f"{top.events_per_s / bottom.events_per_s:.1f}x"
    return value if top.valid and bottom.valid else f"{value} (INVALID)"


def report(runs: list[StoreRun], args: argparse.Namespace, stores: list[str]) -> None:
    print()
    print(
        f"Tally benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {args.duration}s per load, "
        f"{args.connections} connections, {args.threads} wrk threads"
    )
    for name, value in machine(stores):
        print(f"  {name:<11} {value}")
    print()
    header = (
        "store",
        "figure",
        "events/s",
        "req/s",
        "p50 ms",
        "p99 ms",
        "srv CPU",
        "events",
        "valid",
    )
    rows = [
        (
            f.store,
            f.name,
            number(f.events_per_s),
            number(f.requests_per_s),
            number(f.p50_ms, 1),
            number(f.p99_ms, 1),
            "-" if f.server_cpu is None else f"{f.server_cpu:.0%}",
            number(f.events),
            "yes" if f.valid else "NO",
        )
        for run in runs
        for f in run.figures
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                str(c).ljust(w) if i < 2 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    print("(srv CPU: the server process's CPU time over wall time; 100% = one core)")
    print("(export: req/s is pages/s; p50/p99 are per page, measured by the client)")
    print()
    for run in runs:
        by_name = {f.name: f for f in run.figures}
        single = by_name.get("single, group commit on")
        print(
            f"{run.store}: batch/single {ratio(by_name.get(f'batch of {BATCH_SIZE}'), single)}, "
            f"group commit on/off {ratio(single, by_name.get('single, group commit off'))}"
        )
    for run in runs:
        for f in run.figures:
            for problem in f.problems:
                print(f"WARNING {run.store} / {f.name}: {problem} -> figure INVALID")
        for line in run.log_findings[:10]:
            print(f"WARNING {run.store} server log: {line}")
        if len(run.log_findings) > 10:
            print(f"WARNING {run.store}: {len(run.log_findings) - 10} more server log lines")


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--store", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured load")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    args = parser.parse_args(argv)
    stores = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    per_store = 3 * args.duration + 2 * WARMUP_SECONDS
    if args.duration < 1 or per_store * len(stores) > LOAD_BUDGET_SECONDS:
        most = (LOAD_BUDGET_SECONDS // len(stores) - 2 * WARMUP_SECONDS) // 3
        parser.error(f"--duration must be 1..{most} for {len(stores)} store(s) (3 min of load)")
    if not 1 <= args.threads <= args.connections:
        parser.error("need 1 <= --threads <= --connections")
    args.stores = stores
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed; on Debian: apt-get install -y wrk", file=sys.stderr)
        return 2
    if not TALLY.exists():
        print(f"{TALLY} is missing: run this with the project's .venv/bin/python", file=sys.stderr)
        return 2
    runs: list[StoreRun] = []
    with tempfile.TemporaryDirectory(prefix="tally-bench-") as temp:
        workdir = Path(temp)
        for store in args.stores:
            if store == "sqlite":
                database = sqlite_database(workdir)
            else:
                database = postgres_database(PG_ADMIN_URL)
            with database as url:
                runs.append(measure_store(store, url, workdir, args))
    report(runs, args, args.stores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
