"""The audit log's WHERE condition, the same SQL on both stores (bound parameters only)."""

from __future__ import annotations

from tally.registry.audit import AuditFilter
from tally.store.dialect import Dialect, Fragment


def audit_where(filters: AuditFilter, dialect: Dialect) -> Fragment:
    """The WHERE condition (never empty) and its parameters."""
    clauses, params = ["TRUE"], list[object]()
    if filters.action is not None:
        clauses.append("action = ?")
        params.append(filters.action)
    if filters.actor is not None:
        clauses.append("actor = ?")
        params.append(filters.actor)
    if filters.since is not None:
        clauses.append("at >= ?")
        params.append(dialect.time(filters.since))
    if filters.before is not None:
        clauses.append("seq < ?")
        params.append(filters.before)
    return " AND ".join(clauses), params
