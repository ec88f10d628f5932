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


def exact_json(value: object, *, default: Callable[[object], object] | None = None) -> str:
    """Compact JSON, UTF-8 as is, every Decimal as its exact number (`str` keeps its text:
    `1.5E+2`, `0.10`); a finite Decimal only (NaN and infinities are not JSON numbers).
    `default` turns other values into JSON values, as for `json.dumps`.

    Raises ValueError for a non-finite Decimal or float, TypeError for a value neither JSON
    nor handled by `default`.
    """
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("a non-finite decimal is not a JSON number")
        return str(value)
    if isinstance(value, Mapping):
        members = (
            f"{exact_json(str(k))}:{exact_json(v, default=default)}" for k, v in value.items()
        )
        return "{" + ",".join(members) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(exact_json(item, default=default) for item in value) + "]"
    if value is None or isinstance(value, str | bool | int | float):
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    if default is not None:
        return exact_json(default(value), default=default)
    raise TypeError(f"{type(value).__name__} is not JSON")
