"""One process of the SDK scenario: `python -m bench.sdk_worker '{"url", "key", "seconds",
"tenants", "prefix", "most"?}'` reports events through tally.client as fast as `report()` takes them
for `seconds`, flushes, and prints one JSON line of what became of them."""

from __future__ import annotations

import json
import sys
import time
from decimal import Decimal

from tally.client import Client, Event

REGIONS = ("eu-west", "eu-central", "us-east", "ap-south")
MODELS = ("small", "medium", "large", "xl", "embed")


def main() -> int:
    spec = json.loads(sys.argv[1])
    reported = 0
    began = time.perf_counter()
    with Client([spec["url"]], spec["key"]) as client:
        stop = began + spec["seconds"]
        most = spec.get("most") or float("inf")  # --quick: a bound on the events too
        while time.perf_counter() < stop and reported < most:
            for _ in range(100):
                n = reported
                client.report(
                    Event(
                        id=f"{spec['prefix']}-{n}",
                        tenant=f"t{n % spec['tenants']:05d}",
                        type="llm.tokens",
                        quantity=Decimal(n % 4000) / 4,
                        subject=f"user-{n % 97}",
                        unit="token",
                        attributes={
                            "region": REGIONS[n % 4],
                            "model": MODELS[n % 5],
                            "plan": "pro",
                            "feature": "chat",
                        },
                    )
                )
                reported += 1
        result = client.flush(timeout=600)
    seconds = time.perf_counter() - began
    sys.stdout.write(
        json.dumps(
            {
                "reported": reported,
                "acknowledged": result.acknowledged,
                "duplicates": result.duplicates,
                "failed": len(result.failed),
                "pending": result.pending,
                "seconds": seconds,
            }
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
