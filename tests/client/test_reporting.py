"""The SDK's reporting half against real `tally serve` processes on SQLite: every reported
event is acknowledged exactly once or handed back as failed, never dropped."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest

from tally.client import BufferFull, Client, Event, Failure, TallyError
from tally.client.events import encode
from tests.client.conftest import ENV, Deployment, deploy, exported_ids, register
from tests.support.server import free_port, running_server


def usage(n: int, **fields: object) -> Event:
    values: dict[str, object] = {"tenant": "acme", "type": "compute.vcpu_seconds"}
    values |= {"quantity": Decimal("0.1"), "subject": f"vm-{n % 7}", "unit": "s"} | fields
    return Event(**values)  # type: ignore[arg-type]


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


class Collected:
    """An on_failure callback that keeps what it was given."""

    def __init__(self) -> None:
        self.failures: list[Failure] = []
        self.lock = threading.Lock()

    def __call__(self, failures: Sequence[Failure]) -> None:
        with self.lock:
            self.failures.extend(failures)


def test_events_reported_from_many_threads_land_exactly_once(deployment: Deployment) -> None:
    ids: list[str] = []
    lock = threading.Lock()
    with Client(deployment.server.base_url, deployment.writer, batch_size=100) as client:

        def produce(worker: int) -> None:
            for n in range(125):
                identifier = client.report(usage(n, attributes={"worker": worker}))
                with lock:
                    ids.append(identifier)

        threads = [threading.Thread(target=produce, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        result = client.flush()
    assert result.failed == ()
    assert (result.acknowledged, result.duplicates, result.pending) == (1000, 0, 0)
    exported = exported_ids(deployment.server, deployment.reader)
    assert len(exported) == 1000
    assert sorted(exported) == sorted(ids)


def test_a_server_killed_mid_stream_and_restarted_acknowledges_every_event_once(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tally.client")
    ids: list[str] = []
    with running_server(sqlite_url, tmp_path, env=ENV, label="first") as first:
        writer, reader = register(first)
        client = Client(first.base_url, writer, batch_size=20, max_delay=0.02, deadline=60)

        def produce() -> None:
            for n in range(600):
                ids.append(client.report(usage(n)))
                time.sleep(0.001)

        producer = threading.Thread(target=produce)
        producer.start()
        while len(ids) < 200:
            time.sleep(0.01)
        first.process.kill()  # SIGKILL: no drain, batches in flight get no answer
        first.process.wait()
    assert producer.is_alive(), "the kill came after the stream ended"
    with running_server(sqlite_url, tmp_path, env=ENV, port=first.port, label="second") as second:
        producer.join()
        result = client.close()
        exported = exported_ids(second, reader)
    assert result.failed == ()
    assert result.acknowledged == 600
    assert sorted(exported) == sorted(ids)
    assert len(set(exported)) == 600
    retried = [r for r in caplog.records if r.getMessage() == "tally_client_retry"]
    assert any(getattr(r, "status", 0) is None for r in retried), "no request met the dead server"


def test_fails_over_from_a_dead_base_url_and_stays_on_the_live_one(
    deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    live = deployment.server.base_url
    with Client([dead_url(), live], deployment.writer, batch_size=10) as client:
        ids = [client.report(usage(n)) for n in range(10)]
        assert client.flush().acknowledged == 10
        assert client.active_base_url == live
        ids += [client.report(usage(n)) for n in range(10)]
        assert client.flush().acknowledged == 10
    failovers = [r for r in caplog.records if r.getMessage() == "tally_client_failover"]
    assert len(failovers) == 1  # the second batch went straight to the live server
    assert sorted(exported_ids(deployment.server, deployment.reader)) == sorted(ids)


def test_a_rate_limited_batch_waits_retry_after_then_lands(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tally.client")
    limit = {"TALLY_RATE_KEY_REQUESTS_PER_SECOND": "1", "TALLY_RATE_KEY_REQUESTS_BURST": "2"}
    for deployment in deploy(sqlite_url, tmp_path, limit):
        started = time.monotonic()
        with Client(deployment.server.base_url, deployment.writer, batch_size=1) as client:
            ids = [client.report(usage(n)) for n in range(5)]
            result = client.flush()
        assert result.acknowledged == 5
        assert result.failed == ()
        limited = [
            r
            for r in caplog.records
            if r.getMessage() == "tally_client_retry" and getattr(r, "status", None) == 429
        ]
        assert limited, "the server never answered 429"
        assert all(getattr(r, "delay", 0) >= 1.0 for r in limited)  # Retry-After: at least 1
        assert time.monotonic() - started >= 2.0
        assert sorted(exported_ids(deployment.server, deployment.reader)) == sorted(ids)


def test_a_rejected_event_is_handed_back_with_its_pointer(deployment: Deployment) -> None:
    collected = Collected()
    with Client(deployment.server.base_url, deployment.writer, on_failure=collected) as client:
        good = client.report(usage(1))
        bad = client.report(usage(2, quantity="-5"))
        result = client.flush()
    assert result.acknowledged == 1
    (failure,) = result.failed
    assert failure.event["id"] == bad
    assert failure.status == 200
    assert [e["pointer"] for e in failure.errors] == ["/quantity"]
    assert collected.failures == [failure]
    assert exported_ids(deployment.server, deployment.reader) == [good]


def test_a_client_left_open_at_exit_still_delivers_its_events(deployment: Deployment) -> None:
    script = (
        "import sys\n"
        "from tally.client import Client\n"
        "client = Client(sys.argv[1], sys.argv[2], max_delay=60)\n"
        "print(client.report({'tenant': 'acme', 'type': 't', 'quantity': 1}))\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script, deployment.server.base_url, deployment.writer],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert exported_ids(deployment.server, deployment.reader) == [ran.stdout.strip()]


def test_on_failure_may_report_again_without_waiting_for_itself(
    deployment: Deployment,
) -> None:
    again: list[str] = []
    url = deployment.server.base_url

    def report_again(failures: Sequence[Failure]) -> None:
        for failure in failures:
            fixed = failure.event | {"quantity": "5"}
            again.append(client.report(fixed))

    # With room, the callback's event is sent like any other.
    client = Client(url, deployment.writer, batch_size=1, max_buffered=2, on_failure=report_again)
    client.report(usage(1, quantity="-5"))
    assert len(client.flush(timeout=30).failed) == 1
    assert client.close(timeout=30).acknowledged == 1
    assert exported_ids(deployment.server, deployment.reader) == again
    # Without room (the one buffered event is the failed one), its report raises at once
    # rather than wait for the thread it runs in, and the sender carries on.
    again.clear()
    client = Client(url, deployment.writer, batch_size=1, max_buffered=1, on_failure=report_again)
    client.report(usage(2, quantity="-5"))
    first = client.flush(timeout=30)
    second = client.close(timeout=30)
    assert (len(first.failed), first.pending, again) == (1, 0, [])
    assert second.pending == 0


def test_a_refused_batch_is_handed_back_with_the_problem_document(
    deployment: Deployment,
) -> None:
    # The read key may not write: every event of the batch comes back with the 403.
    with Client(deployment.server.base_url, deployment.reader, max_delay=0.01) as client:
        for n in range(3):
            client.report(usage(n))
        result = client.close()
    assert len(result.failed) == 3
    assert {f.status for f in result.failed} == {403}
    assert {f.problem["code"] for f in result.failed if f.problem} == {"ERR-AUTH-403"}


def test_close_with_the_server_down_past_the_deadline_hands_every_event_back(
    sqlite_url: str, tmp_path: Path
) -> None:
    for deployment in deploy(sqlite_url, tmp_path):
        base_url, writer = deployment.server.base_url, deployment.writer
    collected = Collected()  # the server has stopped
    client = Client(base_url, writer, batch_size=1, deadline=1.5, on_failure=collected)
    ids = [client.report(usage(n)) for n in range(35)]
    started = time.monotonic()
    result = client.close()
    # The deadline runs from each event's report, not from when its batch left: 35 batches
    # are handed back within about one deadline, not one after another.
    assert time.monotonic() - started < 8
    assert sorted(f.event["id"] for f in result.failed) == sorted(ids)
    assert {f.status for f in result.failed} == {None}
    assert {f.problem["title"] for f in result.failed if f.problem} == {
        "Tally could not be reached"
    }
    assert sorted(f.event["id"] for f in collected.failures) == sorted(ids)
    assert result.acknowledged == 0
    assert client.close() == type(result)()  # a second close has nothing left


def test_a_batch_over_the_servers_body_limit_is_split_until_it_fits(
    sqlite_url: str, tmp_path: Path
) -> None:
    for deployment in deploy(sqlite_url, tmp_path, {"TALLY_MAX_BODY_BYTES": "4096"}):
        with Client(deployment.server.base_url, deployment.writer, batch_size=60) as client:
            ids = [client.report(usage(n)) for n in range(60)]  # about 10 KB in one batch
            result = client.flush()
        assert (result.acknowledged, result.failed) == (60, ())
        assert sorted(exported_ids(deployment.server, deployment.reader)) == sorted(ids)


def test_close_with_a_timeout_hands_back_what_is_unacknowledged_by_then() -> None:
    client = Client(dead_url(), "tly_unused", batch_size=5, deadline=600)
    ids = [client.report(usage(n)) for n in range(12)]
    started = time.monotonic()
    result = client.close(timeout=0.5)
    assert time.monotonic() - started < 5
    assert sorted(f.event["id"] for f in result.failed) == sorted(ids)


def test_a_full_buffer_blocks_report_and_raises_after_its_timeout() -> None:
    client = Client(dead_url(), "tly_unused", batch_size=1, max_buffered=3, deadline=600)
    for n in range(3):
        client.report(usage(n))
    started = time.monotonic()
    with pytest.raises(BufferFull):
        client.report(usage(4), timeout=0.3)
    assert time.monotonic() - started >= 0.3
    assert len(client.close(timeout=0.2).failed) == 3


def test_an_event_keeps_its_id_time_and_exact_quantity() -> None:
    wire, body = encode(Event(tenant="acme", type="t", quantity=Decimal("1E+2"), id="mine"))
    assert (wire["id"], wire["quantity"]) == ("mine", "100")
    assert wire["time"].endswith("Z")
    assert b'"quantity":"100"' in body
    fresh, _ = encode({"tenant": "acme", "type": "t", "quantity": 3})
    assert len(fresh["id"]) == 32 and fresh["id"][12] == "7"  # a UUIDv7 in hex
    assert fresh["quantity"] == "3"
    for inexact in (0.1, True):
        with pytest.raises(TypeError, match="quantity"):
            encode({"tenant": "acme", "type": "t", "quantity": inexact})
    with pytest.raises(ValueError, match="naive"):
        encode(Event(tenant="acme", type="t", quantity=1, time=datetime(2026, 1, 1)))


def test_the_key_never_reaches_an_exception_a_repr_or_a_log(
    deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = deployment.writer
    with Client([dead_url(), deployment.server.base_url], key) as client:
        client.report(usage(1, quantity="-1"))
        failures = client.flush().failed
        with pytest.raises(TallyError) as refused:
            list(client.export())  # a write key may not read: 403
        texts = [repr(client), str(refused.value), repr(refused.value), repr(failures)]
    assert refused.value.status == 403
    assert failures
    assert caplog.records
    for text in [*texts, caplog.text]:
        assert key not in text
        assert key[4:] not in text
