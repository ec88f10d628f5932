# ruff: noqa: T201
# (T201: this harness reports its figures on the terminal; printing is its job.)
"""Benchmark harness (issue 10): Tally beside its peers and limits, in one run on one machine.

    make bench [BENCH_ARGS="--quick"]     or     .venv/bin/python -m bench --help

Reference points (bare ASGI ceiling, the afternoon peer, COPY in and out), then Tally on
PostgreSQL and SQLite: single-event ingest (and at 80% of its rate), 1,000-event batches, the
SDK from several processes, and on the big store (10,000 tenants, 10 M events) the export as
JSON pages and as the NDJSON stream, usage, reconciliation and growth. Prints one table and the
issue's targets, and writes bench/results/<UTC time>.json and .md. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg

from bench import bigstore, limits, report, scenarios, servers, wrk
from bench.report import Results
from bench.scenarios import Load

SCENARIOS = ("single", "batch", "sdk", "export", "usage", "reconciliation", "growth")
RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 1000


_BEGAN = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _BEGAN:5.0f} s] {message}", flush=True)


def git_commit() -> str:
    found = subprocess.run(  # noqa: S603 - fixed argument list
        [shutil.which("git") or "git", "-C", str(servers.ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.strip() or "?"


def machine() -> dict[str, str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    with psycopg.connect(servers.PG_ADMIN_URL) as connection:
        found = connection.execute("SHOW server_version").fetchone()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "postgresql": str(found[0]) if found else "?",
        "sqlite": sqlite3.sqlite_version,
        "wrk": wrk.version(),
        "commit": git_commit(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench",
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke mode: 1 s loads, a 20,000-event big store of 20 tenants "
        "(a throwaway database), no warm-ups, few requests; every scenario still runs",
    )
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios among {','.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--store",
        choices=("postgres", "sqlite", "both"),
        default="both",
        help="stores of the single and batch scenarios (the big store is PG)",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds of each wrk load")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument(
        "--batch-connections",
        type=int,
        default=8,
        help="wrk connections of the batch loads (each holds 1,000 events)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="wrk threads")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="server worker processes (Tally, peer, bare ASGI alike)",
    )
    parser.add_argument("--events", type=int, default=10_000_000, help="events of the big store")
    parser.add_argument("--tenants", type=int, default=10_000, help="tenants of the big store")
    parser.add_argument("--rebuild", action="store_true", help="load the big store again")
    parser.add_argument("--sdk-processes", type=int, default=4, help="processes of the SDK run")
    parser.add_argument(
        "--requests", type=int, default=200, help="requests of each usage and reconciliation figure"
    )
    parser.add_argument(
        "--export-seconds", type=float, default=60, help="bound of the JSON-pages export"
    )
    parser.add_argument(
        "--stream-seconds",
        type=float,
        default=300,
        help="bound of the NDJSON stream (it stops earlier at the store's end)",
    )
    parser.add_argument("--copy-rows", type=int, default=200_000, help="rows of the COPY-in limit")
    parser.add_argument(
        "--growth-rounds",
        type=int,
        default=2,
        help="turns of growth: batches into a new empty store, then into the big store",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where JSON and Markdown go")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose among {SCENARIOS}")
    if args.quick:
        args.duration = 2
        args.events, args.tenants = 10_000, 20
        args.requests = min(args.requests, 20)
        args.export_seconds, args.stream_seconds = 10, 30
        args.copy_rows = 5_000
        args.sdk_processes = min(args.sdk_processes, 2)
        args.growth_rounds = 1
    if min(args.duration, args.connections, args.workers, args.events, args.growth_rounds) < 1:
        parser.error(
            "--duration, --connections, --workers, --events and --growth-rounds must be at least 1"
        )
    args.stores = ["postgres", "sqlite"] if args.store == "both" else [args.store]
    return args


def wanted(args: argparse.Namespace, *names: str) -> bool:
    return any(name in args.only for name in names)


def references(results: Results, args: argparse.Namespace, load: Load, workdir: Path) -> None:
    if wanted(args, "single"):
        say("[reference] bare ASGI app, single events ...")
        with servers.uvicorn_app("bench.peers.bare_asgi:app", workdir, "bare", args.workers) as app:
            scenarios.warm_up(app.base_url, "", load)
            results.add(
                scenarios.ingest(
                    scenarios.Target(app.process.pid, app.base_url, "", "-", "bare-asgi"),
                    "ref.bare.single",
                    "single-event ingest",
                    load,
                )
            )
    if wanted(args, "single", "batch", "sdk"):
        with servers.throwaway_database("peer") as url:
            from bench.peers import afternoon  # noqa: PLC0415 - only here

            afternoon.create_table(url)
            env = {"PEER_DATABASE_URL": url}
            with servers.uvicorn_app(
                "bench.peers.afternoon:app", workdir, "peer", args.workers, env
            ) as app:
                scenarios.warm_up(app.base_url, "", load)
                peer = scenarios.Target(app.process.pid, app.base_url, "", "postgres", "peer")
                if wanted(args, "single"):
                    say("[reference] afternoon peer, single events ...")
                    results.add(
                        scenarios.ingest(
                            peer,
                            "ref.peer.single",
                            "single-event ingest",
                            load,
                        )
                    )
                say(f"[reference] afternoon peer, batches of {BATCH} ...")
                results.add(
                    scenarios.ingest(
                        peer,
                        "ref.peer.batch",
                        f"batch ingest ({BATCH})",
                        load,
                        batch=BATCH,
                    )
                )
    if wanted(args, "batch", "sdk"):
        say(f"[reference] psql \\copy of {args.copy_rows:,} rows into Tally's events table ...")
        copy = limits.copy_in(workdir, args.copy_rows)
        note = "rows/s into a fresh Tally-migrated events table"
        results.add(copy.row("ref.copy.in", "COPY in (psql \\copy)", note))


def fresh_store(
    results: Results, args: argparse.Namespace, load: Load, workdir: Path, store: str
) -> None:
    """Tally on a new store: batches first (into the empty store), then single events, then
    single events at 80% of that rate, then the SDK."""
    with (
        servers.throwaway_database("tally") if store == "postgres" else _sqlite(workdir) as url,
        servers.tally(url, workdir, f"tally-{store}", args.workers) as server,
    ):
        keys = servers.register(server, load.tenants)
        root, base = server.process.pid, server.base_url
        tally = scenarios.Target(root, base, keys.write, store, "tally")
        if wanted(args, "batch"):
            scenarios.warm_up(base, keys.write, load)
            say(f"[tally {store}] batches of {BATCH} into the empty store ...")
            results.add(
                scenarios.ingest(
                    tally,
                    f"batch.{store}",
                    f"batch ingest ({BATCH})",
                    load,
                    batch=BATCH,
                )
            )
        if wanted(args, "single"):
            scenarios.warm_up(base, keys.write, load)
            say(f"[tally {store}] single events ...")
            single = results.add(
                scenarios.ingest(
                    tally,
                    f"single.{store}",
                    "single-event ingest",
                    load,
                )
            )
            if store == "postgres" and single.requests_per_s:
                rate = 0.8 * single.requests_per_s
                say(f"[tally {store}] single events paced at 80%: {rate:,.0f} req/s ...")
                paced = scenarios.ingest(
                    tally,
                    "single80.postgres",
                    "single-event ingest at 80%",
                    load,
                    rate=rate,
                )
                paced.notes.append(
                    f"paced to {rate:,.0f} req/s (wrk delay() on a fixed schedule per thread); "
                    f"achieved {paced.requests_per_s or 0:,.0f} req/s"
                )
                results.add(paced)
        if store == "postgres" and wanted(args, "sdk"):
            say(f"[tally {store}] SDK report() from {args.sdk_processes} processes ...")
            results.add(
                scenarios.sdk(
                    root,
                    base,
                    keys,
                    processes=args.sdk_processes,
                    seconds=0.5 if args.quick else args.duration,
                    tenants=load.tenants,
                    most=2_000 if args.quick else None,
                )
            )
        metrics_check(results, server, keys, store)


def metrics_check(results: Results, server: servers.Server, keys: servers.Keys, store: str) -> None:
    """Metrics are on: /metrics answers the admin key on the API port."""
    with server.client(timeout=servers.HTTP_TIMEOUT) as client:
        answer = client.get("/metrics", headers={"Authorization": f"Bearer {keys.admin}"})
    if answer.status_code != 200 or b"tally_" not in answer.content:
        results.notes.append(
            f"WARNING: /metrics of the {store} server answered {answer.status_code}"
        )


class _sqlite:
    def __init__(self, workdir: Path) -> None:
        self.path = workdir / f"bench-{time.time_ns()}.db"

    def __enter__(self) -> str:
        return f"sqlite:///{self.path}"

    def __exit__(self, *_: object) -> None:
        for path in self.path.parent.glob(self.path.name + "*"):
            path.unlink()


def big_store(results: Results, args: argparse.Namespace, load: Load, workdir: Path) -> None:
    say(f"[big store] {args.events:,} events over {args.tenants:,} tenants ...")
    big = bigstore.ensure(
        args.events,
        args.tenants,
        processes=max(2, os.cpu_count() or 2),
        rebuild=args.rebuild,
        throwaway=args.quick,
        say=say,
    )
    results.notes.append(
        f"big store: {args.events:,} events, {args.tenants:,} tenants, "
        f"{big.layout.months} months from {big.layout.first_month:%Y-%m}; "
        + ("reused, " if big.reused else "")
        + f"loaded in {big.load_seconds:.0f} s"
    )
    try:
        env = {"TALLY_KEYRING": str(big.keyring)}
        keys = servers.issue_keys(big.url, big.keyring)
        with servers.tally(big.url, workdir, "tally-big", args.workers, env) as server:
            root, base = server.process.pid, server.base_url
            tally = scenarios.Target(root, base, keys.write, "postgres", "tally")
            if wanted(args, "export"):
                with psycopg.connect(big.url) as connection:
                    found = connection.execute("SELECT count(*) FROM events").fetchone()
                stored = int(found[0]) if found else 0
                say(f"[big store] export, JSON pages (at most {args.export_seconds:.0f} s) ...")
                results.add(scenarios.export_pages(root, base, keys, args.export_seconds))
                say(f"[big store] export, NDJSON stream (at most {args.stream_seconds:.0f} s) ...")
                results.add(scenarios.export_stream(root, base, keys, args.stream_seconds, stored))
            if wanted(args, "usage"):
                for by in ("subject_day", "attribute"):
                    say(f"[big store] usage {by}, {args.requests} requests ...")
                    results.add(
                        scenarios.usage(root, base, keys, big, requests=args.requests, by=by)
                    )
            if wanted(args, "reconciliation"):
                say(f"[big store] reconciliation, {args.requests} requests ...")
                results.add(scenarios.reconciliation(root, base, keys, big, args.requests))
            if wanted(args, "growth"):
                growth(results, args, load, workdir, tally)
            metrics_check(results, server, keys, "big-store")
        if wanted(args, "export"):
            say("[reference] COPY (SELECT ...) TO STDOUT of the big store ...")
            copy = limits.copy_out(big.url)
            note = "rows/s of the whole big store"
            results.add(copy.row("ref.copy.out", "COPY TO (psql, to /dev/null)", note))
    finally:
        if big.throwaway:
            bigstore.drop(big)


def growth(
    results: Results, args: argparse.Namespace, load: Load, workdir: Path, big: scenarios.Target
) -> None:
    """Batches into an empty store and into the big store, taking turns: each round a new
    empty store (its own database and server) and then the big store's server, each warmed up
    first. Rounds minutes apart would compare the VM's moods as much as the stores (it swings by
    a fifth within minutes); turns seconds apart compare the stores."""
    empty_rows, big_rows = [], []
    for turn in range(1, args.growth_rounds + 1):
        with (
            servers.throwaway_database("growth") as url,
            servers.tally(url, workdir, f"tally-growth-{turn}", args.workers) as server,
        ):
            keys = servers.register(server, load.tenants)
            empty = scenarios.Target(
                server.process.pid, server.base_url, keys.write, "postgres", "tally"
            )
            scenarios.warm_up(empty.url, empty.token, load)
            say(f"[growth {turn}/{args.growth_rounds}] batches of {BATCH} into an empty store ...")
            empty_rows.append(scenarios.ingest(empty, "growth.empty", "", load, batch=BATCH))
        scenarios.warm_up(big.url, big.token, load)
        say(f"[growth {turn}/{args.growth_rounds}] batches of {BATCH} into the big store ...")
        big_rows.append(scenarios.ingest(big, "growth.big", "", load, batch=BATCH))
    results.add(report.merged(empty_rows, f"batch ingest ({BATCH}), empty store, in turns"))
    results.add(report.merged(big_rows, f"batch ingest ({BATCH}), big store, in turns"))


def measure(args: argparse.Namespace, results: Results, workdir: Path) -> None:
    # The ingest loads spread their events over the first 50 tenants (all of them in --quick):
    # registered on the fresh stores, and the big store's own on it.
    load = Load(
        args.duration,
        args.connections,
        args.threads,
        min(50, args.tenants),
        args.batch_connections,
        warm_up=not args.quick,
    )
    references(results, args, load, workdir)
    for store in args.stores:
        if wanted(args, "single", "batch") or (store == "postgres" and wanted(args, "sdk")):
            fresh_store(results, args, load, workdir, store)
    if "postgres" in args.stores and wanted(args, "export", "usage", "reconciliation", "growth"):
        big_store(results, args, load, workdir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for program in ("wrk", "psql"):
        if shutil.which(program) is None:
            package = "wrk" if program == "wrk" else "postgresql-client"
            print(f"{program} is missing (Debian: apt-get install -y {package})", file=sys.stderr)
            return 2
    began = datetime.now(UTC)
    stamp = began.strftime("%Y%m%dT%H%M%SZ")
    options = {
        name: getattr(args, name)
        for name in (
            "quick",
            "only",
            "store",
            "duration",
            "connections",
            "batch_connections",
            "threads",
            "workers",
            "events",
            "tenants",
            "sdk_processes",
            "requests",
            "export_seconds",
            "stream_seconds",
            "copy_rows",
            "growth_rounds",
        )
    }
    options["only"] = ",".join(args.only)
    results = Results(started=f"{began:%Y-%m-%d %H:%M} UTC", options=options, machine=machine())
    results.notes.append(
        f"rate limits on at {servers.RATE_LIMIT}/s per key and tenant (requests and events), "
        "metrics on (/metrics on the API port); wrk closed-loop, sharing the machine"
    )
    with tempfile.TemporaryDirectory(prefix="tally-bench-") as temp:
        try:
            measure(args, results, Path(temp))
        finally:
            results.notes.append(
                f"the run took {(datetime.now(UTC) - began).total_seconds():.0f} s"
            )
            report.compare(results)
            print()
            print(report.text(results))
            as_json, as_md = report.write(results, args.out, stamp)
            print(f"\nwrote {as_json} and {as_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
