"""Fault injection: SDK load that survives what a scenario does, and the ledger that checks it.

A scenario starts real `tally serve` processes (tests/support/server.py), runs `Senders`
(threads, each with its own SDK `Client`) while it kills servers, stops the database or fills
the disk, then stops the senders: `close()` returns only once every reported event is
acknowledged or handed back as failed. The `Ledger` then holds the acknowledged ids, and
`Count.of` compares them with what the store exports: `lost` acknowledged ids missing,
`duplicated` ids exported more than once. Each count is printed as one `scenario=…` line and
kept in LINES for the suite's terminal summary (tests/faults/conftest.py).

No pytest here, so the module can drive a fault from a script too.
"""

from __future__ import annotations

import errno
import logging
import random
import resource
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Protocol

from tally.client import Client, Event, Failure

# The scenario lines printed so far in this process, for the terminal summary.
LINES: list[str] = []


# --- load and the ledger ---------------------------------------------------------------------


@dataclass
class Ledger:
    """What SDK clients were told: every id reported, the events handed back as failed, and
    the acknowledgement counts of their flush results. Shared by the sender threads."""

    reported: list[str] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    acknowledged_count: int = 0
    pending: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_failure(self, failures: Sequence[Failure]) -> None:
        with self.lock:
            self.failed.extend(failures)

    def add_acknowledged(self, ids: Sequence[str]) -> None:
        """Ids acknowledged outside the SDK (a scenario's own requests)."""
        with self.lock:
            self.reported.extend(ids)
            self.acknowledged_count += len(ids)

    @property
    def acknowledged(self) -> set[str]:
        """The ids Tally acknowledged: every one reported and not handed back (the SDK's
        contract: each reported event ends acknowledged or failed)."""
        with self.lock:
            return set(self.reported) - {str(f.event["id"]) for f in self.failed}


class Retries(logging.Handler):
    """Counts the SDK's retries by the status that caused them (None: no answer), from its
    `tally_client_retry` log records: proof that the clients met the fault."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.by_status: Counter[int | None] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "tally_client_retry":
            self.by_status[getattr(record, "status", None)] += 1


class Senders:
    """`clients` SDK clients over `base_urls`, each reporting from its own thread about one
    event every `pace` seconds until `stop()`. The SDK retries what got no answer or a 503
    (with the same ids) for up to `deadline` seconds, failing over between the URLs; `retries`
    counts those retries.
    """

    def __init__(
        self,
        base_urls: str | Sequence[str],
        key: str,
        *,
        clients: int = 3,
        pace: float = 0.01,
        deadline: float = 60.0,
        ledger: Ledger | None = None,
    ) -> None:
        self.ledger = ledger or Ledger()
        self.clients = [
            Client(
                base_urls,
                key,
                batch_size=25,
                max_delay=0.05,
                timeout=5.0,
                deadline=deadline,
                on_failure=self.ledger.on_failure,
            )
            for _ in range(clients)
        ]
        self._pace = pace
        self.retries = Retries()
        self._logger = logging.getLogger("tally.client")
        self._level = self._logger.level
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._produce, args=(n, client), daemon=True)
            for n, client in enumerate(self.clients)
        ]

    def _produce(self, number: int, client: Client) -> None:
        n = 0
        while not self._stopping.is_set():
            n += 1
            event = Event(
                tenant="acme",
                type="compute.vcpu_seconds",
                quantity=Decimal(n % 9) + Decimal("0.25"),
                subject=f"vm-{number}",
                attributes={"sender": number, "n": n},
            )
            identifier = client.report(event)
            with self.ledger.lock:
                self.ledger.reported.append(identifier)
            time.sleep(self._pace)

    def __enter__(self) -> Senders:
        self._logger.addHandler(self.retries)
        self._logger.setLevel(logging.DEBUG)
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reported(self) -> int:
        with self.ledger.lock:
            return len(self.ledger.reported)

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        """Until `count` more events than now were reported (so load is flowing)."""
        target = self.reported() + count
        deadline = time.monotonic() + timeout
        while self.reported() < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the senders reported fewer than {count} events")
            time.sleep(0.01)

    def stop(self) -> Ledger:
        """Stop reporting and close every client: returns once each event is settled."""
        if not self._stopping.is_set():
            self._stopping.set()
            for thread in self._threads:
                thread.join()
            for client in self.clients:
                result = client.close()
                with self.ledger.lock:
                    self.ledger.acknowledged_count += result.acknowledged
                    self.ledger.pending += result.pending
            self._logger.removeHandler(self.retries)
            self._logger.setLevel(self._level)
        return self.ledger


@dataclass(frozen=True)
class Count:
    """A scenario's outcome: `acknowledged` ids, `stored` entries read back, `lost`
    acknowledged ids not among them, `duplicated` entries beyond the first of their id."""

    scenario: str
    acknowledged: int
    stored: int
    lost: int
    duplicated: int
    missing: tuple[str, ...]  # the first few lost ids, for the assertion message

    @property
    def line(self) -> str:
        return (
            f"scenario={self.scenario} acknowledged={self.acknowledged} stored={self.stored} "
            f"lost={self.lost} duplicated={self.duplicated}"
        )

    @classmethod
    def of(cls, scenario: str, ledger: Ledger, stored_ids: Sequence[str]) -> Count:
        """Compare the ledger with `stored_ids` (as read back, repeats kept), print the
        scenario's line and keep it for the summary. Raises AssertionError when the ledger
        itself is not settled: an event neither acknowledged nor failed, or one failed (the
        faults are short enough for the SDK's deadline: a failure is a finding)."""
        assert ledger.pending == 0, f"{ledger.pending} events were never settled"
        assert not ledger.failed, f"the SDK handed back events: {ledger.failed[:3]}"
        acknowledged = ledger.acknowledged
        assert ledger.acknowledged_count == len(acknowledged) == len(ledger.reported)
        copies = Counter(stored_ids)
        lost = sorted(acknowledged - set(copies))
        count = cls(
            scenario=scenario,
            acknowledged=len(acknowledged),
            stored=len(stored_ids),
            lost=len(lost),
            duplicated=sum(n - 1 for n in copies.values()),
            missing=tuple(lost[:5]),
        )
        print(count.line)  # noqa: T201 - the scenario's line is the suite's output
        LINES.append(count.line)
        return count

    def assert_exactly_once(self, *, at_least: int = 100) -> None:
        assert self.lost == 0, f"{self.line}: lost {list(self.missing)}"
        assert self.duplicated == 0, self.line
        assert self.acknowledged >= at_least, f"{self.line}: too little load to prove anything"


# --- processes -------------------------------------------------------------------------------


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL, and reap it: no drain, whatever was in flight gets no answer."""
    process.kill()
    process.wait(timeout=10)


def pause(rng: random.Random, low: float, high: float) -> None:
    time.sleep(rng.uniform(low, high))


# --- a full disk -----------------------------------------------------------------------------


@contextmanager
def tmpfs(path: Path, size: str, *, owner: tuple[int, int] | None = None) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax: "8m") mounted at `path` (made), owned by `owner`
    (uid, gid) when given; unmounted on exit. Raises PermissionError when mounting is not
    permitted (not root, or no CAP_SYS_ADMIN in this container)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0700"
    if owner is not None:
        options += f",uid={owner[0]},gid={owner[1]}"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        raise PermissionError(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


class Space(Protocol):
    """A way to run a store out of space, and to give the space back."""

    def exhaust(self) -> None: ...

    def restore(self) -> None: ...


@dataclass
class Filling:
    """Fills the filesystem of `folder` with a file, and deletes it."""

    folder: Path

    @property
    def filler(self) -> Path:
        return self.folder / "filler"

    def exhaust(self) -> None:
        """Write the file until the filesystem has no space left (ENOSPC)."""
        with self.filler.open("wb", buffering=0) as out:
            # Big chunks, then single pages: no page is left for SQLite or PostgreSQL.
            for chunk in (b"\0" * 65536, b"\0" * 4096):
                try:
                    while True:
                        out.write(chunk)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise

    def restore(self) -> None:
        self.filler.unlink()


@dataclass
class FileSizeLimit:
    """Limits the files process `pid` writes (RLIMIT_FSIZE) to the size of the largest file
    in `folder` now, and lifts the limit. A write past it fails with EFBIG (Python ignores
    SIGXFSZ), as one on a full disk fails with ENOSPC: for where mounting is not permitted."""

    pid: int
    folder: Path

    def _limit(self, soft: int) -> None:
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (soft, resource.RLIM_INFINITY))

    def exhaust(self) -> None:
        sizes = [entry.stat().st_size for entry in self.folder.iterdir() if entry.is_file()]
        self._limit(max(sizes, default=0))

    def restore(self) -> None:
        self._limit(resource.RLIM_INFINITY)
