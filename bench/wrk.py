"""wrk, driven by events.lua: one measured load and what it says about validity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "events.lua"
MAX_REQUESTS_PER_THREAD = 100_000_000
DUP_EVERY = 100  # 1% of the events of a batch repeat earlier ones


def rfc3339_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def version() -> str:
    found = subprocess.run(  # noqa: S603 - fixed argument list
        [shutil.which("wrk") or "wrk", "--version"], capture_output=True, text=True, check=False
    )
    text = found.stdout or found.stderr or "?"
    return (text.splitlines() or ["?"])[0].split(" [")[0]


@dataclass(frozen=True)
class Load:
    """What one wrk run measured (events.lua's BENCH_RESULT line)."""

    raw: dict[str, float]
    batch: int
    connections: int

    def get(self, name: str) -> int:
        return int(self.raw.get(name, 0))

    @property
    def seconds(self) -> float:
        return self.raw["duration_us"] / 1e6

    @property
    def requests_per_s(self) -> float:
        return self.get("ok") / self.seconds

    @property
    def events_per_s(self) -> float:
        """Events answered accepted or duplicate (stored), per second."""
        return (self.get("accepted") + self.get("duplicates")) / self.seconds

    @property
    def p50_ms(self) -> float:
        return self.get("p50_us") / 1000

    @property
    def p99_ms(self) -> float:
        return self.get("p99_us") / 1000

    def problems(self) -> list[str]:
        """Why the figure is not valid; empty when it is."""
        found: list[str] = []
        socket = {
            name: self.get(name)
            for name in ("connect_errors", "read_errors", "write_errors", "timeouts")
        }
        if any(socket.values()):
            found.append(f"socket errors {socket}")
        if self.get("non2xx"):
            found.append(f"{self.get('non2xx')} non-2xx responses")
        if self.get("rejected"):
            found.append(f"{self.get('rejected')} events rejected")
        stored = self.get("accepted") + self.get("duplicates")
        if stored != self.get("answered_events"):
            found.append(
                f"{self.get('answered_events')} events answered 2xx but only {stored} "
                "accepted or duplicate"
            )
        if self.batch > 1 and self.get("duplicates") != self.get("dup_answered"):
            # One connection per thread: each answer is for the request just made, whose
            # repeats (of the request answered before it) must all come back as duplicates.
            found.append(
                f"{self.get('duplicates')} duplicates answered for the "
                f"{self.get('dup_answered')} repeats the answered requests carried"
            )
        if self.get("capped"):
            found.append("a wrk thread hit the request cap: the rate is a lower bound")
        if self.get("ok") == 0:
            found.append("no successful request")
        return found


def run(
    url: str,
    *,
    token: str,
    prefix: str,
    seconds: int,
    connections: int,
    threads: int,
    batch: int = 1,
    tenants: int = 1,
    rate: float = 0.0,
) -> Load:
    """wrk against `url` (POST /v1/events) for `seconds`; raises RuntimeError when wrk fails.

    Batches run one connection per wrk thread: a thread's requests are then strictly one
    after the other, so the request before the current one has been answered, and the
    events a batch repeats from it (the last answered one) are stored: duplicates, never racing
    their originals.
    """
    threads = connections if batch > 1 else max(1, min(threads, connections))
    env = os.environ | {
        "BENCH_TOKEN": token,
        "BENCH_PREFIX": prefix,
        "BENCH_TIME": rfc3339_now(),
        "BENCH_TENANTS": str(tenants),
        "BENCH_BATCH": str(batch),
        "BENCH_DUP_EVERY": str(DUP_EVERY if batch >= DUP_EVERY else 0),
        "BENCH_RATE": f"{rate:.1f}",
        "BENCH_THREADS": str(threads),
        "BENCH_MAX_REQUESTS": str(MAX_REQUESTS_PER_THREAD),
    }
    command = [
        shutil.which("wrk") or "wrk",
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={seconds}s",
        "--timeout=10s",
        f"--script={SCRIPT}",
        f"{url}/v1/events",
    ]
    done = subprocess.run(  # noqa: S603 - fixed argument list; the target is 127.0.0.1
        command, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            raw = json.loads(line.removeprefix("BENCH_RESULT "))
            return Load(raw=raw, batch=batch, connections=connections)
    raise RuntimeError(f"wrk printed no BENCH_RESULT line:\n{done.stdout}\n{done.stderr}")
