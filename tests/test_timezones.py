"""Tenants' time zones resolve without the system's zoneinfo (slim images): tzdata, a runtime
dependency (requirements/main.lock), supplies them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LOCK = Path(__file__).parent.parent / "requirements" / "main.lock"


def test_time_zones_resolve_with_no_system_zoneinfo() -> None:
    check = (
        "from tally.services.usage import zone_of; "
        "zone = zone_of('Europe/Paris'); assert zone is not None, 'no zone'; "
        "assert zone_of('Asia/Kolkata') is not None; print('ok')"
    )
    # An empty PYTHONTZPATH: no system directory is searched, only the tzdata package.
    env = os.environ | {"PYTHONTZPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_tzdata_is_pinned_for_the_runtime() -> None:
    assert any(line.startswith("tzdata==") for line in LOCK.read_text().splitlines())
