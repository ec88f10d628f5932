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

The NDJSON and CSV streams give every line its own cursor. Sealing a whole position per line
cost as much as the rest of the line, so a line's cursor is the cursor of where its
partition's run began (one sealing per run of lines in the same partition, usually a few per
read) followed by `.` and one AES block for the line alone: the line's offset, its partition
(which must be the base's `start`) and six bytes of the base's GCM tag, enciphered with AES
under a second key derived from the same secret. A single block of a block cipher is a
pseudorandom permutation: it shows nothing of the offset, and an altered or transplanted
block deciphers to noise that fails the 64 bits of redundancy (partition and binding) it has
to meet, as a 64-bit authentication tag would. Each block is unique (offsets are), so the
permutation is used once per input: the property ECB mode does not have for longer messages.

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
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
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
_LINE_INFO = b"tally export cursor line"
_LINE_SEPARATOR = "."
_TAG_BYTES = 16
_BINDING_BYTES = 6
# A line's block: its partition, the first bytes of its base's tag, its offset.
_LINE = struct.Struct(f">H{_BINDING_BYTES}sQ")


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
        line_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_LINE_INFO)
        # One block at a time, each one unique (module docstring): a pseudorandom permutation,
        # not a mode of encrypting longer messages.
        self._lines = Cipher(algorithms.AES(line_key.derive(secret)), modes.ECB())  # noqa: S305

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
        return CursorWalk(self._aead, self._lines, plain)

    def decode(self, cursor: str, *, filter_digest: bytes, partitions: int) -> Position:
        """What `cursor` says. Raises InvalidInput if it is empty, was altered, was issued
        by another store, or was issued for another filter."""
        if not cursor:
            raise _refused("The cursor is empty: leave it out to start from the beginning.")
        cursor, line, line_text = cursor.partition(_LINE_SEPARATOR)
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
        offsets, start = values[:-1], values[-1]
        if line:
            if raw[0] != _WITH_EPOCH:
                raise _refused(_NOT_ISSUED)
            offsets[start] = self._line_offset(raw, line_text, start, offsets[start])
        return Position(offsets=offsets, start=start, epoch=epoch)

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

    def _line_offset(self, base: bytes, text: str, start: int, before: int) -> int:
        """The offset in the line block `text` after the base cursor `base`, whose run is of
        partition `start` from offset `before`. Raises InvalidInput unless the block is one
        made for this base."""
        block = _strict_b64(text)
        if block is None or len(block) != _LINE.size:
            raise _refused(_NOT_ISSUED)
        decryptor = self._lines.decryptor()
        partition, binding, offset = _LINE.unpack(decryptor.update(block) + decryptor.finalize())
        if partition != start or not hmac.compare_digest(binding, _binding(base)):
            raise _refused(_NOT_ISSUED)
        if offset <= before:
            raise _refused(_NOT_ISSUED)
        return int(offset)

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
    """The cursors of a position that moves on, one partition's offset at a time: `lines`
    for a stream's lines, `current` to seal the position as it stands (a fresh nonce each
    time, so two cursors for the same place still differ). The plaintext is kept and changed
    in place, not packed again per cursor."""

    __slots__ = ("_aead", "_lines", "_nonces", "_plain", "_used")

    # Random nonces drawn from the OS a block at a time: one `os.urandom` per cursor cost as
    # much as the sealing. A walk belongs to one reader (one thread), so needs no lock.
    _BLOCK = _NONCE_BYTES * 1024

    def __init__(self, aead: AESGCM, lines: Cipher[modes.ECB], plain: bytearray) -> None:
        self._aead = aead
        self._lines = lines
        self._plain = plain
        self._nonces = b""
        self._used = self._BLOCK

    def lines(self, places: Sequence[tuple[int, int]]) -> list[str]:
        """The cursor after each of `places` (partition, offset, in the order read) in turn,
        the walk moving on through them: each resumes right after its own place. One sealed
        base per run of places in the same partition, one AES block per place (module
        docstring)."""
        cursors: list[str] = []
        encryptor = self._lines.encryptor()
        at, count = 0, len(places)
        while at < count:
            partition = places[at][0]
            end = at + 1
            while end < count and places[end][0] == partition:
                end += 1
            _START.pack_into(self._plain, len(self._plain) - 2, partition)
            base = self._sealed()
            binding = _binding(base)
            blocks = encryptor.update(
                b"".join(_LINE.pack(partition, binding, offset) for _, offset in places[at:end])
            )
            prefix = _text(base) + _LINE_SEPARATOR
            size = _LINE.size
            cursors.extend(
                prefix + _text(blocks[i : i + size]) for i in range(0, len(blocks), size)
            )
            _OFFSET.pack_into(self._plain, _OFFSETS_AT + 8 * partition, places[end - 1][1])
            at = end
        return cursors

    def current(self) -> str:
        return _text(self._sealed())

    def _sealed(self) -> bytes:
        used = self._used
        if used == self._BLOCK:
            self._nonces, used = os.urandom(self._BLOCK), 0
        self._used = used + _NONCE_BYTES
        nonce = self._nonces[used : used + _NONCE_BYTES]
        return _HEADER + nonce + self._aead.encrypt(nonce, self._plain, _HEADER)


def _binding(base: bytes) -> bytes:
    """What binds a line's block to its base: the first bytes of the base's GCM tag."""
    return base[-_TAG_BYTES:][:_BINDING_BYTES]


def _text(raw: bytes) -> str:
    """Unpadded URL-safe base64: base64.urlsafe_b64encode, without its two calls in Python."""
    return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE).rstrip(b"=").decode()


def _strict_b64(text: str) -> bytes | None:
    """The bytes of unpadded URL-safe base64 `text`, or None unless it is exactly the text
    `encode` would write for them: a lenient decoder drops stray characters and ignores the
    last character's spare bits, so an altered cursor could decode to the same bytes."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if _text(raw) == text else None
