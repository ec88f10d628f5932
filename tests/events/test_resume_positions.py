"""Where a reader of a rewound log resumes (events/log.py resume_positions)."""

from __future__ import annotations

from datetime import UTC, datetime

from tally.events.log import LogEpoch, resume_positions

AT = datetime(2026, 12, 1, tzinfo=UTC)
FIRST = LogEpoch(seq=1, id=b"1" * 16, started_at=AT, reason="created", base=[])
RESTORED = LogEpoch(seq=2, id=b"2" * 16, started_at=AT, reason="restore", base=[5, 9, 0])
AGAIN = LogEpoch(seq=3, id=b"3" * 16, started_at=AT, reason="restore", base=[4, 12, 3])
HISTORY = [FIRST, RESTORED, AGAIN]
HEADS = [8, 20, 6]


def test_a_reader_of_an_earlier_epoch_resumes_where_every_later_epoch_agrees() -> None:
    assert resume_positions([7, 10, 2], FIRST.id, HISTORY, HEADS) == [4, 9, 0]
    assert resume_positions([7, 10, 2], RESTORED.id, HISTORY, HEADS) == [4, 10, 2]
    assert resume_positions([1, 2, 0], FIRST.id, HISTORY, HEADS) == [1, 2, 0]  # behind: as is


def test_a_reader_of_the_current_epoch_past_the_heads_resumes_at_them() -> None:
    assert resume_positions([9, 25, 1], AGAIN.id, HISTORY, HEADS) == [8, 20, 1]


def test_a_cursor_from_before_epochs_is_of_the_first() -> None:
    assert resume_positions([7, 10, 2], None, HISTORY, HEADS) == [4, 9, 0]


def test_an_epoch_this_log_never_had_starts_over() -> None:
    """An epoch begun after the backup this log was restored from, maybe on a branch of its
    own: nothing is known to be shared."""
    assert resume_positions([7, 10, 2], b"x" * 16, HISTORY, HEADS) == [0, 0, 0]


def test_a_reader_behind_every_later_epochs_start_continues_as_it_is() -> None:
    assert resume_positions([3, 9, 0], FIRST.id, HISTORY, HEADS) == [3, 9, 0]
