"""Usage: events aggregated per window and group by the database, and meters (saved usage
queries). See docs/usage.md.

The service checks what is asked (each problem naming its parameter), works out the windows
as UTC instants in the reader's time zone (day and month boundaries follow the zone's
daylight-saving changes), and lets the store aggregate. Attribute groups are never decrypted
per event: the store groups by each event's keyed token of the attribute, and only the
distinct tokens are opened, through the sealed dictionary, with the tenant's key.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from tally.auth.service import Principal, Scope
from tally.crypto.sealing import SealBroken, TenantCipher
from tally.crypto.tenant_keys import TenantKeys
from tally.errors import AlreadyExists, FieldError, InvalidInput, NotFound
from tally.events.log import ExportFilter
from tally.events.model import format_decimal, parse_attributes
from tally.events.usage import (
    AGGREGATIONS,
    FIELDS,
    UNIQUE_FIELDS,
    WINDOWS,
    Meter,
    TokenFill,
    UsageQuery,
    UsageRow,
    attribute_key,
)
from tally.events.validation import MAX_ATTRIBUTE_KEY, EventType, Name, Text
from tally.registry.audit import Actor
from tally.services.ingest import attribute_tokens
from tally.store.interface import ReindexStore, UsageStore

MAX_WINDOWS = 10_000
MAX_GROUP_BY = 8

Problem = tuple[str, str]
"""(the parameter or body member a problem is about, what is wrong with it)."""


@dataclass(frozen=True, slots=True)
class Definition:
    """What to aggregate and how to group: the part of a usage query a meter saves."""

    aggregation: str = "sum"
    unique_of: str | None = None
    group_by: tuple[str, ...] = ()

    def problems(self) -> list[Problem]:
        found: list[Problem] = []
        if self.aggregation not in AGGREGATIONS:
            found.append(("aggregation", f"must be one of {', '.join(AGGREGATIONS)}"))
        if self.aggregation == "unique_count":
            if self.unique_of is None:
                found.append(("unique_of", "is required with aggregation=unique_count"))
            elif not _known_name(self.unique_of, UNIQUE_FIELDS):
                found.append(("unique_of", "must be subject or attributes.KEY"))
        elif self.unique_of is not None:
            found.append(("unique_of", "is only for aggregation=unique_count"))
        if len(self.group_by) > MAX_GROUP_BY:
            found.append(("group_by", f"names at most {MAX_GROUP_BY} keys"))
        for name in self.group_by:
            if not _known_name(name, FIELDS):
                found.append(("group_by", f"must be one of {', '.join(FIELDS)} or attributes.KEY"))
                break
        if len(set(self.group_by)) < len(self.group_by):
            found.append(("group_by", "names a key more than once"))
        return found


def _known_name(name: str, fields: Sequence[str]) -> bool:
    key = attribute_key(name)
    if key is None:
        return name in fields
    return 0 < len(key) <= MAX_ATTRIBUTE_KEY


@dataclass(frozen=True, slots=True)
class Span:
    """`[time_from, time_to)`, cut into `window`s in the zone `tz`."""

    time_from: datetime
    time_to: datetime
    window: str = "none"
    tz: str = "UTC"


@dataclass(frozen=True, slots=True)
class UsageRequest:
    """A usage query as asked: its span, the definition and the filters (as the export's)."""

    span: Span
    definition: Definition = field(default_factory=Definition)
    tenant: str | None = None
    application: str | None = None
    type: str | None = None
    subject: str | None = None


def refuse(problems: Sequence[Problem], *, where: Callable[[str], FieldError]) -> None:
    """Raises InvalidInput naming each problem's parameter (or body member) through `where`."""
    if problems:
        errors = [replace(where(name), detail=detail) for name, detail in problems]
        raise InvalidInput(
            f"The usage query is not valid: {problems[0][0]} {problems[0][1]}.", errors
        )


def as_parameter(name: str) -> FieldError:
    return FieldError("", "", parameter=name)


def zone_of(name: str) -> ZoneInfo | None:
    """The IANA zone `name`, or None when there is none of that name."""
    if not name or len(name) > 64 or name.startswith(("/", ".")) or ".." in name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def windows(
    time_from: datetime, time_to: datetime, window: str, zone: ZoneInfo, *, limit: int
) -> list[tuple[datetime, datetime]] | None:
    """The windows `[start, end)` that cover `[time_from, time_to)`, cut to it, as UTC
    instants: minutes and hours as the zone's clock shows them, days and months from the
    zone's midnight (so a day is 23 or 25 hours long across a daylight-saving change). None
    when there would be more than `limit`."""
    if window == "none":
        return [(time_from, time_to)]
    found: list[tuple[datetime, datetime]] = []
    bounds = _boundaries(time_from, window, zone)
    start = next(bounds)
    while start < time_to:
        end = next(bounds)
        found.append((max(start, time_from), min(end, time_to)))
        if len(found) > limit:
            return None
        start = end
    return found


def _boundaries(time_from: datetime, window: str, zone: ZoneInfo) -> Iterator[datetime]:
    """The window boundaries from the one at or before `time_from` on, as UTC instants."""
    local = time_from.astimezone(zone)
    if window in ("minute", "hour"):
        # Fixed lengths: counted in UTC from a boundary of the zone's clock, so that a
        # daylight-saving change neither repeats nor drops one.
        step = timedelta(minutes=1) if window == "minute" else timedelta(hours=1)
        first = local.replace(second=0, microsecond=0)
        if window == "hour":
            first = first.replace(minute=0)
        at = first.astimezone(UTC)
        while True:
            yield at
            at += step
    day = local.date().replace(day=1) if window == "month" else local.date()
    while True:
        # Midnight as the zone's clock shows it, converted by the zone's rules of that date.
        yield datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)
        if window == "day":
            day += timedelta(days=1)
        else:
            day = day.replace(year=day.year + day.month // 12, month=day.month % 12 + 1)


def rfc3339(value: datetime, zone: ZoneInfo) -> str:
    """`value` in `zone`, with the zone's offset at that instant."""
    local = value.astimezone(zone)
    return local.isoformat(timespec="microseconds" if local.microsecond else "seconds")


def _value_json(value: Decimal | int) -> str | int:
    return value if isinstance(value, int) else format_decimal(value)


@dataclass(frozen=True, slots=True)
class UsageAnswer:
    """The answer's JSON body, and the group-by keys its rows' groups hold (the columns of its
    CSV form, which has them even when no row does)."""

    body: dict[str, Any]
    group_by: tuple[str, ...]


class UsageService:
    def __init__(
        self, *, store: UsageStore, keys: TenantKeys, clock: Callable[[], datetime]
    ) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock

    def usage(self, principal: Principal, request: UsageRequest) -> UsageAnswer:
        """The usage answer: `{"from", "to", "window", "tz", "aggregation", "rows"}`, rows in
        order of window, then group values (nulls last). Raises Forbidden without usage:read
        or for a tenant outside the key's, InvalidInput naming each bad parameter."""
        principal.require(Scope.USAGE_READ)
        span = request.span
        zone = zone_of(span.tz)
        problems = request.definition.problems()
        if span.window not in WINDOWS:
            problems.append(("window", f"must be one of {', '.join(WINDOWS)}"))
        if zone is None:
            problems.append(("tz", "is not an IANA time zone name"))
        if span.time_from > span.time_to:
            problems.append(("from", "is after to"))
        refuse(problems, where=as_parameter)
        assert zone is not None  # noqa: S101 - refused above
        if request.tenant is not None:
            principal.require_tenant(request.tenant)
        spans = windows(span.time_from, span.time_to, span.window, zone, limit=MAX_WINDOWS)
        if spans is None:
            refuse(
                [("window", f"makes more than {MAX_WINDOWS} windows in this range")],
                where=as_parameter,
            )
        assert spans is not None  # noqa: S101 - refused above
        definition = request.definition
        query = UsageQuery(
            filters=ExportFilter(
                tenant=request.tenant,
                application=request.application,
                type=request.type,
                subject=request.subject,
                time_from=span.time_from,
                time_to=span.time_to,
                tenants=principal.tenants,
            ),
            windows=tuple(spans),
            aggregation=definition.aggregation,
            group_by=definition.group_by,
            unique_of=definition.unique_of,
        )
        rows = self._rows(query) if spans else []
        body = {
            "from": rfc3339(span.time_from, zone),
            "to": rfc3339(span.time_to, zone),
            "window": span.window,
            "tz": span.tz,
            "aggregation": definition.aggregation,
            "rows": [
                {
                    "window_start": rfc3339(row.window_start, zone),
                    "window_end": rfc3339(row.window_end, zone),
                    "group": dict(zip(definition.group_by, row.group, strict=True)),
                    "value": _value_json(row.value),
                }
                for row in rows
            ],
        }
        return UsageAnswer(body=body, group_by=definition.group_by)

    def _rows(self, query: UsageQuery) -> list[UsageRow]:
        """The store's rows, attribute labels turned back into values, in order."""
        ciphers = self._ciphers(query) if query.attribute_keys() else {}
        key_tokens = {
            key: [(tenant, cipher.key_token(key)) for tenant, cipher in sorted(ciphers.items())]
            for key in query.attribute_keys()
        }
        values: dict[str, list[object]] = {}

        def label(
            key: str, found: Sequence[tuple[str, str, bytes | None]]
        ) -> Mapping[tuple[str, str], int]:
            opened: dict[tuple[str, str], str] = {}
            for tenant, token, sealed in found:
                if sealed is None:
                    raise SealBroken("An attribute value token has no dictionary entry.")
                opened[(tenant, token)] = ciphers[tenant].open_value(token, sealed)
            distinct = sorted(set(opened.values()))
            values[key] = [_attribute_value(text) for text in distinct]
            number = {text: n for n, text in enumerate(distinct)}
            return {pair: number[text] for pair, text in opened.items()}

        rows = self._store.usage(query, key_tokens=key_tokens, label=label)
        names = query.group_by
        decoded = [
            replace(
                row,
                group=tuple(
                    _decode(name, item, values) for name, item in zip(names, row.group, strict=True)
                ),
            )
            for row in rows
        ]
        return sorted(decoded, key=lambda row: (row.window_start, *map(_order, row.group)))

    def _ciphers(self, query: UsageQuery) -> dict[str, TenantCipher]:
        """The ciphers of the tenants the query can see that still have a data key (a
        shredded tenant's tokens cannot be read: its attribute groups are null)."""
        filters = query.filters
        if filters.tenant is not None:
            ids: Sequence[str] = [filters.tenant]
        elif filters.tenants is not None:
            ids = filters.tenants
        else:
            ids = [tenant.id for tenant in self._store.list_tenants()]
        found = self._store.tenants_with_keys(sorted(set(ids)))
        ciphers = self._keys.ciphers({t: k for t, (_, k) in found.items() if k is not None})
        return {tenant: cipher for tenant, cipher in ciphers.items() if cipher is not None}

    # --- meters ---------------------------------------------------------------------------

    def create_meter(self, spec: MeterSpec, *, actor: Actor) -> dict[str, Any]:
        """Raises InvalidInput (pointers into the body) for a definition usage would refuse,
        AlreadyExists when the id is taken. Audited as `meter.create`."""
        refuse(spec.definition().problems(), where=lambda name: FieldError(f"/{name}", ""))
        meter = Meter(id=spec.id, spec=spec.canonical(), created_at=self._clock())
        try:
            self._store.create_meter(
                meter, audit=actor.entry("meter.create", at=meter.created_at, target=meter.id)
            )
        except AlreadyExists:
            raise AlreadyExists("A meter with this id exists already.") from None
        return describe_meter(meter)

    def list_meters(self, principal: Principal) -> list[dict[str, Any]]:
        _require_meter_reader(principal)
        return [describe_meter(meter) for meter in self._store.list_meters()]

    def get_meter(self, principal: Principal, meter_id: str) -> dict[str, Any]:
        _require_meter_reader(principal)
        return describe_meter(self._meter(meter_id))

    def delete_meter(self, meter_id: str, *, actor: Actor) -> None:
        """Raises NotFound when there is no such meter. Audited as `meter.delete`."""
        entry = actor.entry("meter.delete", at=self._clock(), target=meter_id)
        if not self._store.delete_meter(meter_id, audit=entry):
            raise NotFound("There is no meter with this id.")

    def meter_usage(
        self,
        principal: Principal,
        meter_id: str,
        *,
        span: Span,
        tenant: str | None,
    ) -> UsageAnswer:
        """The meter's usage, answered by `usage` with the meter's definition and filters
        (and `tenant`, which must agree with a tenant the meter filters on)."""
        principal.require(Scope.USAGE_READ)
        meter = self._meter(meter_id)
        spec = MeterSpec.model_validate({**json.loads(meter.spec), "id": meter.id})
        filters = spec.filters
        if tenant is not None and filters.tenant is not None and tenant != filters.tenant:
            refuse([("tenant", "is not the tenant this meter is for")], where=as_parameter)
        answer = self.usage(
            principal,
            UsageRequest(
                span=span,
                definition=spec.definition(),
                tenant=tenant or filters.tenant,
                application=filters.application,
                type=spec.type,
                subject=filters.subject,
            ),
        )
        body = {"meter": meter.id, "unit": spec.unit, **answer.body}
        return UsageAnswer(body=body, group_by=answer.group_by)

    def _meter(self, meter_id: str) -> Meter:
        meter = self._store.get_meter(meter_id)
        if meter is None:
            raise NotFound("There is no meter with this id.")
        return meter


def backfill_tokens(store: ReindexStore, keys: TenantKeys, *, batch: int) -> Iterator[int]:
    """Give the events stored before attribute tokens existed their tokens, `batch` events
    at a time, opening each one once; yields how many each round filled. Resumable: what a
    round filled has committed, and a run starts again from the events still without.

    A shredded tenant's events are left without: their attributes can never be opened, so
    they group as null, as every attribute of a shredded tenant does."""
    after = (-1, 0)
    while found := store.events_without_tokens(after=after, limit=batch):
        after = found[-1][:2]
        ciphers = keys.ciphers_of({event.tenant for _, _, event in found})
        fills = []
        for _, _, event in found:
            cipher = ciphers.get(event.tenant)
            if cipher is None:
                continue
            opened = cipher.open(
                application=event.application, event_id=event.id, sealed=event.sealed
            )
            tokens, dictionary = attribute_tokens(cipher, parse_attributes(opened))
            fills.append(
                TokenFill(
                    application=event.application,
                    id=event.id,
                    tenant=event.tenant,
                    attribute_tokens=tokens,
                    dictionary=dictionary,
                )
            )
        yield store.add_attribute_tokens(fills)


def _require_meter_reader(principal: Principal) -> None:
    if Scope.ADMIN not in principal.scopes:
        principal.require(Scope.USAGE_READ)


def _attribute_value(text: str) -> object:
    """An attribute value from its canonical JSON: a string, a boolean, or a number as its
    exact decimal string."""
    value = parse_attributes(f'{{"v":{text}}}')["v"]
    return format_decimal(value) if isinstance(value, Decimal) else value


def _decode(name: str, item: object, values: Mapping[str, list[object]]) -> object:
    key = attribute_key(name)
    if key is None or item is None:
        return item
    return values[key][int(str(item))]


def _order(item: object) -> tuple[int, str]:
    """Group values ordered by their JSON text, nulls last."""
    return (1, "") if item is None else (0, json.dumps(item, ensure_ascii=False))


def describe_meter(meter: Meter) -> dict[str, Any]:
    return {
        **json.loads(meter.spec),
        "id": meter.id,
        "created_at": rfc3339(meter.created_at, ZoneInfo("UTC")),
    }


class MeterFilters(BaseModel):
    """Which events a meter counts, besides its type (as the export's filters)."""

    model_config = ConfigDict(extra="forbid")

    tenant: Name | None = None
    application: Name | None = None
    subject: Text | None = None


class MeterSpec(BaseModel):
    """A meter: a saved usage query (docs/usage.md shows how Stripe meters and Lago billable
    metrics map onto one). `unit` names what its values count; it filters nothing."""

    model_config = ConfigDict(extra="forbid")

    id: Name
    type: EventType
    aggregation: Literal["sum", "count", "min", "max", "latest", "unique_count"]
    unique_of: Annotated[str, StringConstraints(min_length=1, max_length=80)] | None = None
    group_by: Annotated[list[str], Field(max_length=MAX_GROUP_BY)] = Field(default_factory=list)
    filters: MeterFilters = Field(default_factory=MeterFilters)
    unit: Text | None = None

    def definition(self) -> Definition:
        return Definition(
            aggregation=self.aggregation, unique_of=self.unique_of, group_by=tuple(self.group_by)
        )

    def canonical(self) -> str:
        return json.dumps(self.model_dump(exclude={"id"}), sort_keys=True, separators=(",", ":"))
