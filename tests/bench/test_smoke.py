"""The benchmark harness in its smoke mode: `python -m bench --quick` runs every scenario and
every reference point against real servers (Tally on PostgreSQL and SQLite, the afternoon peer,
the bare ASGI app, psql's COPY) in well under a minute, and writes plausible figures.

It needs wrk and PostgreSQL: without wrk it skips, except under CI=true (.ci/run installs wrk),
where a missing wrk or an unreachable PostgreSQL fails it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI, postgres_admin

ROOT = Path(__file__).resolve().parents[2]

SCENARIO_ROWS = {
    "single.postgres", "single80.postgres", "single.sqlite", "batch.postgres", "batch.sqlite",
    "sdk.postgres", "export.json", "export.ndjson", "usage.subject_day", "usage.attribute",
    "reconciliation", "growth.empty", "growth.big",
}  # fmt: skip
REFERENCE_ROWS = {
    "ref.bare.single",
    "ref.peer.single",
    "ref.peer.batch",
    "ref.copy.in",
    "ref.copy.out",
}
TARGETS = 14


@pytest.mark.postgres
def test_quick_run_measures_every_scenario_and_reference(tmp_path: Path) -> None:
    for program in ("wrk", "psql"):
        if shutil.which(program) is None:
            if IN_CI:
                pytest.fail(f"{program} is not installed under CI=true (.ci/run installs it)")
            pytest.skip(f"{program} is not installed")
    postgres_admin().close()  # skips when PostgreSQL is unreachable, fails under CI=true

    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("TALLY_")},
        capture_output=True,
        text=True,
        timeout=280,  # under pytest-timeout's 300 s, for a machine busy with other work
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    (found,) = tmp_path.glob("*.json")
    (table,) = tmp_path.glob("*.md")
    assert found.stem == table.stem
    results = json.loads(found.read_text())
    rows = {row["key"]: row for row in results["rows"]}
    assert set(rows) == SCENARIO_ROWS | REFERENCE_ROWS, set(rows) ^ (SCENARIO_ROWS | REFERENCE_ROWS)
    for key, row in rows.items():
        assert row["valid"], (key, row["problems"])
        assert row["count"] > 0, key
        assert row["seconds"] > 0, key
        rate = row["events_per_s"] or row["requests_per_s"]
        assert rate and rate > 0, key
        if row["system"] != "postgres":  # a server of ours: metered
            assert row["cpu_percent"] > 0, key
            assert 10 < row["rss_mb"] < 2000, (key, row["rss_mb"])
        if row["p99_ms"] is not None:
            assert 0 < row["p50_ms"] <= row["p99_ms"], key
    # Ratios come from the same run.
    single = rows["single.postgres"]
    assert single["ratio_peer"] == pytest.approx(
        single["requests_per_s"] / rows["ref.peer.single"]["requests_per_s"]
    )
    assert single["ratio_limit"] == pytest.approx(
        single["requests_per_s"] / rows["ref.bare.single"]["requests_per_s"]
    )
    growth = rows["growth.big"]
    assert growth["ratio_limit"] == pytest.approx(
        growth["events_per_s"] / rows["growth.empty"]["events_per_s"]
    )
    assert growth["notes"][0].startswith("the mean of 1 turn(s)"), growth["notes"]
    stream = rows["export.ndjson"]
    assert stream["ratio_limit"] == pytest.approx(
        stream["events_per_s"] / rows["ref.copy.out"]["events_per_s"]
    )
    # The 10,000-event store of --quick is read to its end by both exports.
    assert stream["count"] >= 10_000
    assert rows["export.json"]["count"] >= 10_000
    verdicts = {target["name"]: target["verdict"] for target in results["targets"]}
    assert len(verdicts) == TARGETS
    assert set(verdicts.values()) <= {"PASS", "MISS"}, verdicts
    assert results["machine"]["nproc"] == str(os.cpu_count())
    for name in ("cpu", "python", "postgresql", "wrk", "commit"):
        assert results["machine"][name] not in ("", "?"), name
    text = table.read_text()
    assert "| target | measured | verdict |" in text
    for row in results["rows"]:
        assert row["scenario"] in text
    assert "targets (issue 10):" in done.stdout
