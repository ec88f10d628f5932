"""What is measured: each function drives one server for one scenario and returns its Row."""

from __future__ import annotations

import json
import random
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx

from bench import procs, wrk
from bench.bigstore import BigStore, tenant_id
from bench.report import Row
from bench.servers import HTTP_TIMEOUT, ROOT, Keys

EXPORT_PAGE = 1000


@dataclass(frozen=True)
class Load:
    """How wrk is run: the same for Tally and the peers."""

    seconds: int
    connections: int
    threads: int
    tenants: int
    batch_connections: int
    warm_up: bool = True


@dataclass(frozen=True)
class Target:
    """A server under load: its root process (metered with its children), URL and key."""

    root: int
    url: str
    token: str
    store: str
    system: str


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def prefix() -> str:
    return secrets.token_hex(4)


def warm_up(url: str, token: str, load: Load) -> None:
    """One second of single events, not measured: connections, caches, JIT of the Lua."""
    if not load.warm_up:
        return
    wrk.run(
        url,
        token=token,
        prefix=prefix() + "w",
        seconds=1,
        connections=load.connections,
        threads=load.threads,
        tenants=load.tenants,
    )


def ingest(
    target: Target, key: str, scenario: str, load: Load, *, batch: int = 1, rate: float = 0.0
) -> Row:
    """One wrk load of POST /v1/events (single events or batches), metered. Batches use
    `load.batch_connections`; `rate` > 0 paces the load to that many requests per second."""
    procs.settle(target.root)
    with procs.Meter(target.root) as meter:
        result = wrk.run(
            target.url,
            token=target.token,
            prefix=prefix(),
            seconds=load.seconds,
            connections=load.batch_connections if batch > 1 else load.connections,
            threads=load.threads,
            batch=batch,
            tenants=load.tenants,
            rate=rate,
        )
    row = Row(
        key=key,
        scenario=scenario,
        store=target.store,
        system=target.system,
        requests_per_s=result.requests_per_s,
        events_per_s=result.events_per_s,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        cpu_percent=meter.cpu_percent,
        rss_mb=meter.rss_mb,
        count=result.get("accepted") + result.get("duplicates"),
        seconds=result.seconds,
        problems=result.problems(),
    )
    if batch > 1 and result.get("dup_sent"):
        row.notes.append(
            f"{result.get('duplicates'):,} duplicates answered for the "
            f"{result.get('dup_answered'):,} repeats of answered requests "
            f"({result.get('dup_sent'):,} sent, 1% of each batch)"
        )
    return row


def export_pages(root: int, base_url: str, keys: Keys, seconds: float) -> Row:
    """GET /v1/events?limit=1000 from the start, following next_cursor, bounded by time."""
    headers = {"Authorization": f"Bearer {keys.read}"}
    events = pages = 0
    page_ms: list[float] = []
    problems: list[str] = []
    cursor: str | None = None
    complete = False
    with (
        httpx.Client(base_url=base_url, headers=headers, timeout=HTTP_TIMEOUT) as client,
        procs.Meter(root) as meter,
    ):
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            params: dict[str, str | int] = {"limit": EXPORT_PAGE}
            if cursor is not None:
                params["cursor"] = cursor
            asked = time.perf_counter()
            answer = client.get("/v1/events", params=params)
            page_ms.append((time.perf_counter() - asked) * 1000)
            if not answer.is_success:
                problems.append(f"page {pages}: {answer.status_code} {answer.text[:200]}")
                break
            page: dict[str, Any] = answer.json()
            pages += 1
            events += len(page["events"])
            cursor = page["next_cursor"]
            if not page["has_more"]:
                complete = True
                break
        took = time.perf_counter() - start
    row = Row(
        key="export.json",
        scenario=f"export, JSON pages of {EXPORT_PAGE}",
        store="postgres",
        system="tally",
        requests_per_s=pages / took,
        events_per_s=events / took,
        p50_ms=percentile(page_ms, 0.5),
        p99_ms=percentile(page_ms, 0.99),
        cpu_percent=meter.cpu_percent,
        rss_mb=meter.rss_mb,
        count=events,
        seconds=took,
        problems=problems,
    )
    row.notes.append("req/s = pages/s; p50/p99 per page, as the client saw them")
    row.notes.append(
        f"read the whole store ({events:,} events)"
        if complete
        else f"bounded by time: {events:,} events in {took:.0f} s"
    )
    if events == 0 and not problems:
        row.problems.append("no event exported")
    return row


def export_stream(root: int, base_url: str, keys: Keys, seconds: float, stored: int) -> Row:
    """The NDJSON stream from the start (Accept: application/x-ndjson): the whole store, or
    as much as `seconds` allow. Lines are counted, not parsed (the client stays cheap); the
    last must be the end line when the stream was read to its end."""
    headers = {"Authorization": f"Bearer {keys.read}", "Accept": "application/x-ndjson"}
    lines = 0
    tail = b""
    problems: list[str] = []
    complete = False
    first_ms: float | None = None
    with (
        httpx.Client(base_url=base_url, headers=headers, timeout=HTTP_TIMEOUT) as client,
        procs.Meter(root) as meter,
    ):
        start = time.perf_counter()
        with client.stream("GET", "/v1/events") as answer:
            if not answer.is_success:
                problems.append(f"{answer.status_code} {answer.read()[:200]!r}")
            else:
                for chunk in answer.iter_raw(1 << 20):
                    if first_ms is None:
                        first_ms = (time.perf_counter() - start) * 1000
                    lines += chunk.count(b"\n")
                    tail = (tail + chunk)[-4096:]
                    if time.perf_counter() - start >= seconds:
                        break
                else:
                    complete = True
        took = time.perf_counter() - start
    last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    events = lines - 1 if complete else lines
    if complete:
        try:
            end = json.loads(last)
        except ValueError:
            end = {}
        if end.get("has_more") is not False or "next_cursor" not in end:
            problems.append(f"the stream did not end with its end line: {last[:200]!r}")
        if events < stored:
            problems.append(f"the stream held {events:,} events, the store {stored:,}")
    row = Row(
        key="export.ndjson",
        scenario="export, NDJSON stream",
        store="postgres",
        system="tally",
        events_per_s=events / took if took else 0.0,
        p50_ms=first_ms,
        cpu_percent=meter.cpu_percent,
        rss_mb=meter.rss_mb,
        count=events,
        seconds=took,
        problems=problems,
    )
    row.notes.append(
        (
            f"read the whole store: {events:,} events in {took:.1f} s"
            if complete
            else f"bounded by time: {events:,} of {stored:,} events in {took:.0f} s"
        )
        + "; p50 column = time to the first byte"
    )
    if events == 0 and not problems:
        row.problems.append("no event streamed")
    return row


def _requests(
    key: str, scenario: str, *, root: int, base_url: str, token: str, paths: list[Any], note: str
) -> Row:
    """GET each (path, params, check) in turn, sequentially: latencies, and what `check`
    (given the answer's JSON) found wrong. `note` follows "N sequential requests"."""
    latencies: list[float] = []
    problems: list[str] = []
    headers = {"Authorization": f"Bearer {token}"}
    with (
        httpx.Client(base_url=base_url, headers=headers, timeout=HTTP_TIMEOUT) as client,
        procs.Meter(root) as meter,
    ):
        start = time.perf_counter()
        for path, params, check in paths:
            asked = time.perf_counter()
            answer = client.get(path, params=params)
            latencies.append((time.perf_counter() - asked) * 1000)
            if not answer.is_success:
                problems.append(f"{answer.status_code} {answer.text[:200]}")
            else:
                problem = check(answer.json())
                if problem:
                    problems.append(problem)
            if len(problems) > 5:
                break
        took = time.perf_counter() - start
    return Row(
        key=key,
        scenario=scenario,
        store="postgres",
        system="tally",
        requests_per_s=len(latencies) / took,
        p50_ms=percentile(latencies, 0.5),
        p99_ms=percentile(latencies, 0.99),
        cpu_percent=meter.cpu_percent,
        rss_mb=meter.rss_mb,
        count=len(latencies),
        seconds=took,
        problems=problems,
        notes=[f"{len(latencies)} sequential requests{note}"],
    )


def _tenant_months(big: BigStore, count: int, seed: int) -> list[tuple[int, int]]:
    chosen = random.Random(seed)  # noqa: S311 - picking tenants, not secrets
    return [
        (chosen.randrange(big.layout.tenants), chosen.randrange(big.layout.months))
        for _ in range(count)
    ]


def usage(root: int, base_url: str, keys: Keys, big: BigStore, *, requests: int, by: str) -> Row:
    """GET /v1/usage of one random tenant-month of llm.tokens, by subject and day or by an
    attribute, sequentially."""
    bounds = big.layout.bounds
    group = ["subject"] if by == "subject_day" else ["attributes.model"]
    paths = []
    for tenant, month in _tenant_months(big, requests, seed=len(by)):
        params = {
            "tenant": tenant_id(tenant),
            "type": "llm.tokens",
            "from": bounds[month].isoformat(),
            "to": bounds[month + 1].isoformat(),
            "window": "day" if by == "subject_day" else "none",
            "group_by": group,
        }

        def check(body: dict[str, Any], tenant: int = tenant, month: int = month) -> str | None:
            if big.layout.count(tenant, month) > 0 and not body.get("rows"):
                return f"no usage rows for {tenant_id(tenant)} month {month}"
            return None

        paths.append(("/v1/usage", params, check))
    name = "by subject and day" if by == "subject_day" else "by attribute (model)"
    return _requests(
        f"usage.{by}",
        f"usage, tenant-month {name}",
        root=root,
        base_url=base_url,
        token=keys.usage,
        paths=paths,
        note=f" for random tenants among {big.layout.tenants:,}",
    )


def reconciliation(root: int, base_url: str, keys: Keys, big: BigStore, requests: int) -> Row:
    """GET /v1/reconciliation of one random tenant-month; its counts must be the layout's."""
    bounds = big.layout.bounds
    paths = []
    for tenant, month in _tenant_months(big, requests, seed=7):
        params = {
            "tenant": tenant_id(tenant),
            "period": "month",
            "from": bounds[month].isoformat(),
            "to": bounds[month + 1].isoformat(),
        }

        def check(body: dict[str, Any], tenant: int = tenant, month: int = month) -> str | None:
            found = sum(int(row["count"]) for row in body.get("rows", []))
            expected = big.layout.count(tenant, month)
            if found != expected:
                return f"{tenant_id(tenant)} month {month}: count {found}, loaded {expected}"
            return None

        paths.append(("/v1/reconciliation", params, check))
    return _requests(
        "reconciliation",
        "reconciliation, tenant-month",
        root=root,
        base_url=base_url,
        token=keys.usage,
        paths=paths,
        note="; each row's count checked against the loaded events",
    )


def sdk(
    root: int,
    base_url: str,
    keys: Keys,
    *,
    processes: int,
    seconds: float,
    tenants: int,
    most: int | None = None,
) -> Row:
    """`processes` processes each reporting through tally.client as fast as they can for
    `seconds` (and at most `most` events each, if given), then flushing (sdk_worker.py)."""
    run = prefix()
    spec = {
        "url": base_url,
        "key": keys.write,
        "seconds": seconds,
        "tenants": tenants,
        "most": most,
    }
    with procs.Meter(root) as meter:
        workers = [
            subprocess.Popen(  # noqa: S603 - fixed argument list
                [
                    sys.executable,
                    "-m",
                    "bench.sdk_worker",
                    json.dumps(spec | {"prefix": f"{run}-{n}"}),
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in range(processes)
        ]
        outputs = [worker.communicate(timeout=seconds + 660) for worker in workers]
    problems: list[str] = []
    found: list[dict[str, Any]] = []
    for worker, (out, err) in zip(workers, outputs, strict=True):
        if worker.returncode != 0:
            problems.append(f"an SDK process exited with {worker.returncode}: {err[-300:]}")
            continue
        found.append(json.loads(out.strip().splitlines()[-1]))
    reported = sum(f["reported"] for f in found)
    acknowledged = sum(f["acknowledged"] for f in found)
    failed = sum(f["failed"] for f in found)
    took = max((f["seconds"] for f in found), default=0.0)
    if failed:
        problems.append(f"{failed:,} events handed back as failed")
    if acknowledged != reported:
        problems.append(f"{acknowledged:,} acknowledged of {reported:,} reported")
    if not acknowledged:
        problems.append("no event delivered")
    return Row(
        key="sdk.postgres",
        scenario=f"SDK report(), {processes} processes",
        store="postgres",
        system="tally",
        events_per_s=acknowledged / took if took else 0.0,
        cpu_percent=meter.cpu_percent,
        rss_mb=meter.rss_mb,
        count=acknowledged,
        seconds=took,
        problems=problems,
        notes=[
            f"{reported:,} reported over {seconds:.1f} s then flushed; events/s = "
            "acknowledged / time to the end of the flush (slowest process)"
        ],
    )
