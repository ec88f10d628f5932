"""JSON text with exact numbers: a Decimal is written as the JSON number it stands for.

The standard encoder can write a Decimal only as a string or through a float. Numeric
attributes are numbers on the wire and in the export, and a float rounds the large or long
ones, so whatever writes them back out (the SDK's reports, `tally export`'s files) uses this.
Standard library only: the client SDK imports it without the server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from decimal import Decimal

# What json.dumps(ensure_ascii=False) writes of a string (in C), without an encoder per call.
from json.encoder import encode_basestring as _string


def exact_json(value: object, *, default: Callable[[object], object] | None = None) -> str:
    """Compact JSON, UTF-8 as is, every Decimal as its exact number (`str` keeps its text:
    `1.5E+2`, `0.10`); a finite Decimal only (NaN and infinities are not JSON numbers).
    `default` turns other values into JSON values, as for `json.dumps`.

    Raises ValueError for a non-finite Decimal or float, TypeError for a value neither JSON
    nor handled by `default`.

    Every other value is written as `json.dumps(value, ensure_ascii=False, allow_nan=False,
    separators=(",", ":"))` would, by its C string encoder and the number types' own text:
    a json.dumps per value built an encoder each time, most of the SDK's cost per event.
    """
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, dict):
        return _object(value, default)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("a non-finite decimal is not a JSON number")
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join([exact_json(item, default=default) for item in value]) + "]"
    if isinstance(value, Mapping):  # an ABC: checked after the common types
        return _object(value, default)
    if isinstance(value, float):
        return json.dumps(value, allow_nan=False)
    if default is not None:
        return exact_json(default(value), default=default)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _object(value: Mapping[object, object], default: Callable[[object], object] | None) -> str:
    members = [f"{_key(k)}:{exact_json(v, default=default)}" for k, v in value.items()]
    return "{" + ",".join(members) + "}"


def _key(key: object) -> str:
    """A member's name: its text, as `str()` gives it for a key that is not a string."""
    return _string(key if isinstance(key, str) else str(key))
