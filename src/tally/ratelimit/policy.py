"""What Tally charges, to which bucket: the per-key and per-tenant limits of Settings.

Buckets: `key:<key id>:requests`, `key:<key id>:events`, `tenant:<id>:requests`,
`tenant:<id>:events`. A request costs its key one request (checked right after the key is
authenticated, before the body is read) and each tenant it is attributed to one request; an
ingest request also costs its key one event per event in the body and each tenant one event per
parsed event naming it. A request is attributed to a tenant when:

- it ingests events for that tenant (each tenant named by a parsed event of the body);
- it reads with a `tenant` query parameter naming a tenant the key may see (export, usage,
  reconciliation);
- otherwise, its key is restricted to exactly one tenant.

A tenant is charged at most one request per request. Only tenants the key may serve are
charged, so no key can spend another tenant's budget. No check touches the store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import TypeAdapter, ValidationError

from tally.auth.service import Principal
from tally.errors import RateLimited
from tally.events.validation import Name
from tally.metrics import NULL, Metrics
from tally.ratelimit.inprocess import InProcessLimiter
from tally.ratelimit.interface import Charge, Decision, Limiter, Verdict, tightness
from tally.settings import Settings

# A `tenant` query parameter that breaks the name rule is refused by the route; it is charged
# to no tenant here (and cannot make an arbitrary bucket name).
_TENANT_NAME: TypeAdapter[str] = TypeAdapter(Name)


_CHARGES_KEPT = 10_000


@dataclass(frozen=True, slots=True)
class Rate:
    per_second: int
    burst: int


@dataclass(frozen=True, slots=True)
class RatePolicy:
    """The four limits; None where a limit is off."""

    key_requests: Rate | None = None
    key_events: Rate | None = None
    tenant_requests: Rate | None = None
    tenant_events: Rate | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RatePolicy:
        def rate(per_second: int, burst: int) -> Rate | None:
            return Rate(per_second, burst) if per_second > 0 else None

        return cls(
            key_requests=rate(*settings.rate_limit("key", "requests")),
            key_events=rate(*settings.rate_limit("key", "events")),
            tenant_requests=rate(*settings.rate_limit("tenant", "requests")),
            tenant_events=rate(*settings.rate_limit("tenant", "events")),
        )


@dataclass(slots=True)
class RateNote:
    """What one request was charged so far: its tenants, and the tightest decision seen."""

    charged_tenants: set[str] = field(default_factory=set)
    tightest: Decision | None = None

    def record(self, verdict: Verdict) -> None:
        found = verdict.tightest()
        if found is not None and (
            self.tightest is None or tightness(found) > tightness(self.tightest)
        ):
            self.tightest = found


def request_tenant(principal: Principal, query_tenant: str | None) -> str | None:
    """The tenant a request that is not an ingest is attributed to, if any."""
    if query_tenant is not None and principal.may_serve(query_tenant):
        try:
            return _TENANT_NAME.validate_python(query_tenant)
        except ValidationError:
            pass
    if principal.tenants is not None and len(principal.tenants) == 1:
        return principal.tenants[0]
    return None


class RateGuard:
    """Charges requests and events to their buckets; refuses with RateLimited when over."""

    def __init__(self, limiter: Limiter, policy: RatePolicy, metrics: Metrics = NULL) -> None:
        self.limiter = limiter
        self.policy = policy
        self._metrics = metrics
        # Whether a charge is answered from this process's memory alone, without I/O: then
        # it may be made on the event loop (api/fastpath.py).
        self.local = isinstance(limiter, InProcessLimiter)
        # The charges made before, by (bucket, cost): the same few for every request of a key
        # or tenant. Bounded: full, it starts afresh. Without a lock, like every cache here.
        self._charges: dict[tuple[str, int], tuple[Charge, str]] = {}

    def admit_request(self, principal: Principal, *, tenant: str | None, note: RateNote) -> None:
        """Charge one request to the key and to `tenant` (see request_tenant).

        Raises RateLimited, having charged nothing, when a limit is reached.
        """
        charges: list[tuple[Charge, str]] = []
        policy = self.policy
        if policy.key_requests is not None:
            charges.append(
                self._charge("key", principal.key_id, "requests", 1, policy.key_requests)
            )
        if tenant is not None and policy.tenant_requests is not None:
            charges.append(self._charge("tenant", tenant, "requests", 1, policy.tenant_requests))
        self._admit(charges, note)
        if tenant is not None:
            note.charged_tenants.add(tenant)

    def admit_events(
        self, principal: Principal, *, events: int, tenants: Iterable[str], note: RateNote
    ) -> None:
        """Charge a parsed ingest body: `events` to the key; to each tenant the key may serve,
        the events naming it (`tenants`: the tenant of each parsed event) and, unless charged
        already, one request. All or nothing.

        Raises RateLimited, having charged nothing, when a limit is reached.
        """
        policy = self.policy
        charges: list[tuple[Charge, str]] = []
        if policy.key_events is not None and events > 0:
            charges.append(
                self._charge("key", principal.key_id, "events", events, policy.key_events)
            )
        per_tenant = (
            Counter(tenants)  # counted in C: a key for every tenant
            if principal.tenants is None
            else Counter(tenant for tenant in tenants if principal.may_serve(tenant))
        )
        for tenant, count in sorted(per_tenant.items()):
            if policy.tenant_events is not None:
                charges.append(
                    self._charge("tenant", tenant, "events", count, policy.tenant_events)
                )
            if policy.tenant_requests is not None and tenant not in note.charged_tenants:
                charges.append(
                    self._charge("tenant", tenant, "requests", 1, policy.tenant_requests)
                )
        self._admit(charges, note)
        note.charged_tenants.update(per_tenant)

    def _charge(
        self, holder: str, name: str, unit: str, cost: int, rate: Rate
    ) -> tuple[Charge, str]:
        """The charge of `cost` at `rate` to bucket `holder:name:unit` (`name`: a key's id or
        a tenant's), and what a refusal calls it."""
        bucket = f"{holder}:{name}:{unit}"
        found = self._charges.get((bucket, cost))
        if found is None:
            label = f"this key's {unit}" if holder == "key" else f"tenant {name}'s {unit}"
            charge = Charge(bucket=bucket, cost=cost, rate=rate.per_second, burst=rate.burst)
            found = (charge, label)
            if len(self._charges) >= _CHARGES_KEPT:
                self._charges = {}
            self._charges[(bucket, cost)] = found
        return found

    def _admit(self, charges: list[tuple[Charge, str]], note: RateNote) -> None:
        if not charges:
            return
        verdict = self.limiter.acquire([charge for charge, _ in charges])
        note.record(verdict)
        if verdict.allowed:
            return
        refusal = verdict.tightest()
        assert refusal is not None  # noqa: S101 - a refused verdict has a refused decision
        what = {charge.bucket: label for charge, label in charges}[refusal.bucket]
        # The bucket's holder kind and unit (`key`, `requests`), never the id between them.
        holder, unit = refusal.bucket.split(":", 1)[0], refusal.bucket.rsplit(":", 1)[-1]
        self._metrics.rate_limited(f"{holder}_{unit}")
        raise RateLimited(
            f"Over the rate limit for {what}; nothing was done. "
            f"Retry after {refusal.retry_after} s.",
            limit=refusal.limit,
            remaining=refusal.remaining,
            reset=refusal.reset,
            retry_after=refusal.retry_after,
        )

    def close(self) -> None:
        self.limiter.close()
