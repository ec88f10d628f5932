"""tally.gil: long loops hand the GIL on between slices, and walk every item."""

from __future__ import annotations

import pytest

from tally import gil


def test_every_item_is_walked_in_order_handing_the_gil_on_between_slices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handed: list[int] = []
    walked: list[int] = []
    every = gil.HAND_OFF_EVERY

    def sleep(seconds: float) -> None:
        assert seconds == 0
        handed.append(len(walked))

    monkeypatch.setattr(gil.time, "sleep", sleep)
    for count in (0, 1, every, every + 1, 3 * every + 7):
        handed.clear()
        walked.clear()
        items = list(range(count))
        for item in gil.handing_off(items):
            walked.append(item)
        assert walked == items
        # After each full slice with more to come: never before the first, nor after the last.
        assert handed == list(range(every, count, every))
