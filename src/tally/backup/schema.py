"""What a backup carries: every table of Tally's schema, each column with its kind.

The tables and columns are read from the database itself; this is what the backup knows about
each of them. A table or column it does not know (a migration added one and nobody said here
how to carry it) stops the backup with a message naming it, rather than a backup that silently
lacks it. A migration that adds a table or a column adds it here too; tests/backup/ fails while
one is missing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tally.store.snapshot import Column, Kind


class Unsupported(Exception):
    """The store holds a table or column this version of Tally cannot back up or restore."""


@dataclass(frozen=True, slots=True)
class TableSpec:
    columns: Mapping[str, Kind]
    order_by: tuple[str, ...]
    # The migrations seed its rows (the partitions' counters), or a server may make them on an
    # empty store (the cursor secret): a restore replaces them instead of refusing the store.
    replaced: bool = False


T, INT, TIME, DEC = Kind.TEXT, Kind.INTEGER, Kind.TIME, Kind.DECIMAL

# In the order a backup writes them where foreign keys leave a choice: the small tables first,
# tenants' data keys before the events whose attributes they open, cancellations after events.
TABLES: Mapping[str, TableSpec] = {
    "tenants": TableSpec(
        {"id": T, "name": T, "region": T, "lateness_hours": INT, "created_at": TIME}, ("id",)
    ),
    "applications": TableSpec({"id": T, "name": T, "created_at": TIME}, ("id",)),
    "api_keys": TableSpec(
        {
            "id": T,
            "secret_hash": Kind.BYTES,  # the hash, as stored: a backup holds no usable key
            "scopes": T,
            "application": T,
            "tenants": T,
            "created_at": TIME,
            "expires_at": TIME,
            "revoked_at": TIME,
            "last_used_at": TIME,
            "rotated_from": T,
            "replaced_by": T,
        },
        ("id",),
    ),
    # The cursor secret: billing systems' saved cursors open on the restored store.
    "secrets": TableSpec({"name": T, "value": Kind.BYTES}, ("name",), replaced=True),
    "log_partitions": TableSpec(
        {"partition": INT, "last_offset": INT}, ("partition",), replaced=True
    ),
    # The export log's epochs (migration 0007), the first seeded by the migration: restored
    # as they were, so that a cursor of any earlier epoch resumes where it should; the
    # restore then starts a new one (backup/service.py).
    "log_epochs": TableSpec(
        {"seq": INT, "epoch": Kind.BYTES, "started_at": TIME, "reason": T, "base": T},
        ("seq",),
        replaced=True,
    ),
    "tenant_keys": TableSpec(
        {
            "tenant": T,
            "master_key_id": T,
            "wrapped": Kind.BYTES,  # wrapped by a master key, as stored
            "created_at": TIME,
            "rewrapped_at": TIME,
            "shredded_at": TIME,
        },
        ("tenant",),
    ),
    "meters": TableSpec({"id": T, "spec": T, "created_at": TIME}, ("id",)),
    "audit_log": TableSpec(
        {
            "seq": INT,
            "at": TIME,
            "actor": T,
            "action": T,
            "target": T,
            "details": T,
            "source": T,
            "request_id": T,
        },
        ("seq",),
    ),
    "attribute_values": TableSpec(
        {"tenant": T, "token": T, "sealed": Kind.SEALED}, ("tenant", "token")
    ),
    "events": TableSpec(
        {
            "partition": INT,
            "log_offset": INT,
            "application": T,
            "id": T,
            "tenant": T,
            "type": T,
            "quantity": DEC,
            "time": TIME,
            "subject": T,
            "unit": T,
            "attributes": Kind.SEALED,
            "region": T,
            "received_at": TIME,
            "digest": Kind.DIGEST,
            "attribute_tokens": Kind.JSON,
        },
        ("partition", "log_offset"),
    ),
    "cancellations": TableSpec(
        {
            "partition": INT,
            "log_offset": INT,
            "application": T,
            "id": T,
            "tenant": T,
            "reason": Kind.SEALED,
            "received_at": TIME,
        },
        ("partition", "log_offset"),
    ),
}


def carried(tables: Mapping[str, Sequence[str]]) -> dict[str, list[Column]]:
    """Each table of the database with its columns and their kinds. Raises Unsupported naming
    every table and column the backup does not know."""
    unknown = [name for name in tables if name not in TABLES]
    columns = {
        name: [f"{name}.{column}" for column in found if column not in TABLES[name].columns]
        for name, found in tables.items()
        if name in TABLES
    }
    strays = [column for found in columns.values() for column in found]
    if unknown or strays:
        named = [f"table {name}" for name in unknown] + [f"column {c}" for c in strays]
        raise Unsupported(
            f"The store holds {', '.join(named)}, which this version of Tally does not know how "
            "to back up: nothing was written. Back it up with the Tally version whose migrations "
            "made it."
        )
    return {
        name: [(column, TABLES[name].columns[column]) for column in found]
        for name, found in tables.items()
    }


def ordered(tables: Sequence[str], foreign_keys: set[tuple[str, str]]) -> list[str]:
    """`tables` so that each comes after every table it references, in `TABLES`' order
    where that leaves a choice."""
    rank = {name: n for n, name in enumerate(TABLES)}
    waiting = sorted(tables, key=lambda name: rank.get(name, len(rank)))
    placed: list[str] = []
    while waiting:
        ready = next(
            (
                name
                for name in waiting
                if all(
                    parent == name or parent not in waiting
                    for child, parent in foreign_keys
                    if child == name
                )
            ),
            None,
        )
        if ready is None:
            raise Unsupported(f"The tables {', '.join(waiting)} reference each other in a cycle.")
        placed.append(ready)
        waiting.remove(ready)
    return placed
