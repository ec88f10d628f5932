"""The Redis limiter: every worker and replica shares the buckets, one Lua script per decision."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tally.ratelimit.interface import Charge, Decision, LimiterUnavailable, Verdict, check_distinct

# The arithmetic of interface.py, in Redis's Lua (numbers are doubles, exact below 2**53; the
# bounds on rate, burst and cost keep every figure below it, and idiv divides exactly).
# Run atomically by Redis: read every bucket, decide, and write all of them or none. The clock
# is Redis's own TIME, so replicas whose clocks disagree still share one notion of "now".
# A bucket is stored as "tat:frac" with a TTL that ends when it would be full again.
_SCRIPT = """
local MICROS = 1000000
local function idiv(a, b)
  local q = math.floor(a / b)
  local r = a - q * b
  if r < 0 then q = q - 1 elseif r >= b then q = q + 1 end
  return q
end
local function cdiv(a, b) return idiv(a + b - 1, b) end

local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * MICROS + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end

local out = {1}
local debts = {}
for i, key in ipairs(KEYS) do
  local cost = tonumber(ARGV[3 * i - 1])
  local rate = tonumber(ARGV[3 * i])
  local burst = tonumber(ARGV[3 * i + 1])
  local debt = 0
  local raw = redis.call('GET', key)
  if raw then
    local sep = string.find(raw, ':', 1, true)
    local tat = tonumber(string.sub(raw, 1, sep - 1))
    local frac = tonumber(string.sub(raw, sep + 1))
    if tat >= now then debt = (tat - now) * rate + math.min(frac, rate - 1) end
  end
  local capacity = burst * MICROS
  local per_second = rate * MICROS
  local after = debt + cost * MICROS
  if after <= capacity then
    debts[i] = after
    table.insert(out, 1)
    table.insert(out, burst)
    table.insert(out, idiv(capacity - after, MICROS))
    table.insert(out, cdiv(after, per_second))
    table.insert(out, 0)
  else
    out[1] = 0
    local wait = cdiv(after - capacity, per_second)
    if cost > burst then wait = cdiv(debt, per_second) end
    table.insert(out, 0)
    table.insert(out, burst)
    table.insert(out, idiv(math.max(0, capacity - debt), MICROS))
    table.insert(out, cdiv(debt, per_second))
    table.insert(out, math.max(1, wait))
  end
end

if out[1] == 1 then
  for i, key in ipairs(KEYS) do
    local rate = tonumber(ARGV[3 * i])
    local debt = debts[i]
    if debt == 0 then
      redis.call('DEL', key)
    else
      local whole = idiv(debt, rate)
      local frac = debt - whole * rate
      local ttl = cdiv(debt, rate * 1000) + 1
      redis.call('SET', key, string.format('%d:%d', now + whole, frac), 'PX', ttl)
    end
  end
end
return out
"""

_FIELDS = 5  # allowed, limit, remaining, reset, retry_after per bucket


class RedisLimiter:
    """GCRA buckets in Redis at `url`, under keys `prefix + bucket`.

    `timeout` (seconds) bounds connecting and every reply, and nothing is retried here, so an
    unreachable Redis costs a request at most about `timeout` (failover.py then stops asking
    for a while). `clock` (microseconds) replaces Redis's TIME, for tests that need a frozen or
    stepped clock; leave it None in production. The keys in one acquire must live on one node
    (a single Redis, or a Redis Cluster with a hash tag in `prefix`).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        timeout: float,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._script = self._client.register_script(_SCRIPT)
        self._prefix = prefix
        self._clock = clock

    def acquire(self, charges: Sequence[Charge]) -> Verdict:
        """See Limiter.acquire. Raises LimiterUnavailable on any Redis failure."""
        check_distinct(charges)
        if not charges:
            return Verdict.of(())
        keys = [self._prefix + charge.bucket for charge in charges]
        now = "" if self._clock is None else str(self._clock())
        args: list[str | int] = [now]
        for charge in charges:
            args += [charge.cost, charge.rate, charge.burst]
        try:
            reply = self._script(keys=keys, args=args)
        except (redis.RedisError, OSError) as error:
            raise LimiterUnavailable(type(error).__name__) from error
        values = [int(value) for value in reply]
        decisions = []
        for index, charge in enumerate(charges):
            allowed, limit, remaining, reset, retry_after = values[
                1 + index * _FIELDS : 1 + (index + 1) * _FIELDS
            ]
            decisions.append(
                Decision(
                    bucket=charge.bucket,
                    allowed=bool(allowed),
                    limit=limit,
                    remaining=remaining,
                    reset=reset,
                    retry_after=retry_after,
                )
            )
        return Verdict.of(tuple(decisions))

    def ping(self) -> None:
        """See SharedLimiter.ping: bounded by `timeout`, like every reply."""
        try:
            self._client.ping()
        except (redis.RedisError, OSError) as error:
            raise LimiterUnavailable(type(error).__name__) from error

    def close(self) -> None:
        self._client.close()
