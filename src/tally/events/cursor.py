"""The export cursor: opaque, sealed, bound to its filter, stable across restarts.

It carries one offset per export-log partition (events/log.py), the partition the next
page starts with (store/plan.py), and a digest of the filter it was issued for. It is sealed
with AES-256-GCM under a key derived (HKDF-SHA256) from a secret kept in the store itself, so
every replica, restart and restored backup accepts it, and a fresh random nonce per cursor.

Sealed, not only signed: a partition holds many tenants, and a reader's position in it moves
to the partition's head whenever it reads to the end, so readable positions would let one
tenant's reader watch the activity of the others that share its partitions. The offsets are
fixed-width, so not even the cursor's length changes with them.

It also carries the export log's epoch (events/log.py LogEpoch): a restore rewinds the log,
and a cursor of an epoch before it is refused with where to resume (services/export.py).

Version 1 cursors (signed with HMAC-SHA256 under the raw secret, positions in readable
varints) and version 2 (sealed, without the epoch) were issued before; billing systems keep
them between polls, so they are still accepted, as of the log's first epoch. Only version 3
is issued.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tally.errors import FieldError, InvalidInput

_SIGNED = 1  # legacy: accepted, never issued
_SEALED = 2  # legacy: accepted, never issued
_WITH_EPOCH = 3
_EPOCH_BYTES = 16
_MAC_BYTES = 16
_DIGEST_BYTES = 12
_NONCE_BYTES = 12
_HKDF_INFO = b"tally export cursor v2"


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


_NOT_ISSUED = "The cursor is not one Tally issued."


@functools.cache
def _layout(partitions: int, *, epoch: bool) -> struct.Struct:
    """The sealed plaintext: filter digest, the epoch (from version 3), one unsigned 64-bit
    offset per partition, start."""
    epoch_field = f"{_EPOCH_BYTES}s" if epoch else ""
    return struct.Struct(f">{_DIGEST_BYTES}s{epoch_field}{partitions}QH")


_OFFSET = struct.Struct(">Q")
_START = struct.Struct(">H")
_HEADER = bytes([_WITH_EPOCH])
_URLSAFE = bytes.maketrans(b"+/", b"-_")
# Where the offsets begin in a version 3 plaintext.
_OFFSETS_AT = _DIGEST_BYTES + _EPOCH_BYTES


@dataclass(frozen=True, slots=True)
class Position:
    """What a cursor says: each partition's offset, the partition the next page starts
    with, and the log's epoch it was issued in (None: issued before epochs)."""

    offsets: list[int]
    start: int
    epoch: bytes | None


class CursorCodec:
    def __init__(self, secret: bytes) -> None:
        self._mac_key = secret
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(secret)
        self._aead = AESGCM(key)

    def encode(
        self, positions: Sequence[int], start: int, filter_digest: bytes, epoch: bytes
    ) -> str:
        return self.walk(positions, start, filter_digest, epoch).current()

    def walk(
        self, positions: Sequence[int], start: int, filter_digest: bytes, epoch: bytes
    ) -> CursorWalk:
        """Cursors for a reader moving on from `positions`, one partition's offset at a
        time: what a stream needs after every line, for a fraction of an `encode` each."""
        plain = bytearray(
            _layout(len(positions), epoch=True).pack(filter_digest, epoch, *positions, start)
        )
        return CursorWalk(self._aead, plain)

    def decode(self, cursor: str, *, filter_digest: bytes, partitions: int) -> Position:
        """What `cursor` says. Raises InvalidInput if it is empty, was altered, was issued
        by another store, or was issued for another filter."""
        if not cursor:
            raise _refused("The cursor is empty: leave it out to start from the beginning.")
        raw = _strict_b64(cursor)
        if raw is None or len(raw) < 2:
            raise _refused(_NOT_ISSUED)
        epoch: bytes | None = None
        if raw[0] == _WITH_EPOCH:
            digest, values = self._open(raw, partitions, epoch=True)
            epoch, *values = values
        elif raw[0] == _SEALED:
            digest, values = self._open(raw, partitions, epoch=False)
        elif raw[0] == _SIGNED:
            digest, values = self._verify(raw)
        else:
            raise _refused("The cursor is from an incompatible version; start without one.")
        if digest != filter_digest:
            raise _refused("The cursor was issued for other filters; repeat them unchanged.")
        if len(values) != partitions + 1 or values[-1] >= partitions:
            raise _refused(_NOT_ISSUED)
        return Position(offsets=values[:-1], start=values[-1], epoch=epoch)

    def _open(self, raw: bytes, partitions: int, *, epoch: bool) -> tuple[bytes, list[Any]]:
        header, nonce, sealed = raw[:1], raw[1 : 1 + _NONCE_BYTES], raw[1 + _NONCE_BYTES :]
        try:
            plain = self._aead.decrypt(nonce, sealed, header)
        except (InvalidTag, ValueError):
            raise _refused(_NOT_ISSUED) from None
        layout = _layout(partitions, epoch=epoch)
        if len(plain) != layout.size:
            raise _refused(_NOT_ISSUED)
        digest, *values = layout.unpack(plain)
        return digest, values

    def _verify(self, raw: bytes) -> tuple[bytes, list[int]]:
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        expected = hmac.new(self._mac_key, payload, hashlib.sha256).digest()[:_MAC_BYTES]
        if len(raw) <= _MAC_BYTES + 1 + _DIGEST_BYTES or not hmac.compare_digest(mac, expected):
            raise _refused(_NOT_ISSUED)
        try:
            values = _read_varints(payload[1 + _DIGEST_BYTES :])
        except ValueError:
            raise _refused(_NOT_ISSUED) from None
        return payload[1 : 1 + _DIGEST_BYTES], values


class CursorWalk:
    """The cursor of a position that moves: `move` sets one partition's offset and the
    partition the next page starts with, `current` seals the position as it stands (a fresh
    nonce each time, so two cursors for the same place still differ). The plaintext is
    kept and changed in place, not packed again per cursor: a stream seals one per line."""

    __slots__ = ("_aead", "_nonces", "_plain", "_used")

    # Random nonces drawn from the OS a block at a time: one `os.urandom` per line cost as
    # much as the sealing. A walk belongs to one reader (one thread), so needs no lock.
    _BLOCK = _NONCE_BYTES * 1024

    def __init__(self, aead: AESGCM, plain: bytearray) -> None:
        self._aead = aead
        self._plain = plain
        self._nonces = b""
        self._used = self._BLOCK

    def move(self, partition: int, offset: int, start: int) -> None:
        _OFFSET.pack_into(self._plain, _OFFSETS_AT + 8 * partition, offset)
        _START.pack_into(self._plain, len(self._plain) - 2, start)

    def current(self) -> str:
        used = self._used
        if used == self._BLOCK:
            self._nonces, used = os.urandom(self._BLOCK), 0
        self._used = used + _NONCE_BYTES
        nonce = self._nonces[used : used + _NONCE_BYTES]
        sealed = self._aead.encrypt(nonce, self._plain, _HEADER)
        # base64.urlsafe_b64encode, without its two calls in Python per cursor.
        text = binascii.b2a_base64(_HEADER + nonce + sealed, newline=False)
        return text.translate(_URLSAFE).rstrip(b"=").decode()


def _strict_b64(text: str) -> bytes | None:
    """The bytes of unpadded URL-safe base64 `text`, or None unless it is exactly the text
    `encode` would write for them: a lenient decoder drops stray characters and ignores the
    last character's spare bits, so an altered cursor could decode to the same bytes."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != text:
        return None
    return raw
