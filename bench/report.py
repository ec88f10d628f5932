"""The figures of one run: rows, the issue's targets, and their printing as text, JSON and
Markdown."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One measured line. `key` names it stably (`single.postgres`, `ref.peer.batch`...)."""

    key: str
    scenario: str
    store: str
    system: str  # tally | peer | bare-asgi | postgres
    requests_per_s: float | None = None
    events_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_percent: float | None = None
    rss_mb: float | None = None
    count: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ratio_peer: float | None = None
    ratio_limit: float | None = None
    limit: str | None = None

    @property
    def valid(self) -> bool:
        return not self.problems

    @property
    def rate(self) -> float:
        """The throughput the ratios compare: events/s, else requests/s."""
        return self.events_per_s or self.requests_per_s or 0.0


@dataclass
class Results:
    started: str
    options: dict[str, Any]
    machine: dict[str, str]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def get(self, key: str) -> Row | None:
        return next((row for row in self.rows if row.key == key), None)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row


def merged(rows: list[Row], scenario: str) -> Row:
    """One row for several loads of the same key (growth's turns): the mean rates, latency
    and CPU, the worst p99 and RSS, and each turn's rate in a note."""
    first = rows[0]

    def mean(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return sum(known) / len(known) if len(known) == len(values) else None

    def most(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return max(known) if known else None

    row = Row(
        key=first.key,
        scenario=scenario,
        store=first.store,
        system=first.system,
        requests_per_s=mean([r.requests_per_s for r in rows]),
        events_per_s=mean([r.events_per_s for r in rows]),
        p50_ms=mean([r.p50_ms for r in rows]),
        p99_ms=most([r.p99_ms for r in rows]),
        cpu_percent=mean([r.cpu_percent for r in rows]),
        rss_mb=most([r.rss_mb for r in rows]),
        count=sum(r.count for r in rows),
        seconds=sum(r.seconds for r in rows),
        problems=[problem for r in rows for problem in r.problems],
        notes=[note for r in rows for note in r.notes[:1]],
    )
    turns = ", ".join(f"{r.rate:,.0f}" for r in rows)
    row.notes.insert(0, f"the mean of {len(rows)} turn(s): {turns} events/s")
    return row


# Which row each measured row is compared with: (peer row, limit row, limit's name).
COMPARED = {
    "single.postgres": ("ref.peer.single", "ref.bare.single", "bare ASGI"),
    "single.sqlite": ("ref.peer.single", "ref.bare.single", "bare ASGI"),
    "single80.postgres": (None, "ref.bare.single", "bare ASGI"),
    "batch.postgres": ("ref.peer.batch", "ref.copy.in", "COPY in"),
    "batch.sqlite": ("ref.peer.batch", "ref.copy.in", "COPY in"),
    "sdk.postgres": ("ref.peer.batch", "ref.copy.in", "COPY in"),
    "export.json": (None, "ref.copy.out", "COPY TO"),
    "export.ndjson": (None, "ref.copy.out", "COPY TO"),
    "ref.peer.single": (None, "ref.bare.single", "bare ASGI"),
    "ref.peer.batch": (None, "ref.copy.in", "COPY in"),
    "growth.big": (None, "growth.empty", "empty store"),
}


def compare(results: Results) -> None:
    """Fill each row's ratios from the rows of the same run."""
    for row in results.rows:
        peer_key, limit_key, name = COMPARED.get(row.key, (None, None, None))
        peer = results.get(peer_key) if peer_key else None
        limit = results.get(limit_key) if limit_key else None
        if peer is not None and peer.rate:
            row.ratio_peer = row.rate / peer.rate
        if limit is not None and limit.rate:
            row.ratio_limit = row.rate / limit.rate
            row.limit = name


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    verdict: str  # PASS | MISS | n/a (not measured) | INVALID (measured, figure not valid)


def _verdict(rows: list[Row | None], passed: bool) -> str:
    if not all(row.valid for row in rows if row is not None):
        return "INVALID"
    return "PASS" if passed else "MISS"


def _num(value: float | None, digits: int = 0, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


# Issue 10's targets: (name, row, figure of the row, ">=" or "<=", bound, unit, other rows
# the figure needs). A unit "%" shows a ratio as a percentage.
TARGETS = (
    ("single-event PG >= 5,000 req/s", "single.postgres", "requests_per_s", ">=", 5000,
     "req/s", ()),
    ("single-event PG >= 5x the peer", "single.postgres", "ratio_peer", ">=", 5, "x",
     ("ref.peer.single",)),
    ("single-event PG >= 20% of bare ASGI", "single.postgres", "ratio_limit", ">=", 0.2, "%",
     ("ref.bare.single",)),
    ("single-event PG p99 <= 25 ms at 80% load", "single80.postgres", "p99_ms", "<=", 25, "ms",
     ()),
    ("batch PG >= 50,000 events/s", "batch.postgres", "events_per_s", ">=", 50_000, "ev/s", ()),
    ("batch PG >= 3x the peer", "batch.postgres", "ratio_peer", ">=", 3, "x",
     ("ref.peer.batch",)),
    ("batch PG >= 40% of COPY in", "batch.postgres", "ratio_limit", ">=", 0.4, "%",
     ("ref.copy.in",)),
    ("batch SQLite >= 50,000 events/s", "batch.sqlite", "events_per_s", ">=", 50_000, "ev/s",
     ()),
    ("NDJSON export >= 100,000 events/s", "export.ndjson", "events_per_s", ">=", 100_000,
     "ev/s", ()),
    ("NDJSON export >= 50% of COPY TO", "export.ndjson", "ratio_limit", ">=", 0.5, "%",
     ("ref.copy.out",)),
    ("usage p99 <= 200 ms, by subject and day", "usage.subject_day", "p99_ms", "<=", 200, "ms",
     ()),
    ("usage p99 <= 200 ms, by an attribute", "usage.attribute", "p99_ms", "<=", 200, "ms", ()),
    ("growth: big-store batch rate >= 80% of empty", "growth.big", "ratio_limit", ">=", 0.8,
     "%", ("growth.empty",)),
)  # fmt: skip
RSS_BOUND_MB = 300


def targets(results: Results) -> list[Target]:
    """Issue 10's targets against this run's figures."""
    found: list[Target] = []
    for name, key, figure, sense, bound, unit, needs in TARGETS:
        row = results.get(key)
        value = getattr(row, figure) if row is not None else None
        rows = [row, *(results.get(other) for other in needs)]
        if value is None or any(r is None for r in rows):
            found.append(Target(name, "-", "n/a"))
            continue
        passed = value >= bound if sense == ">=" else value <= bound
        shown = (
            _num(100 * value, 1, "%") if unit == "%"
            else _num(value, 2 if unit == "x" else (1 if unit == "ms" else 0), f" {unit}")
        )  # fmt: skip
        found.append(Target(name, shown, _verdict(rows, passed)))
    tally = [row for row in results.rows if row.system == "tally" and row.rss_mb is not None]
    peak = max((row.rss_mb or 0 for row in tally), default=None)
    verdict = "n/a" if peak is None else ("PASS" if peak <= RSS_BOUND_MB else "MISS")
    found.append(
        Target(f"RSS <= {RSS_BOUND_MB} MB per worker throughout", _num(peak, 0, " MB"), verdict)
    )
    return found


HEADER = (
    "scenario",
    "store",
    "system",
    "req/s",
    "events/s",
    "p50 ms",
    "p99 ms",
    "srv CPU",
    "RSS/wkr MB",
    "vs peer",
    "vs limit",
    "valid",
)


def _cells(row: Row) -> tuple[str, ...]:
    limit = "-" if row.ratio_limit is None else f"{row.ratio_limit:.2f}x {row.limit}"
    return (
        row.scenario,
        row.store,
        row.system,
        _num(row.requests_per_s),
        _num(row.events_per_s),
        _num(row.p50_ms, 1),
        _num(row.p99_ms, 1),
        _num(row.cpu_percent, 0, "%"),
        _num(row.rss_mb, 0),
        _num(row.ratio_peer, 2, "x"),
        limit,
        "yes" if row.valid else "NO",
    )


def text(results: Results) -> str:
    lines = [f"Tally benchmark, {results.started}"]
    lines += [f"  {name:<11} {value}" for name, value in results.machine.items()]
    options = ", ".join(f"{k}={v}" for k, v in results.options.items())
    lines += [f"  options     {options}", ""]
    table = [HEADER, *(_cells(row) for row in results.rows)]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(HEADER))]
    for cells in table:
        lines.append(
            "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )
    lines += [
        "(srv CPU: CPU time of the server's processes over wall time, 100% = one core; "
        "RSS/wkr: the largest peak RSS (VmHWM) of one server process during the scenario)",
        "",
        "targets (issue 10):",
    ]
    found = targets(results)
    width = max(len(t.name) for t in found)
    lines += [f"  {t.verdict:<7} {t.name:<{width}}  {t.measured}" for t in found]
    notes = [f"{row.key}: {note}" for row in results.rows for note in row.notes]
    problems = [f"{row.key}: {p} -> INVALID" for row in results.rows for p in row.problems]
    if notes or results.notes:
        lines += ["", "notes:", *(f"  {n}" for n in results.notes + notes)]
    if problems:
        lines += ["", "WARNINGS:", *(f"  {p}" for p in problems)]
    return "\n".join(lines)


def markdown(results: Results) -> str:
    lines = [f"# Tally benchmark, {results.started}", ""]
    lines += ["| machine | |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in results.machine.items()]
    options = ", ".join(f"`{k}={v}`" for k, v in results.options.items())
    lines += ["", f"Options: {options}", ""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in results.rows]
    lines += ["", "| target | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {t.name} | {t.measured} | {t.verdict} |" for t in targets(results)]
    notes = [f"`{row.key}`: {note}" for row in results.rows for note in row.notes]
    problems = [f"`{row.key}`: {p} (INVALID)" for row in results.rows for p in row.problems]
    if notes or results.notes:
        lines += ["", "Notes:", "", *(f"- {n}" for n in results.notes + notes)]
    if problems:
        lines += ["", "Warnings:", "", *(f"- {p}" for p in problems)]
    return "\n".join(lines) + "\n"


def to_json(results: Results) -> dict[str, Any]:
    return {
        "started": results.started,
        "options": results.options,
        "machine": results.machine,
        "rows": [asdict(row) | {"valid": row.valid} for row in results.rows],
        "targets": [asdict(t) for t in targets(results)],
        "notes": results.notes,
    }


def write(results: Results, out: Path, stamp: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    as_json, as_md = out / f"{stamp}.json", out / f"{stamp}.md"
    as_json.write_text(json.dumps(to_json(results), indent=2, default=str) + "\n")
    as_md.write_text(markdown(results))
    return as_json, as_md
