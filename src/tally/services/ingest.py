"""Ingestion: the one write path of Tally."""

from __future__ import annotations

import asyncio
import hmac
import threading
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from tally.auth.service import Principal, Scope
from tally.crypto.records import DataKey
from tally.crypto.sealing import TenantCipher
from tally.crypto.tenant_keys import TenantKeys
from tally.errors import FieldError
from tally.events.model import (
    NewEvent,
    Outcome,
    canonical_json,
    canonical_members,
    canonical_value,
    clear_content,
    event_content,
)
from tally.events.validation import EventDraft
from tally.freshness import FreshCache, Freshness
from tally.gil import handing_off
from tally.metrics import NULL, Metrics
from tally.registry.records import Tenant
from tally.store.groupcommit import GroupCommitter
from tally.store.interface import IngestStore

FUTURE_SKEW = timedelta(minutes=5)
_MAX_REMEMBERED = 1_000_000
TOKEN_MEMO_ENTRIES = 100_000  # (key, value) pairs: about 25 MB at most
TOKEN_MEMO_SETS = 10_000  # a tenant's tokens of a set, about 1.5 KB each: 15 MB at most
TOKEN_MEMO_SHAPES = 10_000  # attribute sets apart from tenants, about 1 KB each: 10 MB


@dataclass(slots=True)
class EventResult:
    """What became of one event of a request."""

    index: int
    id: str | None
    status: str  # accepted | duplicate | rejected
    errors: list[FieldError] = field(default_factory=list)
    conflict: bool = False
    forbidden: bool = False

    @property
    def code(self) -> str | None:
        """The requirement's error code of a rejection (None unless rejected)."""
        if self.status != "rejected":
            return None
        if self.forbidden:
            return "ERR-AUTH-403"
        return "ERR-VAL-409" if self.conflict else "ERR-VAL-400"


@dataclass(slots=True)
class IngestReport:
    results: list[EventResult]

    def count(self, status: str) -> int:
        return sum(1 for result in self.results if result.status == status)


Candidate = EventDraft | list[FieldError]
"""A parsed event, or the problems that kept it from parsing (see events/validation.py)."""

Found = dict[str, tuple[Tenant, DataKey | None]]
"""Registered tenants with their data keys, by id."""


@dataclass(slots=True)
class _Work:
    """A request's events judged: each one's result, those ready to append, and those held
    (refused for their time or a shred unless their identity is already stored: a retry of
    what was accepted is a duplicate whatever the clock says now)."""

    application: str
    results: list[EventResult] = field(default_factory=list)
    ready: list[tuple[EventResult, NewEvent]] = field(default_factory=list)
    held: list[tuple[EventResult, EventDraft, TenantCipher | None]] = field(default_factory=list)

    def events(self) -> list[NewEvent]:
        return [event for _, event in self.ready]


class IngestService:
    def __init__(
        self,
        *,
        store: IngestStore,
        committer: GroupCommitter,
        keys: TenantKeys,
        clock: Callable[[], datetime],
        metrics: Metrics = NULL,
        freshness: Freshness | None = None,
    ) -> None:
        self._store = store
        self._tenant_copies: FreshCache[str, tuple[Tenant, DataKey | None]] = FreshCache(
            freshness or Freshness(0)
        )
        self._metrics = metrics
        self._committer = committer
        self._keys = keys
        self._clock = clock
        # The dictionary entries known to be committed, per tenant (value tokens): an event
        # whose tokens are all here carries no entry to insert, so a batch of events with
        # familiar attributes costs no extra seal and no extra row. Filled only after a
        # commit, so a failed one never hides an entry that is not stored.
        self._stored_tokens: dict[str, set[str]] = {}
        self._remembered = 0
        self._token_memo = TokenMemo()
        self._remember_lock = threading.Lock()

    def ingest(
        self, principal: Principal, candidates: Sequence[Candidate], ids: Sequence[str | None]
    ) -> IngestReport:
        """Judge each candidate against its tenant, store the valid ones in one durable
        transaction (shared with concurrent requests), and report every outcome.

        `ids` are the ids as sent (None where absent or not a string), for the report.
        Raises Forbidden without the events:write scope, StoreUnavailable if the store
        failed: then no event of this request was acknowledged, and retrying the request is
        safe (what a lost COMMIT did store comes back as duplicates).
        """
        principal.require(Scope.EVENTS_WRITE)
        work = self._judge(principal, candidates, ids, self._tenants(candidates))
        if work.held:
            self._judge_stored(work.application, work.held)
        outcomes = self._committer.append(work.events()) if work.ready else []
        return self._report(work, outcomes)

    async def ingest_async(
        self, principal: Principal, candidates: Sequence[Candidate], ids: Sequence[str | None]
    ) -> IngestReport:
        """`ingest` for a caller on the event loop: the commit is awaited, not waited for in
        a thread, and the store is read in a worker thread only when the tenants are not in
        this process's fresh copies (freshness.py)."""
        principal.require(Scope.EVENTS_WRITE)
        found, missing = self._copies(candidates)
        if missing:
            found |= await asyncio.to_thread(self._read_tenants, missing)
        if all(key is not None for _, key in found.values()):
            work = self._judge(principal, candidates, ids, found)
        else:  # a tenant's first event: its data key is made, a write
            work = await asyncio.to_thread(self._judge, principal, candidates, ids, found)
        if work.held:
            await asyncio.to_thread(self._judge_stored, work.application, work.held)
        outcomes = await self._committer.append_async(work.events()) if work.ready else []
        return self._report(work, outcomes)

    def _tenants(self, candidates: Sequence[Candidate]) -> Found:
        """The registered tenants the drafts among `candidates` name, with their data keys:
        from this process's fresh copies where it has them, else from the store."""
        found, missing = self._copies(candidates)
        return found | self._read_tenants(missing) if missing else found

    def _copies(self, candidates: Sequence[Candidate]) -> tuple[Found, list[str]]:
        """The fresh copies of the tenants `candidates` name, and the tenants without one."""
        found: Found = {}
        missing: list[str] = []
        for tenant in sorted({c.tenant for c in candidates if isinstance(c, EventDraft)}):
            copy = self._tenant_copies.get(tenant)
            if copy is None:
                missing.append(tenant)
            else:
                found[tenant] = copy
        return found, missing

    def _read_tenants(self, tenants: Sequence[str]) -> Found:
        """`tenants` with their data keys, read from the store, and copies kept of them. A
        tenant without a data key row is not kept: its key is made by `TenantKeys.ciphers`,
        a write."""
        read_at, generation = self._tenant_copies.stamp()
        found = self._store.tenants_with_keys(tenants)
        for tenant, read in found.items():
            if read[1] is not None:
                self._tenant_copies.put(tenant, read, read_at=read_at, generation=generation)
        return found

    def _judge(
        self,
        principal: Principal,
        candidates: Sequence[Candidate],
        ids: Sequence[str | None],
        found: Mapping[str, tuple[Tenant, DataKey | None]],
    ) -> _Work:
        assert principal.application is not None  # noqa: S101 - registry binds write keys
        tenants = {tenant_id: tenant for tenant_id, (tenant, _) in found.items()}
        ciphers = self._keys.ciphers(
            {t: key for t, (_, key) in found.items() if principal.may_serve(t)}
        )
        now = self._clock()
        windows = {tenant_id: _window(tenant, now) for tenant_id, tenant in tenants.items()}
        work = _Work(application=principal.application)
        # The entries this request's events carry already, per tenant: its events are
        # appended in one transaction, which stores every entry any of them carries, so an
        # entry is sealed once per request, not once per event that uses its value.
        offered: dict[str, _Known] = {}
        for index, candidate in enumerate(handing_off(candidates)):
            result = EventResult(index=index, id=ids[index], status="rejected")
            work.results.append(result)
            if not isinstance(candidate, EventDraft):
                result.errors = candidate
                continue
            tenant = tenants.get(candidate.tenant)
            if tenant is None:
                result.errors = [FieldError("/tenant", "is not a registered tenant")]
            elif not principal.may_serve(tenant.id):
                result.errors = [FieldError("/tenant", "is not a tenant this key may report for")]
                result.forbidden = True
            elif (cipher := ciphers[tenant.id]) is None:
                result.errors = [FieldError("/tenant", "was shredded: it takes no more events")]
                work.held.append((result, candidate, None))
            else:
                oldest, newest = windows[tenant.id]
                if not oldest <= candidate.time <= newest:
                    result.errors = _timeliness(candidate.time, tenant, (oldest, newest))
                    work.held.append((result, candidate, cipher))
                else:
                    known = offered.get(tenant.id)
                    if known is None:
                        stored = self._stored_tokens.get(tenant.id, set())
                        known = offered[tenant.id] = _Known(stored)
                    event = seal_event(
                        candidate,
                        application=principal.application,
                        region=tenant.region,
                        cipher=cipher,
                        known=known,
                        memo=self._token_memo,
                    )
                    if event.dictionary:
                        known.offered.update(token for token, _ in event.dictionary)
                    work.ready.append((result, event))
        return work

    def _report(self, work: _Work, outcomes: Sequence[Outcome]) -> IngestReport:
        for (result, _), outcome in zip(work.ready, outcomes, strict=True):
            _settle(result, outcome)
        if work.ready:
            self._remember(work.events())
        self._metrics.events((result.status, result.code) for result in work.results)
        return IngestReport(results=work.results)

    def _remember(self, events: Sequence[NewEvent]) -> None:
        """Note the dictionary entries `events` committed (a store writes every entry an
        appended batch carries, whatever each event's outcome)."""
        with self._remember_lock:  # request threads remember concurrently
            if self._remembered > _MAX_REMEMBERED:
                # A bound on memory: forgotten entries are only sealed and offered again.
                self._stored_tokens, self._remembered = {}, 0
            for event in events:
                if event.dictionary:
                    known = self._stored_tokens.setdefault(event.tenant, set())
                    known.update(token for token, _ in event.dictionary)
                    self._remembered += len(event.dictionary)

    def _judge_stored(
        self, application: str, held: Sequence[tuple[EventResult, EventDraft, TenantCipher | None]]
    ) -> None:
        """Settle each held event whose identity is stored as a duplicate or a conflict of
        it (one query for the batch); the others keep their rejection.

        With the tenant's data key the content digests decide, as in `append`. Once the
        tenant is shredded (`cipher` None) the key that digested the attributes is gone, so
        only the fields stored in the clear are compared: a retry that differs from the
        stored event in its attributes alone is then a duplicate, not a conflict.
        """
        stored = self._store.find_events([(application, draft.id) for _, draft, _ in held])
        for result, draft, cipher in held:
            found = stored.get((application, draft.id))
            if found is None:
                continue
            event, digest = found
            if cipher is None:
                same = clear_content(event) == clear_content(draft)
            else:
                content = event_content(draft, canonical_json(draft.attributes))
                same = hmac.compare_digest(cipher.digest(content), digest)
            _settle(result, Outcome.DUPLICATE if same else Outcome.CONFLICT)


def _timeliness(
    time: datetime, tenant: Tenant, window: tuple[datetime, datetime]
) -> list[FieldError]:
    """The problems with an event's `time` for `tenant`, whose `window` (`_window`) it must
    fall in."""
    oldest, newest = window
    if time < oldest:
        return [
            FieldError(
                "/time",
                f"is older than the tenant's lateness window of {tenant.lateness_hours} hours",
            )
        ]
    if time > newest:
        return [FieldError("/time", "is more than 5 minutes in the future")]
    return []


def _window(tenant: Tenant, now: datetime) -> tuple[datetime, datetime]:
    """The times a tenant takes events for at `now`: its lateness window to 5 minutes on."""
    return now - timedelta(hours=tenant.lateness_hours), now + FUTURE_SKEW


class _Known:
    """The value tokens a tenant's event need not carry: committed already, or carried by an
    earlier event of the same request."""

    __slots__ = ("offered", "stored")

    def __init__(self, stored: set[str]) -> None:
        self.stored = stored
        self.offered: set[str] = set()

    def __contains__(self, token: object) -> bool:
        return token in self.stored or token in self.offered

    def covers(self, tokens: frozenset[str]) -> bool:
        """Whether every one of `tokens` is known: at once (a subset test in C) when all are
        committed, as most are once a tenant's values have been seen."""
        return tokens <= self.stored or all(token in self for token in tokens)


class TokenMemo:
    """The tokens of attribute sets seen before, by tenant and set: each set's canonical
    JSON, its tokens as stored and each value's token. Tokens are HMACs with the tenant's
    data key (two per attribute, the most costly part of ingesting an event with
    attributes), and billing attributes take few values (a region, a plan, a model) in few
    combinations, so most events find theirs here. A tenant's data key never changes (a
    rewrap keeps it, a shred ends its events), so neither do its tokens. Bounded: full, it
    starts afresh. Without a lock, like every cache here.

    In two levels: a set's shape (its canonical JSON and members), which is the same for
    every tenant, then the tenant's tokens of that shape. Many tenants report the same
    combinations: a tenant's first event with one finds its shape made already and only
    assembles its tokens, from pairs it mostly knows too."""

    def __init__(
        self,
        max_entries: int = TOKEN_MEMO_ENTRIES,
        max_sets: int = TOKEN_MEMO_SETS,
        max_shapes: int = TOKEN_MEMO_SHAPES,
    ) -> None:
        self._max_entries = max_entries
        self._max_sets = max_sets
        self._max_shapes = max_shapes
        self._shapes: dict[tuple[object, ...], _Shape] = {}
        self._sets: dict[tuple[str, str], Tokenised] = {}
        self._pairs: dict[tuple[str, str, str], tuple[str, str]] = {}

    def tokenised(self, cipher: TenantCipher, attributes: Mapping[str, object]) -> Tokenised:
        # Values equal in Python but not in canonical JSON are told apart: True from 1 (by
        # type), -0 from 0 (by sign).
        entry = tuple(
            [
                (key, value.__class__, value, value.is_signed())
                if isinstance(value, Decimal)
                else (key, value.__class__, value)
                for key, value in attributes.items()
            ]
        )
        shape = self._shapes.get(entry)
        if shape is None:
            shape = _shape(attributes)
            if len(self._shapes) >= self._max_shapes:
                self._shapes = {}
            self._shapes[entry] = shape
        # By the shape's JSON, not the shape: a set stays found when the shapes start afresh.
        known = (cipher.tenant, shape.attributes_json)
        found = self._sets.get(known)
        if found is None:
            found = self._tokenise(cipher, shape)
            if len(self._sets) >= self._max_sets:
                self._sets = {}
            self._sets[known] = found
        return found

    def _tokenise(self, cipher: TenantCipher, shape: _Shape) -> Tokenised:
        """The tenant's tokens of `shape` as stored, and its (value token, value JSON) pairs."""
        pairs = self._pairs
        tenant = cipher.tenant
        tokens: list[tuple[str, str]] = []
        values: list[tuple[str, str]] = []
        for key, value_json in shape.members:
            found = pairs.get((tenant, key, value_json)) or self._tokens(cipher, key, value_json)
            tokens.append(found)
            values.append((found[1], value_json))
        # What json.dumps(tokens, sort_keys=True, separators=(",", ":")) writes of the key
        # tokens and value tokens: they are hex digits after a letter, which JSON writes as
        # they are (and key tokens are unique: keys are).
        tokens.sort()
        return Tokenised(
            shape.attributes_json,
            "{" + ",".join([f'"{key}":"{token}"' for key, token in tokens]) + "}",
            tuple(values),
            frozenset([token for token, _ in values]),
        )

    def _tokens(self, cipher: TenantCipher, key: str, value_json: str) -> tuple[str, str]:
        """(key token, value token) of a pair not met before, made and kept."""
        found = (cipher.key_token(key), cipher.value_token(key, value_json))
        if len(self._pairs) >= self._max_entries:
            self._pairs = {}
        self._pairs[(cipher.tenant, key, value_json)] = found
        return found


@dataclass(slots=True, frozen=True)
class _Shape:
    """An attribute set apart from any tenant: its canonical JSON and its members (key,
    value JSON), in key order, each value's JSON written once for both."""

    attributes_json: str
    members: tuple[tuple[str, str], ...]


def _shape(attributes: Mapping[str, object]) -> _Shape:
    members = tuple([(key, canonical_value(attributes[key])) for key in sorted(attributes)])
    return _Shape(canonical_members(members), members)


# Not frozen: a frozen dataclass sets each field through object.__setattr__, and one is built
# for every attribute set not met before. Treated as immutable all the same.
@dataclass(slots=True)
class Tokenised:
    """An attribute set as ingestion stores it: its canonical JSON (sealed and digested),
    its tokens as stored in `events.attribute_tokens` (JSON text, key token -> value token),
    and (value token, value JSON) per attribute, for the dictionary."""

    attributes_json: str
    tokens: str
    values: tuple[tuple[str, str], ...]
    value_tokens: frozenset[str]

    def entries(self, cipher: TenantCipher, known: Container[str]) -> tuple[tuple[str, bytes], ...]:
        """The sealed dictionary entries of the value tokens not in `known`."""
        if isinstance(known, _Known) and known.covers(self.value_tokens):
            return ()
        return tuple(
            (token, cipher.seal_value(token, value_json))
            for token, value_json in self.values
            if token not in known
        )


def attribute_tokens(
    cipher: TenantCipher,
    attributes: Mapping[str, object],
    known: Container[str] = (),
    memo: TokenMemo | None = None,
) -> tuple[str, tuple[tuple[str, bytes], ...]]:
    """The tokens of `attributes` as stored in `events.attribute_tokens` (JSON text, key token
    -> value token), and the sealed dictionary entries of the value tokens not in `known`."""
    found = (memo or TokenMemo()).tokenised(cipher, attributes)
    return found.tokens, found.entries(cipher, known)


def seal_event(
    draft: EventDraft,
    *,
    application: str,
    region: str,
    cipher: TenantCipher,
    known: Container[str] = (),
    memo: TokenMemo | None = None,
) -> NewEvent:
    """`draft` ready to append: its attributes sealed, tokenised (dictionary entries for the
    value tokens not in `known`; tokens from `memo` where it has them) and its content
    digested with the tenant's data key (`cipher`)."""
    found = (memo or TokenMemo()).tokenised(cipher, draft.attributes)
    return NewEvent(
        application=application,
        id=draft.id,
        tenant=draft.tenant,
        type=draft.type,
        quantity=draft.quantity,
        time=draft.time,
        subject=draft.subject,
        unit=draft.unit,
        attributes=cipher.seal(
            application=application, event_id=draft.id, attributes_json=found.attributes_json
        ),
        region=region,
        digest=cipher.digest(event_content(draft, found.attributes_json)),
        attribute_tokens=found.tokens,
        dictionary=found.entries(cipher, known),
    )


def _settle(result: EventResult, outcome: Outcome) -> None:
    if outcome is Outcome.ACCEPTED:
        result.status = "accepted"
    elif outcome is Outcome.DUPLICATE:
        result.status = "duplicate"
        result.errors = []
    else:
        result.status = "rejected"
        result.conflict = True
        result.errors = [
            FieldError("/id", "is already used by this application for an event with other content")
        ]
