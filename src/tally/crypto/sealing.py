"""AES-256-GCM sealing of attributes under a tenant's data key, and of data keys under a
master key.

Every ciphertext carries associated data naming what it belongs to (the tenant and the event's
identity; for a data key, the tenant and the master key's id), so a sealed value copied onto
another row, or a wrapped key copied to another tenant, fails to open instead of decrypting
into the wrong place. Content digests are keyed by the data key too (HMAC-SHA256), so a
digest stored in clear cannot be used to guess attribute values.
"""

from __future__ import annotations

import hmac
import os
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tally.crypto.keyring import KEY_BYTES, MasterKey
from tally.errors import TallyError

VERSION = b"\x01"  # the first byte of a sealed value; plaintext JSON (from before 0002) is "{"
_NONCE = 12
_TAG = 16


class SealBroken(TallyError):
    """A sealed value or wrapped key does not open: it was altered, moved to another row, or
    sealed under a key this keyring does not hold. Never retried; nothing is returned."""


def _associated(*parts: str) -> bytes:
    # Length-prefixed, so no choice of ids can make two different lists encode alike.
    encoded = [part.encode() for part in parts]
    return b"".join(len(part).to_bytes(4, "big") + part for part in encoded)


def _seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(_NONCE)  # 96-bit random nonces: safe far beyond 2**32 seals per key
    return VERSION + nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def _open(key: bytes, sealed: bytes, associated: bytes, what: str) -> bytes:
    if sealed[:1] != VERSION or len(sealed) < 1 + _NONCE + _TAG:
        raise SealBroken(f"A sealed {what} is not in a format Tally wrote.")
    try:
        return AESGCM(key).decrypt(sealed[1 : 1 + _NONCE], sealed[1 + _NONCE :], associated)
    except InvalidTag:
        raise SealBroken(f"A sealed {what} does not open with its key.") from None


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


def wrap(master: MasterKey, *, tenant: str, data_key: bytes) -> bytes:
    return _seal(master.secret, data_key, _associated("tally/data-key", tenant, master.id))


def unwrap(master: MasterKey, *, tenant: str, wrapped: bytes) -> bytes:
    """Raises SealBroken if `wrapped` was not made by `master` for `tenant`."""
    associated = _associated("tally/data-key", tenant, master.id)
    return _open(master.secret, wrapped, associated, "data key")


class TenantCipher:
    """One tenant's data key at work: seals and opens its attributes, keys its digests."""

    __slots__ = ("_aead_key", "_mac_key", "tenant")

    def __init__(self, tenant: str, data_key: bytes) -> None:
        self.tenant = tenant
        self._aead_key = data_key
        self._mac_key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"tally/content-digest/v1"
        ).derive(data_key)

    def seal(self, *, application: str, event_id: str, attributes_json: str) -> bytes:
        associated = _associated("tally/attributes", self.tenant, application, event_id)
        return _seal(self._aead_key, attributes_json.encode(), associated)

    def open(self, *, application: str, event_id: str, sealed: bytes) -> str:
        """The attributes' JSON text. Raises SealBroken for a value that is not this
        event's. Attributes stored in clear before encryption at rest existed are returned
        as they are."""
        if sealed[:1] == b"{":
            return sealed.decode()
        associated = _associated("tally/attributes", self.tenant, application, event_id)
        return _open(self._aead_key, sealed, associated, "attribute set").decode()

    def digest(self, content: bytes) -> bytes:
        return hmac.new(self._mac_key, content, sha256).digest()
