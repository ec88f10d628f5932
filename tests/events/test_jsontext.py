"""exact_json: what json.dumps writes (compact, UTF-8 as is, no NaN), but every Decimal as the
exact JSON number it stands for."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from enum import IntEnum, StrEnum
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.events.jsontext import exact_json

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


def reference(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


@settings(max_examples=1000, deadline=None)
@given(VALUES)
def test_without_decimals_it_is_what_json_dumps_writes(value: Any) -> None:
    assert exact_json(value) == reference(value)


@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_a_decimal_is_its_exact_number(value: Decimal) -> None:
    text = exact_json({"n": value, "in": [value]})
    assert text == f'{{"n":{value},"in":[{value}]}}'
    assert json.loads(text, parse_float=Decimal, parse_int=Decimal)["n"] == value


class Size(IntEnum):
    LARGE = 3


class Region(StrEnum):
    EU = "eu-west"


def test_subclasses_tuples_mappings_and_keys_as_json_dumps_takes_them() -> None:
    value = {"size": Size.LARGE, "region": Region.EU, "pair": (1, "a"), 7: True}
    assert exact_json(value) == reference(value)
    assert exact_json(MappingProxyType({"a": 1})) == '{"a":1}'
    assert exact_json('"\\\n\u2028é\x00') == reference('"\\\n\u2028é\x00')


def test_refusals_and_default() -> None:
    with pytest.raises(ValueError):
        exact_json(Decimal("NaN"))
    with pytest.raises(ValueError):
        exact_json(float("inf"))
    with pytest.raises(TypeError):
        exact_json({"at": datetime(2026, 1, 1, tzinfo=UTC)})
    when = datetime(2026, 1, 1, tzinfo=UTC)
    assert exact_json({"at": when}, default=lambda v: "t") == '{"at":"t"}'
