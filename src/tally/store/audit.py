"""SQL for the audit log that both stores share (bound parameters only)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from tally.registry.audit import AuditFilter


def audit_where(
    filters: AuditFilter, *, mark: str, time: Callable[[datetime], object]
) -> tuple[str, list[object]]:
    """The WHERE condition (never empty) and its parameters; `mark` is the driver's
    placeholder and `time` turns a datetime into the store's time parameter."""
    clauses, params = ["TRUE"], list[object]()
    if filters.action is not None:
        clauses.append(f"action = {mark}")
        params.append(filters.action)
    if filters.actor is not None:
        clauses.append(f"actor = {mark}")
        params.append(filters.actor)
    if filters.since is not None:
        clauses.append(f"at >= {mark}")
        params.append(time(filters.since))
    if filters.before is not None:
        clauses.append(f"seq < {mark}")
        params.append(filters.before)
    return " AND ".join(clauses), params
