"""Waiting out the bound a process may answer from its copy of a key or tenant changed by
another process (TALLY_CACHE_SECONDS, freshness.py): a change is seen within it, not later."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tally.freshness import DEFAULT_SECONDS

# Scheduling noise on a loaded machine on top of the bound itself.
SLACK_SECONDS = 1.0


def answered_within_bound(
    call: Callable[[], httpx.Response],
    status: int,
    *,
    seconds: float = DEFAULT_SECONDS,
) -> httpx.Response:
    """`call()` repeated until it answers `status`; fails if that takes longer than the bound
    (`seconds`, the cache's) plus scheduling slack. The answer with `status`."""
    began = time.monotonic()
    while (answer := call()).status_code != status:
        waited = time.monotonic() - began
        assert waited < seconds + SLACK_SECONDS, (
            f"still {answer.status_code} after {waited:.2f} s, past the {seconds} s bound: "
            f"{answer.text[:300]}"
        )
        time.sleep(0.05)
    return answer
