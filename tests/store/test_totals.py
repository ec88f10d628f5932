"""`EventLog.totals`: count, sum, min and max computed by the database, exactly, on every store.

The values are the ones a float would round: 0.1 ten times, 38-digit quantities, a tiny one
beside a large one. SQLite keeps quantities as text, where its own SUM goes through floating
point and its MIN/MAX compare text; both stores must answer the exact decimals.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from tally.events.log import ExportFilter, Totals
from tally.store.interface import EventStore
from tests.store.test_conformance import NOW, new_event

EDGE = "99999999999999999999.999999999999999999"  # the largest NUMERIC(38, 18)
TINY = "0.000000000000000001"


def append(store: EventStore, quantities: list[str], *, tenant: str = "acme") -> None:
    events = [
        new_event(f"{tenant}-{index}", tenant=tenant, quantity=quantity)
        for index, quantity in enumerate(quantities)
    ]
    store.append(events, received_at=NOW)


def test_a_tenth_ten_times_is_exactly_one(store: EventStore) -> None:
    assert sum([0.1] * 10) != 1.0  # what a float sum would answer
    append(store, ["0.1"] * 10)

    totals = store.totals(ExportFilter(tenant="acme"))

    assert totals == Totals(count=10, sum=Decimal(1), min=Decimal("0.1"), max=Decimal("0.1"))
    assert str(totals.sum) in {"1", "1.0", "1.000000000000000000"}
    assert totals.sum == 1


def test_38_digit_values_sum_exactly(store: EventStore) -> None:
    append(store, [EDGE] * 3)

    totals = store.totals(ExportFilter())

    assert totals.sum == Decimal("299999999999999999999.999999999999999997")
    assert totals.count == 3
    assert totals.max == Decimal(EDGE)


def test_a_tiny_value_is_not_lost_beside_a_large_one(store: EventStore) -> None:
    append(store, [EDGE, TINY, TINY])

    totals = store.totals(ExportFilter())

    # Written out: Python's own Decimal addition would round this to 28 digits.
    assert totals.sum == Decimal("100000000000000000000.000000000000000001")
    assert totals.min == Decimal(TINY)
    assert totals.max == Decimal(EDGE)


def test_min_and_max_compare_as_decimals_not_as_text(store: EventStore) -> None:
    # As text, '10' < '9' and '9' > '10.5'.
    append(store, ["9", "10", "10.5", "100"])

    totals = store.totals(ExportFilter())

    assert (totals.min, totals.max) == (Decimal(9), Decimal(100))
    assert totals.sum == Decimal("129.5")


def test_totals_follow_the_export_filters(store: EventStore) -> None:
    append(store, ["1.5", "2.25"], tenant="acme")
    append(store, ["100"], tenant="globex")
    late = new_event("late", tenant="acme", quantity="7", time=NOW + timedelta(hours=1))
    store.append([late], received_at=NOW)

    assert store.totals(ExportFilter(tenant="acme", time_to=NOW + timedelta(minutes=1))) == (
        Totals(count=2, sum=Decimal("3.75"), min=Decimal("1.5"), max=Decimal("2.25"))
    )
    assert store.totals(ExportFilter(tenants=("acme", "globex"))).sum == Decimal("110.75")
    assert store.totals(ExportFilter(tenant="nobody")) == Totals(0, None, None, None)
