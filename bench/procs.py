"""CPU time and memory of a server's whole process tree (the server and its worker
children), read from Linux's /proc."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    return text.rsplit(")", 1)[1].split()


def tree(root: int) -> list[int]:
    """`root` and every process descended from it that is alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of `pids` so far."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


def _status_kb(pid: int, name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peaks(pids: list[int]) -> None:
    """Reset each process's peak RSS (VmHWM) to its current RSS (`clear_refs` 5), so that
    the next reading is the peak of what follows. Ignored where the kernel refuses."""
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_mb(pids: list[int]) -> float:
    """The largest peak RSS (VmHWM) among `pids`, in MB (10^6 bytes)."""
    return max((_status_kb(pid, "VmHWM") for pid in pids), default=0) * 1024 / 1e6


@dataclass
class Meter:
    """CPU and peak RSS of one server's process tree over one measured span."""

    root: int
    pids: list[int] | None = None
    cpu_before: float = 0.0
    began: float = 0.0
    cpu_percent: float = 0.0
    rss_mb: float = 0.0
    seconds: float = 0.0

    def __enter__(self) -> Meter:
        self.pids = tree(self.root)
        reset_peaks(self.pids)
        self.cpu_before = cpu_seconds(self.pids)
        self.began = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self.began
        pids = sorted(set(self.pids or []) | set(tree(self.root)))
        used = cpu_seconds(pids) - self.cpu_before
        self.cpu_percent = 100 * used / self.seconds if self.seconds else 0.0
        # The supervisor (root) is not a worker when there are children serving.
        workers = [pid for pid in pids if pid != self.root] or [self.root]
        self.rss_mb = peak_rss_mb(workers)


def settle(root: int, *, idle_percent: float = 15.0, timeout: float = 120.0) -> float:
    """Wait until `root`'s process tree is idle (below `idle_percent` of a core over 0.25 s):
    a load that wrk stopped may leave requests queued in the server, which would otherwise
    be served during the next measurement. Returns the seconds waited."""
    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        pids = tree(root)
        before = cpu_seconds(pids)
        time.sleep(0.25)
        if 100 * (cpu_seconds(pids) - before) / 0.25 < idle_percent:
            break
    return time.perf_counter() - began
