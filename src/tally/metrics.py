"""What Tally measures, in Prometheus's terms (`GET /metrics`, docs/operations.md).

`Metrics` records nothing: it is the default of every service built without metrics (tests,
CLI commands). `PrometheusMetrics` records with `prometheus_client`, in one of two modes:

- in-process (a lone `tally serve`, tests): its own registry, read by `exposition`;
- multiprocess (`tally serve --workers N`): every worker writes its values to memory-mapped
  files in PROMETHEUS_MULTIPROC_DIR, a fresh private directory that `supervise` makes before
  the workers start (prometheus_client reads that variable when it is first imported, which
  in a worker is after the supervisor has set it). A scrape sums the files of every worker,
  living or dead; the in-flight gauge forgets the workers that have exited.

Labels hold only closed sets chosen by Tally (route templates, methods, status codes,
requirement error codes, limit kinds, store error kinds) and the public ids of API keys,
which only an admin can create: never a path, an attribute value, a tenant-supplied id, a key
secret or any other text a caller sends.
"""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import tempfile
import threading
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client import values as prometheus_values
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from tally.errors import StoreUnavailable
from tally.settings import Settings

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

# In multiprocess mode every change of a value first asks for the process's id, to notice a
# fork (a child must write files of its own): os.getpid() by default, a system call each
# time, about 14 times per single-event request, 3.7% of a worker's busy time under wrk
# (py-spy --gil). The id is remembered instead, and taken again in a forked child.
_pid = os.getpid()


def _forked() -> None:
    global _pid  # noqa: PLW0603 - the one process-wide fact the values need
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def process_id() -> int:
    """This process's id, as os.getpid() answers it, without a system call."""
    return _pid


if os.environ.get(MULTIPROCESS_DIR):
    prometheus_values.ValueClass = prometheus_values.MultiProcessValue(process_id)  # type: ignore[no-untyped-call]

# Request latency, in seconds: 0.25 and 1 are bucket bounds, so that the share of requests
# answered within each (the latency objectives) is exact rather than interpolated.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"  # any path no route serves: one series, whatever was asked
EVENT_OUTCOMES = ("accepted", "duplicate", "rejected")
# Why an event of an accepted request was rejected: the requirement's error code.
REJECT_REASONS = ("ERR-VAL-400", "ERR-VAL-409", "ERR-AUTH-403")
RATE_LIMIT_KINDS = ("key_requests", "key_events", "tenant_requests", "tenant_events")
# unavailable: cannot be reached, busy, full or shutting down (503); conflict: a unique
# constraint refused a write (409); internal: any other fault of the database driver (500).
STORE_ERROR_KINDS = ("unavailable", "conflict", "internal")


def tally_version() -> str:
    try:
        return version("tally")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class Metrics:
    """The events Tally measures. This base records nothing; every method is safe to call
    from any thread and never raises."""

    def request(self, *, route: str, method: str, status: int, seconds: float) -> None:
        """One HTTP request answered: its route template (UNMATCHED_ROUTE for none)."""

    def in_flight(self, change: int) -> None:
        """A request began (+1) or ended (-1)."""

    def events(self, outcomes: Iterable[tuple[str, str | None]]) -> None:
        """The events of one ingest request: (outcome, rejection reason or None) each."""

    def commit(self, *, requests: int, events: int, seconds: float, waits: Sequence[float]) -> None:
        """One group commit: its requests and events, how long the transaction took, and how
        long each request waited from handing its events over to being answered."""

    def store_error(self, kind: str) -> None:
        """A request failed in the store (one of STORE_ERROR_KINDS)."""

    def rate_limited(self, kind: str) -> None:
        """A request refused by a rate limit (one of RATE_LIMIT_KINDS)."""

    def export_read(self, *, key_id: str, lag: int) -> None:
        """A key read the export log from a cursor `lag` entries behind the log's head."""

    def exposition(self) -> bytes:
        """The text exposition of everything recorded (empty when nothing is)."""
        return b""

    @property
    def registry(self) -> CollectorRegistry | None:
        """This process's own registry; None when it has none (multiprocess, or null)."""
        return None


_ANSWERED_KEPT = 1_000  # (route, method, status) label children kept by PrometheusMetrics


def _closed(value: str, allowed: Sequence[str] | frozenset[str], other: str) -> str:
    return value if value in allowed else other


class PrometheusMetrics(Metrics):
    """Metrics in prometheus_client: in `multiprocess_dir` when given (it must be the
    PROMETHEUS_MULTIPROC_DIR this process started with), else in a registry of its own."""

    def __init__(self, *, store: str, multiprocess_dir: Path | None = None) -> None:
        self._directory = multiprocess_dir
        self._registry: CollectorRegistry | None = (
            None if multiprocess_dir is not None else CollectorRegistry()
        )
        registry = self._registry
        self._requests = Counter(
            "tally_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=registry,
        )
        self._latency = Histogram(
            "tally_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer.",
            ["route", "method", "status_class"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._in_flight = Gauge(
            "tally_http_requests_in_flight",
            "Requests being answered now.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self._events = Counter(
            "tally_events",
            "Events of ingest requests, by outcome (accepted, duplicate, rejected).",
            ["outcome"],
            registry=registry,
        )
        self._rejected = Counter(
            "tally_events_rejected",
            "Events rejected, by the requirement error code of the reason.",
            ["reason"],
            registry=registry,
        )
        self._batch_events = Histogram(
            "tally_group_commit_events",
            "Events per group-commit transaction.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self._batch_requests = Histogram(
            "tally_group_commit_requests",
            "Requests sharing one group-commit transaction.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self._commit_seconds = Histogram(
            "tally_group_commit_duration_seconds",
            "Time one group-commit transaction took, its fsync included.",
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self._wait_seconds = Histogram(
            "tally_group_commit_wait_seconds",
            "Time a request waited for its events to be committed, queueing included.",
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self._store_errors = Counter(
            "tally_store_errors",
            "Requests that failed in the store, by kind.",
            ["kind"],
            registry=registry,
        )
        self._rate_limited = Counter(
            "tally_rate_limited",
            "Requests refused by a rate limit (429), by the limit that refused.",
            ["limit"],
            registry=registry,
        )
        self._export_lag = Gauge(
            "tally_export_lag_entries",
            "Entries of the export log after the cursor a key last read from, when it read.",
            ["key"],
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self._export_read_at = Gauge(
            "tally_export_last_read_timestamp_seconds",
            "When a key last read the export log (Unix time).",
            ["key"],
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        build = Gauge(
            "tally_build_info",
            "Always 1: the version of Tally, of Python, and the kind of store.",
            ["version", "python", "store"],
            multiprocess_mode="max",
            registry=registry,
        )
        build.labels(tally_version(), platform.python_version(), store).set(1)
        # Every label value of a closed set is exposed from the start, at zero: a rate() over
        # a series that appears only at its first increment misses that increment.
        # The children of closed label sets, looked up once: labels() checks and converts
        # its values on every call, and every request counts its events and itself.
        self._outcomes = {outcome: self._events.labels(outcome) for outcome in EVENT_OUTCOMES}
        self._reasons = {reason: self._rejected.labels(reason) for reason in REJECT_REASONS}
        self._answered: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        for kind in STORE_ERROR_KINDS:
            self._store_errors.labels(kind)
        for limit in RATE_LIMIT_KINDS:
            self._rate_limited.labels(limit)

    @property
    def registry(self) -> CollectorRegistry | None:
        return self._registry

    def request(self, *, route: str, method: str, status: int, seconds: float) -> None:
        method = _closed(method, METHODS, "OTHER")
        children = self._answered.get((route, method, status))
        if children is None:
            children = (
                self._requests.labels(route, method, str(status)),
                self._latency.labels(route, method, status_class(status)),
            )
            # Routes are the app's templates and statuses a few codes; bounded all the same.
            if len(self._answered) < _ANSWERED_KEPT:
                self._answered[(route, method, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def in_flight(self, change: int) -> None:
        self._in_flight.inc(change)

    def events(self, outcomes: Iterable[tuple[str, str | None]]) -> None:
        counted = Tally(outcomes)
        for (outcome, reason), count in counted.items():
            self._outcomes.get(outcome, self._outcomes["rejected"]).inc(count)
            if reason is not None:
                self._reasons.get(reason, self._reasons["ERR-VAL-400"]).inc(count)

    def commit(self, *, requests: int, events: int, seconds: float, waits: Sequence[float]) -> None:
        self._batch_requests.observe(requests)
        self._batch_events.observe(events)
        self._commit_seconds.observe(seconds)
        for wait in waits:
            self._wait_seconds.observe(wait)

    def store_error(self, kind: str) -> None:
        self._store_errors.labels(_closed(kind, STORE_ERROR_KINDS, "internal")).inc()

    def rate_limited(self, kind: str) -> None:
        if kind in RATE_LIMIT_KINDS:
            self._rate_limited.labels(kind).inc()

    def export_read(self, *, key_id: str, lag: int) -> None:
        self._export_lag.labels(key_id).set(lag)
        self._export_read_at.labels(key_id).set_to_current_time()

    def exposition(self) -> bytes:
        if self._registry is not None:
            return generate_latest(self._registry)
        assert self._directory is not None  # noqa: S101 - one of the two is always set
        return generate_latest(directory_registry(self._directory))


def store_kind(settings: Settings) -> str:
    return "sqlite" if settings.sqlite_path is not None else "postgresql"


def open_metrics(settings: Settings) -> PrometheusMetrics:
    """The metrics of this process: multiprocess when PROMETHEUS_MULTIPROC_DIR is set (by
    `supervise`, for workers), else in-process."""
    directory = os.environ.get(MULTIPROCESS_DIR)
    return PrometheusMetrics(
        store=store_kind(settings), multiprocess_dir=Path(directory) if directory else None
    )


# --- Multiprocess mode -------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds that pid
        return True
    # A worker that has exited but is not yet reaped by its supervisor is a zombie (Linux).
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def reap_dead_workers(directory: Path) -> list[int]:
    """Forget the live gauges (requests in flight) of the workers that have exited; their
    counters and histograms stay, so that totals never go down. Returns the pids forgotten."""
    dead: set[int] = set()
    for path in directory.glob("gauge_live*_*.db"):
        digits = path.stem.rsplit("_", 1)[-1]
        if digits.isdigit() and int(digits) != os.getpid() and not _alive(int(digits)):
            dead.add(int(digits))
    for pid in dead:
        mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    return sorted(dead)


class _Workers(Collector):
    """Every worker's values in `directory`, summed, once the dead ones' live gauges are
    forgotten."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        # Not registered anywhere (None): only this collector reads it.
        self._files = MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        reap_dead_workers(self._directory)
        yield from self._files.collect()  # type: ignore[no-untyped-call]


def directory_registry(directory: Path) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Workers(directory))
    return registry


@dataclass
class Supervision:
    """What `supervise` set up: the directory of the workers' files, and the metrics server
    on TALLY_METRICS_PORT (None when /metrics is on the API port)."""

    directory: Path | None
    server: WSGIServer | None
    thread: threading.Thread | None

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def check_port(settings: Settings, *, api_port: int) -> None:
    """Raises ValueError, saying what to set, when TALLY_METRICS_PORT is the API's port."""
    if settings.metrics_port is not None and settings.metrics_port == api_port:
        raise ValueError(
            f"TALLY_METRICS_PORT ({settings.metrics_port}) is the API's port: choose another, "
            "or leave it unset to serve /metrics on the API port"
        )


def supervise(settings: Settings, *, workers: int, api_port: int) -> Supervision:
    """Prepare the metrics of `tally serve`, before any worker starts, undone at exit.

    With several workers: a fresh private directory as PROMETHEUS_MULTIPROC_DIR, which the
    workers inherit. With TALLY_METRICS_PORT: the metrics server, here in the supervisor
    reading that directory (a lone worker's own process serves its registry instead, see
    api/metrics.py). Raises ValueError when the metrics port is the API's, OSError when it
    cannot be bound.
    """
    check_port(settings, api_port=api_port)
    directory: Path | None = None
    if workers > 1:
        directory = Path(tempfile.mkdtemp(prefix="tally-metrics-"))  # 0700, empty
        os.environ[MULTIPROCESS_DIR] = str(directory)
    server: WSGIServer | None = None
    thread: threading.Thread | None = None
    if directory is not None and settings.metrics_port is not None:
        registry = directory_registry(directory)
        server, thread = start_http_server(
            settings.metrics_port, addr=settings.metrics_host, registry=registry
        )
    supervision = Supervision(directory, server, thread)
    atexit.register(supervision.close)
    return supervision


def serve_registry(settings: Settings, metrics: Metrics) -> Supervision | None:
    """In a lone `tally serve` process with TALLY_METRICS_PORT, the metrics server over its
    own registry (None otherwise: no port, or workers, whose supervisor serves them)."""
    if settings.metrics_port is None or metrics.registry is None:
        return None
    server, thread = start_http_server(
        settings.metrics_port, addr=settings.metrics_host, registry=metrics.registry
    )
    return Supervision(None, server, thread)


NULL = Metrics()


def of_state(state: object) -> Metrics:
    """The metrics of an app, from its `state` (the null ones before its services exist)."""
    found = getattr(getattr(state, "services", None), "metrics", None)
    return found if isinstance(found, Metrics) else NULL


def store_error_kind(error: BaseException) -> str | None:
    """The STORE_ERROR_KINDS entry of a request's failure, None when it is not the store's:
    a database driver's error is `conflict` for a transaction the database rolled back
    (SQLSTATE class 40: serialization failure, deadlock), else `internal`."""
    if isinstance(error, StoreUnavailable):
        return "unavailable"
    if not type(error).__module__.startswith(("psycopg", "sqlite3")):
        return None
    sqlstate = getattr(error, "sqlstate", None)
    return "conflict" if isinstance(sqlstate, str) and sqlstate.startswith("40") else "internal"
