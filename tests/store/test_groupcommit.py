"""Group commit on the real stores: many requests, few transactions, each answered right."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tally.errors import StoreUnavailable
from tally.events.model import Outcome
from tally.store.groupcommit import GroupCommitter
from tally.store.interface import EventStore
from tests.store.test_conformance import new_event, read_all


def test_concurrent_requests_share_transactions_and_each_gets_its_own_outcomes(
    store: EventStore,
) -> None:
    batches: list[tuple[int, int]] = []
    committer = GroupCommitter(store, observe=lambda r, e: batches.append((r, e)))
    gate = threading.Barrier(32)

    def request(index: int) -> list[Outcome]:
        gate.wait()
        # Every request repeats a shared id; each also has an id of its own.
        return committer.append(
            [new_event("shared"), new_event(f"own-{index}", tenant=f"t{index}")]
        )

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(request, range(32)))
    committer.close()

    assert all(answer[1] is Outcome.ACCEPTED for answer in answers)
    assert sorted(answer[0] for answer in answers).count(Outcome.ACCEPTED) == 1
    assert sum(events for _, events in batches) == 64
    assert len(batches) < 32  # requests were gathered into shared transactions
    seen, _ = read_all(store)
    assert len(seen) == 33


def test_a_failed_transaction_fails_every_request_in_it_and_stores_none(
    store: EventStore,
) -> None:
    committer = GroupCommitter(store)

    with pytest.raises(Exception):  # noqa: B017 - the driver's own integrity error
        committer.append([new_event("fine"), new_event("bad", quantity="-1")])

    assert read_all(store)[0] == []
    assert committer.append([new_event("fine")]) == [Outcome.ACCEPTED]
    committer.close()


def test_closed_committer_refuses_new_work(store: EventStore) -> None:
    committer = GroupCommitter(store)
    committer.close()

    with pytest.raises(StoreUnavailable):
        committer.append([new_event("late")])


def test_a_failing_observer_neither_loses_answers_nor_stops_the_writer(store: EventStore) -> None:
    def broken(requests: int, events: int) -> None:
        raise RuntimeError("metrics backend down")

    committer = GroupCommitter(store, observe=broken)

    assert committer.append([new_event("a")]) == [Outcome.ACCEPTED]
    assert committer.append([new_event("b")]) == [Outcome.ACCEPTED]
    committer.close()


def test_waiters_on_a_loop_share_transactions_and_each_gets_its_own_outcomes(
    store: EventStore,
) -> None:
    batches: list[tuple[int, int]] = []
    committer = GroupCommitter(store, observe=lambda r, e: batches.append((r, e)))

    async def main() -> list[list[Outcome]]:
        # Every request repeats a shared id; each also has an id of its own.
        return await asyncio.gather(
            *[
                committer.append_async([new_event("shared"), new_event(f"own-{i}", tenant=f"t{i}")])
                for i in range(64)
            ]
        )

    answers = asyncio.run(main())
    committer.close()

    assert all(answer[1] is Outcome.ACCEPTED for answer in answers)
    assert [answer[0] for answer in answers].count(Outcome.ACCEPTED) == 1
    assert len(batches) < 64
    assert len(read_all(store)[0]) == 65


def test_a_cancelled_waiter_leaves_its_events_and_the_others_to_the_transaction(
    store: EventStore,
) -> None:
    committer = GroupCommitter(store)

    async def main() -> list[Outcome]:
        gone = asyncio.ensure_future(committer.append_async([new_event("gone")]))
        kept = asyncio.ensure_future(committer.append_async([new_event("kept")]))
        await asyncio.sleep(0)  # both are queued and waiting
        gone.cancel()  # its commit is a few milliseconds away
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        return await kept

    assert asyncio.run(main()) == [Outcome.ACCEPTED]
    committer.close()
    # Queued before it was cancelled: committed with the others, as the docstring says.
    assert sorted(read_all(store)[0]) == ["gone", "kept"]


def test_a_failed_transaction_fails_every_waiter_of_a_loop_and_of_a_thread(
    store: EventStore,
) -> None:
    committer = GroupCommitter(store)

    async def main() -> list[BaseException | list[Outcome]]:
        return await asyncio.gather(
            committer.append_async([new_event("bad", quantity="-1")]),
            asyncio.to_thread(committer.append, [new_event("fine")]),
            return_exceptions=True,
        )

    answers = asyncio.run(main())
    committer.close()
    # Each got its own transaction's answer: an error for the bad one, and no half-stored event.
    assert isinstance(answers[0], Exception)
    stored = read_all(store)[0]
    assert "bad" not in stored
    assert answers[1] == [Outcome.ACCEPTED] or isinstance(answers[1], Exception)
    assert ("fine" in stored) == (answers[1] == [Outcome.ACCEPTED])
