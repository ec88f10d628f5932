"""The usage query's SQL, written once over the dialect (see docs/usage.md).

Windows are bound as a table of UTC instants and events bucketed by a range join; groups are
columns of the event, or for an attribute a *label* joined through the event's keyed token of
that attribute (`events.attribute_tokens`): the caller numbers the distinct values it finds
(`Label`), so equal values of different tenants (whose tokens differ) group together and no
value, clear or tokenised, is ever put into SQL text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from tally.events.usage import UsageQuery, UsageRow, attribute_key
from tally.store import plan
from tally.store.dialect import Dialect, Fragment

# The columns of a group-by field.
_FIELD_COLUMNS = {
    "tenant": "e.tenant",
    "type": "e.type",
    "subject": "e.subject",
    "application": "e.application",
}

KeyTokens = Mapping[str, Sequence[tuple[str, str]]]
"""attribute key -> (tenant, key token) for each tenant whose tokens can be read."""

Label = Callable[[str, Sequence[tuple[str, str, bytes | None]]], Mapping[tuple[str, str], int]]
"""Called with an attribute key and its distinct (tenant, value token, sealed dictionary entry
or None) among the matching events; answers a label (an int) for each (tenant, value token),
equal labels for equal values."""


def _matching(query: UsageQuery, d: Dialect, *, windowed: bool = False) -> Fragment:
    """The WHERE clause of the matching events. `windowed`: the windows (which lie inside the
    range) bound the time, so the planner searches the time index once per window; the range
    too where the dialect plans it well (`Dialect.windows_within_range`)."""
    filters = query.filters
    if windowed and not d.windows_within_range:
        filters = replace(filters, time_from=None, time_to=None)
    where, params = plan.filter_sql(filters, d, event="e", received="e.received_at")
    # Cancelled events count for nothing (the shared predicate of store/plan.py).
    keep, kept = plan.not_cancelled("e", d)
    return f"WHERE {keep}{where}", [*kept, *params]


def tokens_sql(
    query: UsageQuery, key: str, key_tokens: Sequence[tuple[str, str]], d: Dialect
) -> Fragment:
    """The distinct (tenant, token, sealed) of attribute `key` among the matching events."""
    keys, key_params = d.table("k", (("tenant", "text"), ("token", "text")), key_tokens)
    where, params = _matching(query, d)
    member = d.json_member("e.attribute_tokens", "k.token")
    return (
        "SELECT f.tenant, f.token, v.sealed FROM ("
        f"SELECT DISTINCT e.tenant AS tenant, {member} AS token "
        f"FROM events e JOIN {keys} ON k.tenant = e.tenant {where}"
        ") f LEFT JOIN attribute_values v ON v.tenant = f.tenant AND v.token = f.token "
        "WHERE f.token IS NOT NULL",
        [*key_params, *params],
    )


def usage_sql(
    query: UsageQuery,
    labels: Mapping[str, Sequence[tuple[str, str, str, int]]],
    d: Dialect,
) -> Fragment:
    """The aggregate per window and group; `labels`: attribute key -> (tenant, key token,
    value token, label)."""
    params: list[object] = []
    windows, window_params = d.table("w", (("ws", "time"), ("we", "time")), query.windows)
    joins: list[str] = []
    label_of: dict[str, str] = {}
    tables: list[str] = []
    for n, key in enumerate(query.attribute_keys()):
        alias, keys_alias = f"l{n}", f"k{n}"
        found = labels.get(key, ())
        key_table, key_params = d.table(
            "t",
            (("tenant", "text"), ("token", "text")),
            sorted({(tenant, key_token) for tenant, key_token, _, _ in found}),
        )
        label_table, label_params = d.table(
            "t",
            (("tenant", "text"), ("token", "text"), ("label", "integer")),
            [(tenant, token, label) for tenant, _, token, label in found],
        )
        # Materialized, so that SQLite indexes them for the equality joins (it never indexes
        # a json_each table): per event, one lookup of its tenant's key token, then one of
        # its value token's label; never a scan of every distinct value.
        tables.append(
            f"{keys_alias} AS MATERIALIZED (SELECT * FROM {key_table}), "
            f"{alias} AS MATERIALIZED (SELECT * FROM {label_table}), "
        )
        member = d.json_member("e.attribute_tokens", f"{keys_alias}.token")
        joins.append(
            f" LEFT JOIN {keys_alias} ON {keys_alias}.tenant = e.tenant"
            f" LEFT JOIN {alias} ON {alias}.tenant = e.tenant AND {alias}.token = {member}"
        )
        params += [*key_params, *label_params]
        label_of[key] = f"{alias}.label"

    def column(name: str) -> str:
        key = attribute_key(name)
        return label_of[key] if key is not None else _FIELD_COLUMNS[name]

    groups = [f"{column(name)} AS g{n}" for n, name in enumerate(query.group_by)]
    unique = [f"{column(query.unique_of)} AS u"] if query.unique_of else []
    where, where_params = _matching(query, d, windowed=True)
    params = [*params, *window_params, *where_params]
    picked = ", ".join(
        [
            "w.ws AS window_start",
            "w.we AS window_end",
            *groups,
            *unique,
            "e.quantity AS quantity",
            "e.time AS time",
            "e.partition AS part",
            "e.log_offset AS pos",
        ]
    )
    matched = (
        f"WITH {''.join(tables)}m AS (SELECT {picked} FROM {windows} CROSS JOIN events e"
        f"{''.join(joins)} {where} AND e.time >= w.ws AND e.time < w.we) "
    )
    keys = ", ".join(["window_start", "window_end", *(f"g{n}" for n in range(len(groups)))])
    if query.aggregation == "latest":
        # The quantity of the latest event of each window and group; equal times are
        # ordered by the export log, the later position winning.
        return (
            matched + f"SELECT {keys}, quantity AS value FROM (SELECT m.*, row_number() OVER "
            f"(PARTITION BY {keys} ORDER BY time DESC, part DESC, pos DESC) AS rn FROM m) r "
            "WHERE rn = 1",
            params,
        )
    value = {
        "sum": d.sum("quantity"),
        "min": d.min("quantity"),
        "max": d.max("quantity"),
        "count": "count(*)",
        "unique_count": "count(DISTINCT u)",
    }[query.aggregation]
    return matched + f"SELECT {keys}, {value} AS value FROM m GROUP BY {keys}", params


def read_rows(rows: Sequence[Any], query: UsageQuery, d: Dialect) -> list[UsageRow]:
    counted = query.aggregation in ("count", "unique_count")
    return [
        UsageRow(
            window_start=d.read_time(row["window_start"]),
            window_end=d.read_time(row["window_end"]),
            group=tuple(row[f"g{n}"] for n in range(len(query.group_by))),
            value=int(str(row["value"])) if counted else d.read_decimal(row["value"]),
        )
        for row in rows
    ]
