"""A backup file: a readable header, then the content in authenticated, encrypted chunks.

    magic   "TALLY-BACKUP" 0x00 0x01            (the format, version 1)
    header  u32 length, then UTF-8 JSON: backup_id, created_at, the id of the master key that
            wraps the backup's key, that wrapped key (base64), the chunk size, the cipher
    chunks  each: u8 flags (1 = the final chunk), u32 length, AES-256-GCM ciphertext and tag

Every backup has a data key of its own, fresh and random, wrapped by the keyring's newest master
key (crypto/sealing.py). Each chunk holds at most `chunk_bytes` of plaintext, and its associated
data is the SHA-256 of the magic and header, its index and its flags; its nonce is its index
(the key is never used for another file). So a flipped bit anywhere, a chunk moved, dropped,
repeated or taken from another backup, a cut before the final chunk or bytes after it, and an
altered header all fail with a message saying which.

The plaintext is a stream of JSON lines (backup/service.py says which); lines run across chunk
boundaries freely.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tally.crypto import sealing
from tally.crypto.keyring import Keyring
from tally.crypto.sealing import SealBroken

MAGIC = b"TALLY-BACKUP\x00\x01"
CHUNK_BYTES = 1 << 20
CIPHER = "AES-256-GCM"
_FINAL = 1
_TAG = 16
_LENGTH = struct.Struct(">I")
_FRAME = struct.Struct(">BI")
_MAX_HEADER = 64 * 1024


class BackupDamaged(Exception):
    """The file is not an intact Tally backup: altered, cut short, or not a backup at all.
    The message says where."""


class WrongKeyring(Exception):
    """The keyring cannot open this backup's key. The message names the master key needed."""


@dataclass(frozen=True, slots=True)
class Header:
    backup_id: str
    created_at: str
    master_key_id: str
    wrapped_key: bytes
    chunk_bytes: int = CHUNK_BYTES

    def encode(self) -> bytes:
        document = {
            "format": 1,
            "backup_id": self.backup_id,
            "created_at": self.created_at,
            "master_key_id": self.master_key_id,
            "wrapped_key": base64.b64encode(self.wrapped_key).decode(),
            "chunk_bytes": self.chunk_bytes,
            "cipher": CIPHER,
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()

    @staticmethod
    def decode(raw: bytes) -> Header:
        """Raises BackupDamaged for a header that is not one Tally wrote."""
        try:
            document = json.loads(raw)
            header = Header(
                backup_id=_text(document["backup_id"]),
                created_at=_text(document["created_at"]),
                master_key_id=_text(document["master_key_id"]),
                wrapped_key=base64.b64decode(_text(document["wrapped_key"]), validate=True),
                chunk_bytes=int(document["chunk_bytes"]),
            )
            known = document["format"] == 1 and document["cipher"] == CIPHER
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise BackupDamaged(
                "The backup's header is damaged: it is not one Tally wrote."
            ) from None
        if not known or not 0 < header.chunk_bytes <= 64 * CHUNK_BYTES:
            raise BackupDamaged("The backup's header names a format this Tally cannot read.")
        return header


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("not text")
    return value


def _associated(header_digest: bytes, index: int, flags: int) -> bytes:
    return header_digest + index.to_bytes(8, "big") + bytes([flags])


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


class Writer:
    """Encrypts a byte stream into chunks after the header. `close` writes the final chunk;
    a writer that is never closed leaves a file without one, which every reader refuses."""

    def __init__(
        self,
        file: BinaryIO,
        *,
        keyring: Keyring,
        backup_id: str,
        created_at: str,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        master = keyring.newest
        key = sealing.new_data_key()
        self.header = Header(
            backup_id=backup_id,
            created_at=created_at,
            master_key_id=master.id,
            wrapped_key=sealing.wrap_backup_key(master, backup_id=backup_id, key=key),
            chunk_bytes=chunk_bytes,
        )
        encoded = self.header.encode()
        prefix = MAGIC + _LENGTH.pack(len(encoded)) + encoded
        self._digest = hashlib.sha256(prefix).digest()
        self._aead = AESGCM(key)
        self._file = file
        self._buffer = bytearray()
        self.chunks = 0
        file.write(prefix)

    def write(self, data: bytes) -> None:
        self._buffer += data
        size = self.header.chunk_bytes
        while len(self._buffer) >= size:
            self._emit(bytes(self._buffer[:size]), flags=0)
            del self._buffer[:size]

    def close(self) -> None:
        self._emit(bytes(self._buffer), flags=_FINAL)
        self._buffer.clear()

    def _emit(self, plaintext: bytes, *, flags: int) -> None:
        index = self.chunks
        sealed = self._aead.encrypt(
            _nonce(index), plaintext, _associated(self._digest, index, flags)
        )
        self._file.write(_FRAME.pack(flags, len(sealed)))
        self._file.write(sealed)
        self.chunks += 1


def read_header(file: BinaryIO) -> tuple[Header, bytes]:
    """The header, and the digest that binds the chunks to it. Raises BackupDamaged."""
    magic = file.read(len(MAGIC))
    if magic != MAGIC:
        if magic[:12] == MAGIC[:12]:
            raise BackupDamaged("The file is a Tally backup of a format this Tally cannot read.")
        raise BackupDamaged("The file is not a Tally backup.")
    raw_length = file.read(_LENGTH.size)
    if len(raw_length) < _LENGTH.size:
        raise BackupDamaged("The backup is truncated: it ends inside its header.")
    (length,) = _LENGTH.unpack(raw_length)
    if length > _MAX_HEADER:
        raise BackupDamaged("The backup's header is damaged: it is not one Tally wrote.")
    encoded = file.read(length)
    if len(encoded) < length:
        raise BackupDamaged("The backup is truncated: it ends inside its header.")
    header = Header.decode(encoded)
    return header, hashlib.sha256(magic + raw_length + encoded).digest()


def backup_key(header: Header, keyring: Keyring) -> bytes:
    """The backup's data key, unwrapped. Raises WrongKeyring."""
    master = keyring.get(header.master_key_id)
    if master is None:
        raise WrongKeyring(
            f"Keyring {keyring.source} does not hold master key '{header.master_key_id}', "
            "which wraps this backup's key: use the keyring of the store the backup was taken "
            "from (keep old master keys as long as backups made with them)."
        )
    try:
        return sealing.unwrap_backup_key(
            master, backup_id=header.backup_id, wrapped=header.wrapped_key
        )
    except SealBroken:
        raise WrongKeyring(
            f"Master key '{master.id}' of keyring {keyring.source} does not open this backup's "
            "key: it is another keyring's key of the same id, or the header was altered."
        ) from None


def chunks(
    file: BinaryIO, header: Header, digest: bytes, key: bytes
) -> Iterator[tuple[int, bytes]]:
    """Each chunk's index and plaintext, in order, each checked before it is yielded. Raises
    BackupDamaged naming the chunk that fails, a cut before the final chunk, or bytes after it."""
    aead = AESGCM(key)
    limit = header.chunk_bytes + _TAG
    index = 0
    while True:
        frame = file.read(_FRAME.size)
        if len(frame) < _FRAME.size:
            raise BackupDamaged(
                f"The backup is truncated: it ends after chunk {index - 1} without its final chunk."
                if index
                else "The backup is truncated: it holds no chunk."
            )
        flags, length = _FRAME.unpack(frame)
        if flags not in (0, _FINAL) or length > limit:
            raise BackupDamaged(f"The backup is damaged: chunk {index} was altered.")
        sealed = file.read(length)
        if len(sealed) < length:
            raise BackupDamaged(f"The backup is truncated: it ends inside chunk {index}.")
        try:
            plaintext = aead.decrypt(_nonce(index), sealed, _associated(digest, index, flags))
        except InvalidTag:
            raise BackupDamaged(
                f"The backup is damaged: chunk {index} was altered, moved or taken from another "
                "backup (it does not authenticate)."
            ) from None
        yield index, plaintext
        if flags & _FINAL:
            if file.read(1):
                raise BackupDamaged(
                    f"The backup is damaged: bytes follow its final chunk ({index})."
                )
            return
        index += 1
