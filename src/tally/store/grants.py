"""Least privilege on PostgreSQL: migrations run as the owner role, the service as a lesser one.

The owner role (TALLY_OWNER_DATABASE_URL) owns every table and applies the migrations; after
each migration run it grants the service role (the one TALLY_DATABASE_URL logs in as, or
TALLY_SERVICE_ROLE) exactly the privileges in `SERVICE_PRIVILEGES`, after revoking everything
else. So the service may insert and select events but never update, delete or truncate them,
and it can change no schema: it owns nothing and may not create in the schema.

`SERVICE_PRIVILEGES` is the one place these privileges are stated. A migration that adds a
table adds a line here; tests/store/test_roles.py fails while a table has none.
"""

from __future__ import annotations

from collections.abc import Mapping

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from tally.errors import StoreUnavailable
from tally.store import migrate
from tally.store.postgres import libpq_url

# table -> what the service role may do to it (and why, where it is not obvious).
SERVICE_PRIVILEGES: Mapping[str, frozenset[str]] = {
    # UPDATE: a tenant's name and lateness window change (PATCH /v1/tenants/{id}).
    "tenants": frozenset({"SELECT", "INSERT", "UPDATE"}),
    "applications": frozenset({"SELECT", "INSERT"}),
    # UPDATE: revocation, rotation and last_used_at.
    "api_keys": frozenset({"SELECT", "INSERT", "UPDATE"}),
    # The cursor secret is created on first use (INSERT … ON CONFLICT DO NOTHING).
    "secrets": frozenset({"SELECT", "INSERT"}),
    # UPDATE: the counters move with each append (and SELECT … FOR UPDATE needs it).
    "log_partitions": frozenset({"SELECT", "UPDATE"}),
    # Append-only: never UPDATE, DELETE or TRUNCATE.
    "events": frozenset({"SELECT", "INSERT"}),
    # Append-only, like events: an event's cancellation is never changed or withdrawn.
    "cancellations": frozenset({"SELECT", "INSERT"}),
    # Append-only: a restore (or `tally epoch renew`) adds an epoch, none is ever changed.
    "log_epochs": frozenset({"SELECT", "INSERT"}),
    # Append-only, like events.
    "audit_log": frozenset({"SELECT", "INSERT"}),
    # The sealed dictionary of attribute value tokens (docs/usage.md): append-only.
    "attribute_values": frozenset({"SELECT", "INSERT"}),
    # Saved usage queries: created and deleted by admins (POST and DELETE /v1/meters).
    "meters": frozenset({"SELECT", "INSERT", "DELETE"}),
    # Each tenant's wrapped data key: created on first use, rewrapped, shredded (an UPDATE,
    # also through INSERT … ON CONFLICT DO UPDATE); never deleted.
    "tenant_keys": frozenset({"SELECT", "INSERT", "UPDATE"}),
    # yoyo's record of applied migrations: read, so that a server started without the owner's
    # URL can tell that the schema is current (see migrate_postgresql).
    "_yoyo_migration": frozenset({"SELECT"}),
}

# The rest of yoyo's bookkeeping: the owner's alone.
OWNER_ONLY: frozenset[str] = frozenset({"_yoyo_log", "_yoyo_version", "yoyo_lock"})

# Serialises grant runs: concurrent GRANTs on one table fail with "tuple concurrently updated",
# and every worker of `tally serve --workers N` migrates at start.
_GRANTS_LOCK = 0x74616C6C79  # "tally"


def service_role_of(service_url: str) -> str:
    """The role `service_url` logs in as (asked of the server, so PGUSER and defaults count).

    Raises StoreUnavailable when it cannot connect.
    """
    try:
        with psycopg.connect(libpq_url(service_url), connect_timeout=5) as connection:
            row = connection.execute("SELECT current_user").fetchone()
    except psycopg.OperationalError as error:
        raise StoreUnavailable("The PostgreSQL store cannot be reached.") from error
    assert row is not None  # noqa: S101 - SELECT current_user answers one row
    return str(row[0])


def migrate_postgresql(*, owner_url: str, service_role: str) -> list[str]:
    """Apply pending migrations as the role of `owner_url`, then grant `service_role` its
    privileges (`grant_service_role`); the ids of the migrations applied.

    A role that may not change the schema (the service role, when no owner URL is set)
    finds nothing to do when every migration is applied already: so servers need not hold the
    owner's credentials once `tally migrate` has run as the owner.

    Raises StoreUnavailable when the store cannot be reached, when migrations are pending and
    the role of `owner_url` may not change the schema, or when `service_role` cannot be held
    to its privileges.
    """
    refused = StoreUnavailable(
        "The database role that migrates may not change Tally's schema: set "
        "TALLY_OWNER_DATABASE_URL to the URL of the role that owns it (see README.md, "
        "'Least privilege on PostgreSQL')."
    )
    try:
        with psycopg.connect(libpq_url(owner_url), connect_timeout=5) as connection:
            # Asked first: yoyo swallows the refusal to create its own tables and then fails
            # on their absence, which would name the wrong problem.
            (may_create,) = _one(
                connection, "SELECT has_schema_privilege(current_schema(), 'CREATE')"
            )
            if not may_create and _is_current(connection):
                return []
        if not may_create:
            raise refused
        applied = migrate.apply(libpq_url(owner_url), "postgresql")
        with psycopg.connect(libpq_url(owner_url), connect_timeout=5) as connection:
            grant_service_role(connection, service_role)
    except psycopg.OperationalError as error:
        raise StoreUnavailable("The PostgreSQL store cannot be reached.") from error
    except pg_errors.InsufficientPrivilege as error:
        raise refused from error
    return applied


def grant_service_role(connection: psycopg.Connection[tuple[object, ...]], role: str) -> None:
    """As the owner on `connection`, leave `role` exactly `SERVICE_PRIVILEGES` on the tables
    of the current schema, USAGE (never CREATE) on the schema, and nothing else; commits.

    Nothing to do when `role` is the owner itself (one role does both, as in development).
    Raises StoreUnavailable when `role` does not exist or cannot be restricted (a superuser,
    a member of the owner role, or an owner of tables here).
    """
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_GRANTS_LOCK,))
        owner, schema, database = _one(
            connection, "SELECT current_user, current_schema(), current_database()"
        )
        if role == owner:
            return
        _check_restrictable(connection, role=role, owner=str(owner), schema=str(schema))
        tables = {
            str(name)
            for (name,) in connection.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
                (schema,),
            )
        }
        who, where = sql.Identifier(role), sql.Identifier(str(schema))
        for statement in (
            "REVOKE ALL ON ALL TABLES IN SCHEMA {where} FROM {who}",
            "REVOKE ALL ON ALL SEQUENCES IN SCHEMA {where} FROM {who}",
            # Since PostgreSQL 15 PUBLIC may not create in the public schema; before it could,
            # and a grant to PUBLIC is one to the service role too.
            "REVOKE CREATE ON SCHEMA {where} FROM PUBLIC, {who}",
            "REVOKE CREATE ON DATABASE {database} FROM {who}",
            "GRANT USAGE ON SCHEMA {where} TO {who}",
        ):
            connection.execute(
                sql.SQL(statement).format(
                    where=where, who=who, database=sql.Identifier(str(database))
                )
            )
        for table, privileges in sorted(SERVICE_PRIVILEGES.items()):
            if table not in tables:
                continue  # added by a later migration than this store has
            connection.execute(
                sql.SQL("GRANT {privileges} ON TABLE {table} TO {who}").format(
                    privileges=sql.SQL(", ").join(sql.SQL(p) for p in sorted(privileges)),
                    table=sql.Identifier(str(schema), table),
                    who=who,
                )
            )
            if "INSERT" in privileges:
                # A serial column's sequence needs USAGE to be drawn from by an INSERT.
                for (sequence,) in connection.execute(
                    "SELECT s.relname FROM pg_depend d "
                    "JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' "
                    "JOIN pg_class t ON t.oid = d.refobjid "
                    "JOIN pg_namespace n ON n.oid = t.relnamespace "
                    "WHERE d.classid = 'pg_class'::regclass "
                    "AND d.refclassid = 'pg_class'::regclass AND n.nspname = %s AND t.relname = %s",
                    (schema, table),
                ).fetchall():
                    connection.execute(
                        sql.SQL("GRANT USAGE ON SEQUENCE {sequence} TO {who}").format(
                            sequence=sql.Identifier(str(schema), str(sequence)), who=who
                        )
                    )


def _is_current(connection: psycopg.Connection[tuple[object, ...]]) -> bool:
    """Every migration this version ships is applied (False when that cannot be read)."""
    try:
        with connection.transaction():
            applied = {
                str(found)
                for (found,) in connection.execute("SELECT migration_id FROM _yoyo_migration")
            }
    except (pg_errors.UndefinedTable, pg_errors.InsufficientPrivilege):
        return False
    return set(migrate.known("postgresql")) <= applied


def _check_restrictable(
    connection: psycopg.Connection[tuple[object, ...]], *, role: str, owner: str, schema: str
) -> None:
    found = connection.execute(
        "SELECT rolsuper, pg_has_role(%s, %s, 'USAGE') FROM pg_roles WHERE rolname = %s",
        (role, owner, role),
    ).fetchone()
    if found is None:
        raise StoreUnavailable(
            f"The service role '{role}' does not exist: create it (LOGIN, no other rights), "
            "or set TALLY_SERVICE_ROLE to the role TALLY_DATABASE_URL logs in as."
        )
    superuser, member_of_owner = found
    if superuser or member_of_owner:
        raise StoreUnavailable(
            f"The service role '{role}' cannot be held to its privileges: it is "
            f"{'a superuser' if superuser else f'a member of the owner role {owner!r}'}. "
            "Give the service a role of its own without either."
        )
    owned = [
        str(name)
        for (name,) in connection.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_roles r ON r.oid = c.relowner WHERE n.nspname = %s AND r.rolname = %s "
            "UNION ALL SELECT 'schema ' || n.nspname FROM pg_namespace n "
            "JOIN pg_roles r ON r.oid = n.nspowner WHERE n.nspname = %s AND r.rolname = %s "
            "ORDER BY 1",
            (schema, role, schema, role),
        )
    ]
    if owned:
        raise StoreUnavailable(
            f"The service role '{role}' owns {', '.join(owned)}: an owner may do anything to "
            f"its objects. Make {owner!r} their owner ('ALTER TABLE … OWNER TO …'), then migrate "
            "again."
        )


def _one(connection: psycopg.Connection[tuple[object, ...]], query: str) -> tuple[object, ...]:
    row = connection.execute(query).fetchone()
    assert row is not None  # noqa: S101 - the queries here always answer one row
    return row
