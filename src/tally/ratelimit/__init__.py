"""Rate limits: GCRA buckets, decided in-process or atomically in Redis (shared by replicas).

`interface.py` holds the contract and the arithmetic, `inprocess.py` and `redis_limiter.py` the
two limiters, `failover.py` the wrapper that falls back to in-process limiting while Redis is
unreachable, `policy.py` what Tally charges for a request, and `http.py` the response fields.
"""
