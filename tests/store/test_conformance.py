"""The EventStore contract, run against every store (SQLite and the real PostgreSQL)."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from tally.auth.records import KeyRecord
from tally.crypto.records import DataKey
from tally.crypto.sealing import TenantCipher
from tally.errors import AlreadyExists
from tally.events.log import ExportFilter, partition_of
from tally.events.model import NewEvent, Outcome, StoredEvent
from tally.events.validation import EventDraft
from tally.registry.records import Application, Tenant
from tally.services.ingest import seal_event
from tally.store.interface import EventStore

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def cipher(tenant: str) -> TenantCipher:
    """A fixed data key per tenant: stores treat sealed attributes as opaque bytes."""
    return TenantCipher(tenant, hashlib.sha256(tenant.encode()).digest())


def opened(event: StoredEvent) -> StoredEvent:
    text = cipher(event.tenant).open(
        application=event.application, event_id=event.id, sealed=event.sealed
    )
    return replace(event, attributes_json=text)


def new_event(
    event_id: str,
    *,
    tenant: str = "acme",
    quantity: str = "1",
    type: str = "compute.vcpu_seconds",
    application: str = "vm",
    subject: str | None = None,
    time: datetime = NOW,
    attributes: dict[str, str | bool | Decimal] | None = None,
) -> NewEvent:
    draft = EventDraft(
        id=event_id,
        tenant=tenant,
        type=type,
        quantity=Decimal(quantity),
        time=time,
        subject=subject,
        unit="s",
        attributes=attributes or {},
    )
    return seal_event(draft, application=application, region="eu-west", cipher=cipher(tenant))


def read_all(
    store: EventStore, filters: ExportFilter | None = None, limit: int = 1000
) -> tuple[list[str], list[int]]:
    """Every event id in export order, following positions to the end, and the last positions."""
    positions, start = [0] * store.partitions, 0
    seen: list[str] = []
    while True:
        page = store.read(
            positions=positions, start=start, filters=filters or ExportFilter(), limit=limit
        )
        seen.extend(e.id for e in page.events)
        positions, start = page.positions, page.start
        if not page.has_more:
            return seen, positions


def test_append_reports_accepted_duplicate_and_conflict_in_order(store: EventStore) -> None:
    first = store.append([new_event("a"), new_event("b")], received_at=NOW)
    again = store.append(
        [new_event("a"), new_event("b", quantity="2"), new_event("c")], received_at=NOW
    )

    assert first == [Outcome.ACCEPTED, Outcome.ACCEPTED]
    assert again == [Outcome.DUPLICATE, Outcome.CONFLICT, Outcome.ACCEPTED]
    assert store.get_event("vm", "b").quantity == Decimal("1")  # type: ignore[union-attr]


def test_repeats_inside_one_batch_are_judged_against_the_first(store: EventStore) -> None:
    outcomes = store.append(
        [new_event("a"), new_event("a"), new_event("a", quantity="9")], received_at=NOW
    )

    assert outcomes == [Outcome.ACCEPTED, Outcome.DUPLICATE, Outcome.CONFLICT]
    assert read_all(store)[0] == ["a"]


def test_equal_decimals_are_the_same_content(store: EventStore) -> None:
    store.append([new_event("a", quantity="1.50")], received_at=NOW)

    assert store.append([new_event("a", quantity="1.5")], received_at=NOW) == [Outcome.DUPLICATE]


def test_identity_is_per_application(store: EventStore) -> None:
    outcomes = store.append(
        [new_event("a", application="vm"), new_event("a", application="db")], received_at=NOW
    )

    assert outcomes == [Outcome.ACCEPTED, Outcome.ACCEPTED]


def test_quantities_are_exact_at_the_edges_of_numeric_38_18(store: EventStore) -> None:
    edge = "99999999999999999999.999999999999999999"
    store.append(
        [new_event("big", quantity=edge), new_event("tiny", quantity="0.000000000000000001")],
        received_at=NOW,
    )

    assert store.get_event("vm", "big").quantity == Decimal(edge)  # type: ignore[union-attr]
    tiny = store.get_event("vm", "tiny")
    assert tiny is not None
    assert tiny.quantity == Decimal("1E-18")
    assert opened(tiny).to_json().count('"quantity":"0.000000000000000001"') == 1


def test_stored_event_round_trips_every_field(store: EventStore) -> None:
    attributes: dict[str, str | bool | Decimal] = {
        "sku": "std-2",
        "spot": True,
        "weight": Decimal("0.1"),
    }
    sent = new_event("a", subject="vm-42", attributes=attributes, time=NOW - timedelta(hours=1))
    store.append([sent], received_at=NOW)

    found = store.get_event("vm", "a")

    assert found is not None
    got = opened(found)
    assert (got.tenant, got.type, got.subject, got.unit, got.region) == (
        "acme",
        "compute.vcpu_seconds",
        "vm-42",
        "s",
        "eu-west",
    )
    assert got.time == sent.time
    assert got.received_at == NOW
    assert got.attributes == attributes
    assert '"weight":0.1' in got.to_json()


def test_get_event_returns_none_when_missing(store: EventStore) -> None:
    assert store.get_event("vm", "nothing") is None


def test_paging_returns_every_event_once_across_partitions(store: EventStore) -> None:
    tenants = [f"t{i}" for i in range(40)]
    assert len({partition_of(t, store.partitions) for t in tenants}) > 5
    sent = [new_event(f"e{i}", tenant=tenants[i % 40]) for i in range(300)]
    store.append(sent[:150], received_at=NOW)
    store.append(sent[150:], received_at=NOW)

    for limit in (1, 7, 1000):
        seen, _ = read_all(store, limit=limit)
        assert sorted(seen) == sorted(e.id for e in sent)
        assert len(seen) == len(set(seen))


def test_polling_from_the_last_positions_returns_only_new_events(store: EventStore) -> None:
    store.append([new_event("a"), new_event("b", tenant="globex")], received_at=NOW)
    _, positions = read_all(store)

    store.append([new_event("c"), new_event("a")], received_at=NOW)
    page = store.read(positions=positions, start=0, filters=ExportFilter(), limit=10)

    assert [e.id for e in page.events] == ["c"]
    assert page.has_more is False


def test_has_more_is_false_when_a_page_ends_exactly_at_the_end(store: EventStore) -> None:
    store.append([new_event(f"e{i}", tenant=f"t{i}") for i in range(5)], received_at=NOW)

    page = store.read(positions=[0] * store.partitions, start=0, filters=ExportFilter(), limit=5)

    assert len(page.events) == 5
    assert page.has_more is False


def test_a_busy_partition_does_not_starve_the_others(store: EventStore) -> None:
    by_partition = sorted((partition_of(f"t{i}", store.partitions), f"t{i}") for i in range(40))
    (_, busy), (_, quiet) = by_partition[0], by_partition[-1]
    store.append([new_event(f"busy-{i}", tenant=busy) for i in range(50)], received_at=NOW)
    store.append([new_event("quiet-1", tenant=quiet)], received_at=NOW)

    first = store.read(positions=[0] * store.partitions, start=0, filters=ExportFilter(), limit=10)
    second = store.read(
        positions=first.positions, start=first.start, filters=ExportFilter(), limit=10
    )

    assert {e.tenant for e in first.events} == {busy}
    assert first.has_more is True
    assert second.events[0].id == "quiet-1"  # served before the rest of the busy partition
    assert read_all(store)[0].count("quiet-1") == 1


def test_filters_select_matching_events(store: EventStore) -> None:
    store.append(
        [
            new_event("a", tenant="acme", type="compute.vcpu_seconds", subject="vm-1"),
            new_event("b", tenant="acme", type="storage.gib_hours", subject="vm-2"),
            new_event("c", tenant="globex", type="compute.vcpu_seconds", application="db"),
            new_event("d", tenant="acme", time=NOW - timedelta(hours=2)),
            new_event("e", tenant="acme", time=NOW + timedelta(hours=1)),
        ],
        received_at=NOW,
    )

    def ids(**fields: object) -> list[str]:
        return sorted(read_all(store, ExportFilter(**fields))[0])  # type: ignore[arg-type]

    assert ids(tenant="acme") == ["a", "b", "d", "e"]
    assert ids(application="db") == ["c"]
    assert ids(type="storage.gib_hours") == ["b"]
    assert ids(subject="vm-1") == ["a"]
    assert ids(time_from=NOW, time_to=NOW + timedelta(hours=1)) == ["a", "b", "c"]
    assert ids(tenants=("globex",)) == ["c"]
    assert ids(tenant="acme", tenants=("globex",)) == []


def test_time_filters_order_every_year_from_1_to_9999(store: EventStore) -> None:
    times = {
        "y1": datetime(1, 1, 1, tzinfo=UTC),
        "y999": datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        "y1000": datetime(1000, 1, 1, tzinfo=UTC),
        "y2026": NOW,
        "y9999": datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    }
    store.append([new_event(name, time=time) for name, time in times.items()], received_at=NOW)

    def ids(**fields: object) -> list[str]:
        return sorted(read_all(store, ExportFilter(**fields))[0])  # type: ignore[arg-type]

    y999, y1000 = datetime(999, 1, 1, tzinfo=UTC), datetime(1000, 1, 1, tzinfo=UTC)
    assert ids(time_from=y999) == ["y1000", "y2026", "y999", "y9999"]
    assert ids(time_to=y1000) == ["y1", "y999"]
    assert ids(time_from=y999, time_to=y1000) == ["y999"]
    assert ids(time_from=y1000, time_to=NOW + timedelta(microseconds=1)) == ["y1000", "y2026"]
    for name, time in times.items():
        found = store.get_event("vm", name)
        assert found is not None and found.time == time, name
        assert opened(found).to_json().count(f'"time":"{time.year:04d}-') == 1


def test_find_events_returns_stored_identities_with_their_digests(store: EventStore) -> None:
    sent = [new_event("a", quantity="2"), new_event("b", application="db")]
    store.append(sent, received_at=NOW)

    found = store.find_events([("vm", "a"), ("vm", "b"), ("db", "b"), ("vm", "missing")])

    assert set(found) == {("vm", "a"), ("db", "b")}
    event, digest = found[("vm", "a")]
    assert (event.id, event.quantity, event.time) == ("a", Decimal("2"), NOW)
    assert digest == sent[0].digest
    assert found[("db", "b")][1] == sent[1].digest
    assert store.find_events([]) == {}


def test_filtered_reader_moves_past_events_it_does_not_want(store: EventStore) -> None:
    store.append([new_event(f"e{i}", type="other.kind") for i in range(50)], received_at=NOW)

    page = store.read(
        positions=[0] * store.partitions,
        start=0,
        filters=ExportFilter(type="wanted.kind"),
        limit=10,
    )

    assert page.events == []
    assert page.has_more is False
    assert sum(page.positions) == 50  # the next poll starts after them


def test_a_failed_batch_stores_nothing(store: EventStore) -> None:
    store.append([new_event("a")], received_at=NOW)
    broken = new_event("b", quantity="-1")  # the schema refuses negatives

    with pytest.raises(Exception):  # noqa: B017 - each driver raises its own error type
        store.append([new_event("c"), broken], received_at=NOW)

    assert read_all(store)[0] == ["a"]
    assert store.append([new_event("c")], received_at=NOW) == [Outcome.ACCEPTED]


# One event more than the identity: a small commit (PostgreSQL's four-round-trip append), and
# one large enough for its COPY, which a race fails and the INSERT path then settles.
@pytest.mark.parametrize("own", [1, 120])
def test_concurrent_appends_of_one_identity_store_it_once(store: EventStore, own: int) -> None:
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def write(index: int) -> None:
        batch = [new_event("same")] + [
            new_event(f"own-{index}-{n}", tenant=f"t{index}") for n in range(own)
        ]
        result = store.append(batch, received_at=NOW)
        with lock:
            outcomes.append(result[0])

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outcomes) == sorted([Outcome.ACCEPTED] + [Outcome.DUPLICATE] * 7)
    seen, _ = read_all(store)
    assert seen.count("same") == 1
    assert len(seen) == 1 + 8 * own


def test_small_and_large_commits_of_new_attribute_values_do_not_deadlock(
    store: EventStore,
) -> None:
    """Writers of one tenant, a large batch and small ones, each bringing the same new
    attribute values: each takes the tenant's partition lock and inserts the same dictionary
    entries. Taken in different orders by different writers, those locks would deadlock,
    and PostgreSQL would fail one commit (a 503 for every request in it)."""
    failures: list[BaseException] = []
    rounds, writers = 12, 4

    def write(index: int, start: threading.Barrier) -> None:
        for round_ in range(rounds):
            size = 150 if index == 0 else 1 + index
            batch = [
                new_event(
                    f"r{round_}-w{index}-{n}",
                    attributes={"model": f"m{round_}", "plan": f"p{round_}-{n % 3}"},
                )
                for n in range(size)
            ]
            start.wait()
            try:
                store.append(batch, received_at=NOW)
            except BaseException as error:  # noqa: BLE001 - reported below
                failures.append(error)

    start = threading.Barrier(writers)
    threads = [threading.Thread(target=write, args=(i, start)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    seen, _ = read_all(store)
    assert len(seen) == rounds * (150 + sum(1 + i for i in range(1, writers)))


def test_registration_round_trips_and_refuses_repeats(store: EventStore) -> None:
    tenant = Tenant(id="acme", name="Acme", region="eu-west", lateness_hours=72, created_at=NOW)
    store.create_tenant(tenant)
    store.create_application(Application(id="vm", name=None, created_at=NOW))

    with pytest.raises(AlreadyExists):
        store.create_tenant(tenant)
    with pytest.raises(AlreadyExists):
        store.create_application(Application(id="vm", name="again", created_at=NOW))
    assert store.get_tenants(["acme", "nope"]) == {"acme": tenant}
    assert [t.id for t in store.list_tenants()] == ["acme"]
    assert store.get_application("vm") == Application(id="vm", name=None, created_at=NOW)
    assert store.get_application("nope") is None


def test_data_keys_are_made_once_rewrapped_by_compare_and_set_and_shredded_for_good(
    store: EventStore,
) -> None:
    for tenant_id in ("acme", "globex", "initech"):
        store.create_tenant(
            Tenant(id=tenant_id, name=None, region="eu-west", lateness_hours=72, created_at=NOW)
        )
    assert {t: k for t, (_, k) in store.tenants_with_keys(["acme", "nope"]).items()} == {
        "acme": None
    }
    first = DataKey("acme", "mk-1", b"wrapped-1", NOW, None)
    assert store.add_data_key(first) == first
    # A racing second maker gets the first one back.
    assert store.add_data_key(replace(first, master_key_id="mk-2", wrapped=b"other")) == first
    store.add_data_key(DataKey("globex", "mk-1", b"wrapped-g", NOW, None))
    assert store.tenants_with_keys(["acme"])["acme"] == (store.get_tenants(["acme"])["acme"], first)
    assert store.data_key_usage() == {"mk-1": 2}
    assert [k.master_key_id for k in store.sample_data_keys()] == ["mk-1"]

    assert not store.rewrap_data_key(
        "acme", expected_master="mk-0", master_key_id="mk-2", wrapped=b"w2", at=NOW
    )
    assert store.rewrap_data_key(
        "acme", expected_master="mk-1", master_key_id="mk-2", wrapped=b"w2", at=NOW
    )
    assert [k.tenant for k in store.data_keys_to_rewrap("mk-2", limit=10)] == ["globex"]
    assert store.data_key_usage() == {"mk-1": 1, "mk-2": 1}

    assert store.shred_data_key("acme", at=NOW)
    assert store.shred_data_key("initech", at=NOW)  # no key yet: none is ever made for it
    assert not store.shred_data_key("nope", at=NOW)
    shredded = [key for _, key in store.tenants_with_keys(["acme", "initech"]).values()]
    assert all(k is not None and k.wrapped is None and k.master_key_id is None for k in shredded)
    assert len(shredded) == 2
    assert store.add_data_key(DataKey("initech", "mk-2", b"new", NOW, None)).wrapped is None
    assert not store.rewrap_data_key(
        "acme", expected_master="mk-2", master_key_id="mk-3", wrapped=b"w3", at=NOW
    )
    assert store.data_key_usage() == {"mk-1": 1}


def test_keys_are_found_by_hash_and_revoked_once(store: EventStore) -> None:
    store.create_application(Application(id="vm", name=None, created_at=NOW))
    key = KeyRecord(
        id="key_1",
        secret_hash=b"\x01" * 32,
        scopes=("events:write",),
        application="vm",
        tenants=("acme", "globex"),
        created_at=NOW,
        expires_at=NOW + timedelta(days=1),
        revoked_at=None,
    )
    store.create_key(key)

    assert store.find_key(b"\x01" * 32) == key
    assert store.find_key(b"\x02" * 32) is None
    assert store.count_keys() == 1
    assert store.revoke_key("key_1", at=NOW) is True
    assert store.revoke_key("key_1", at=NOW + timedelta(hours=1)) is True
    assert store.find_key(b"\x01" * 32).revoked_at == NOW  # type: ignore[union-attr]
    assert store.revoke_key("key_nope", at=NOW) is False
    assert [k.id for k in store.list_keys()] == ["key_1"]


def test_secret_is_made_once_and_kept(store: EventStore) -> None:
    first = store.secret("cursor")

    assert len(first) == 32
    assert store.secret("cursor") == first
    assert store.secret("other") != first


def test_migrate_twice_is_harmless(store: EventStore) -> None:
    assert store.migrate() == []
