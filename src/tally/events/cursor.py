"""The export cursor: opaque, tamper-evident, bound to its filter, stable across restarts.

It carries one offset per export-log partition (store/interface.py), the partition the next
page starts with (store/plan.py), and a digest of the filter
it was issued for, signed with HMAC-SHA256 under a secret kept in the store itself, so every
replica, restart and restored backup accepts it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

from tally.errors import FieldError, InvalidInput

_VERSION = 1
_MAC_BYTES = 16
_DIGEST_BYTES = 12


def _varints(values: Sequence[int]) -> bytes:
    out = bytearray()
    for value in values:
        rest = value
        while True:
            low, rest = rest & 0x7F, rest >> 7
            out.append(low | (0x80 if rest else 0))
            if not rest:
                break
    return bytes(out)


def _read_varints(data: bytes) -> list[int]:
    values: list[int] = []
    value = shift = 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            values.append(value)
            value = shift = 0
    if shift:
        raise ValueError("truncated")
    return values


def _refused(detail: str) -> InvalidInput:
    return InvalidInput(detail, [FieldError(pointer="", detail=detail, parameter="cursor")])


class CursorCodec:
    def __init__(self, secret: bytes) -> None:
        self._key = secret

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, positions: Sequence[int], start: int, filter_digest: bytes) -> str:
        payload = bytes([_VERSION]) + filter_digest + _varints([*positions, start])
        token = base64.urlsafe_b64encode(payload + self._mac(payload)).rstrip(b"=")
        return token.decode()

    def decode(
        self, cursor: str, *, filter_digest: bytes, partitions: int
    ) -> tuple[list[int], int]:
        """The positions and start partition in `cursor`. Raises InvalidInput if it was
        altered, was issued by another store, or was issued for another filter."""
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        except ValueError:
            raise _refused("The cursor is not one Tally issued.") from None
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if len(raw) <= _MAC_BYTES + 1 or not hmac.compare_digest(mac, self._mac(payload)):
            raise _refused("The cursor is not one Tally issued.")
        if payload[0] != _VERSION:
            raise _refused("The cursor is from an incompatible version; start without one.")
        if payload[1 : 1 + _DIGEST_BYTES] != filter_digest:
            raise _refused("The cursor was issued for other filters; repeat them unchanged.")
        try:
            positions = _read_varints(payload[1 + _DIGEST_BYTES :])
        except ValueError:
            raise _refused("The cursor is not one Tally issued.") from None
        if len(positions) != partitions + 1 or positions[-1] >= partitions:
            raise _refused("The cursor is not one Tally issued.")
        return positions[:-1], positions[-1]
