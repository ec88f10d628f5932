"""AES-256-GCM sealing of attributes under a tenant's data key, and of data keys under a
master key.

Every ciphertext carries associated data naming what it belongs to (the tenant and the event's
identity; for a data key, the tenant and the master key's id), so a sealed value copied onto
another row, or a wrapped key copied to another tenant, fails to open instead of decrypting
into the wrong place. Content digests are keyed by the data key too (HMAC-SHA256), so a
digest stored in clear cannot be used to guess attribute values.
"""

from __future__ import annotations

import hashlib
import os
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tally.crypto.keyring import KEY_BYTES, MasterKey
from tally.errors import TallyError

VERSION = b"\x01"  # the first byte of a sealed value; plaintext JSON (from before 0002) is "{"
_NONCE = 12
_TAG = 16
_APPLICATIONS_KEPT = 64  # per tenant cipher: the associated data's head per application


class SealBroken(TallyError):
    """A sealed value or wrapped key does not open: it was altered, moved to another row, or
    sealed under a key this keyring does not hold. Never retried; nothing is returned."""


def _associated(*parts: str) -> bytes:
    # Length-prefixed, so no choice of ids can make two different lists encode alike.
    out = bytearray()
    for part in parts:
        encoded = part.encode()
        out += len(encoded).to_bytes(4, "big")
        out += encoded
    return bytes(out)


_SHA256_BLOCK = 64
_INNER_PAD = bytes(x ^ 0x36 for x in range(256))
_OUTER_PAD = bytes(x ^ 0x5C for x in range(256))


class Hmac:
    """HMAC-SHA256 (RFC 2104) under one key, its inner and outer hash states made once: a
    message then costs two copies of a state and three updates. `hmac.digest` sets up
    OpenSSL's HMAC context for every call (twice the time) and releases the GIL around it,
    so under load a request thread waited to take it back once per event: a fifth of a
    batch's time in a worker's profile. Thread-safe (each call works on its own copies)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > _SHA256_BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_SHA256_BLOCK, b"\0")
        self._inner = hashlib.sha256(key.translate(_INNER_PAD))
        self._outer = hashlib.sha256(key.translate(_OUTER_PAD))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class _Nonces:
    """96-bit random nonces (safe far beyond 2**32 seals per key), drawn from the OS in
    blocks, one block per thread. Measured under load: one `os.urandom` per nonce, or one
    shared block behind a lock, each made a thread give up the GIL per seal and wait for it
    behind the others, and halved batch ingestion. A forked child starts with fresh blocks,
    never a copy of its parent's."""

    _BLOCK = 12 * 1024

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._local = threading.local()

    def take(self) -> bytes:
        local = self._local
        used: int = getattr(local, "used", self._BLOCK)
        if used + _NONCE > self._BLOCK:
            local.block, used = os.urandom(self._BLOCK), 0
        local.used = used + _NONCE
        block: bytes = local.block
        return block[used : used + _NONCE]


_nonces = _Nonces()


def _seal(aead: AESGCM, plaintext: bytes, associated: bytes) -> bytes:
    nonce = _nonces.take()
    return VERSION + nonce + aead.encrypt(nonce, plaintext, associated)


def _open(aead: AESGCM, sealed: bytes, associated: bytes, what: str) -> bytes:
    if sealed[:1] != VERSION or len(sealed) < 1 + _NONCE + _TAG:
        raise SealBroken(f"A sealed {what} is not in a format Tally wrote.")
    try:
        return aead.decrypt(sealed[1 : 1 + _NONCE], sealed[1 + _NONCE :], associated)
    except InvalidTag:
        raise SealBroken(f"A sealed {what} does not open with its key.") from None


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


def wrap(master: MasterKey, *, tenant: str, data_key: bytes) -> bytes:
    associated = _associated("tally/data-key", tenant, master.id)
    return _seal(AESGCM(master.secret), data_key, associated)


def unwrap(master: MasterKey, *, tenant: str, wrapped: bytes) -> bytes:
    """Raises SealBroken if `wrapped` was not made by `master` for `tenant`."""
    associated = _associated("tally/data-key", tenant, master.id)
    return _open(AESGCM(master.secret), wrapped, associated, "data key")


def wrap_backup_key(master: MasterKey, *, backup_id: str, key: bytes) -> bytes:
    """A backup's data key (backup/), wrapped like a tenant's but bound to the backup: a
    wrapped backup key does not open as a tenant's data key, nor as another backup's."""
    associated = _associated("tally/backup-key", backup_id, master.id)
    return _seal(AESGCM(master.secret), key, associated)


def unwrap_backup_key(master: MasterKey, *, backup_id: str, wrapped: bytes) -> bytes:
    """Raises SealBroken if `wrapped` was not made by `master` for backup `backup_id`."""
    associated = _associated("tally/backup-key", backup_id, master.id)
    return _open(AESGCM(master.secret), wrapped, associated, "backup key")


def _derived(key: bytes, info: bytes) -> bytes:
    """A 32-byte key for one purpose (`info`), derived from `key` by HKDF-SHA256."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


class TenantCipher:
    """One tenant's data key at work: seals and opens its attributes, keys its digests."""

    __slots__ = (
        "_aead",
        "_applications",
        "_mac",
        "_prefix",
        "_reason_prefix",
        "_token_mac",
        "_value_prefix",
        "tenant",
    )

    def __init__(self, tenant: str, data_key: bytes) -> None:
        self.tenant = tenant
        self._aead = AESGCM(data_key)  # immutable, safe to share between threads
        # Length-prefixed parts concatenate: the tenant's half of the associated data is
        # encoded once, not once per event.
        self._prefix = _associated("tally/attributes", tenant)
        # The associated data of attributes up to the event's id, per application: an
        # export opens one attribute set per event, of a handful of applications.
        self._applications: dict[str, bytes] = {}
        # A cancellation reason has associated data of its own kind: sealed reason bytes
        # copied into an event's attributes (or back) do not open there.
        self._reason_prefix = _associated("tally/cancellation-reason", tenant)
        self._mac = Hmac(_derived(data_key, b"tally/content-digest/v1"))
        # Attribute tokens (docs/usage.md): their own key, so that a token never equals a
        # content digest, and shredding the data key makes every token of the tenant opaque.
        self._token_mac = Hmac(_derived(data_key, b"tally/attribute-token/v1"))
        self._value_prefix = _associated("tally/attribute-value", tenant)

    def key_token(self, key: str) -> str:
        """The token of an attribute key: `k` and 16 hex digits, the same for every event of
        the tenant, unrelated between tenants. The letter first: SQLite's `->>` reads a
        label that starts with a digit as something else than an object member."""
        return "k" + self._token_mac.digest(b"key\x00" + key.encode()).hex()[:16]

    def value_token(self, key: str, value_json: str) -> str:
        """The token of one attribute's value (`value_json`: its canonical JSON, so `"1"` and
        `1` differ): 32 hex digits, equal exactly when key and value are."""
        message = b"value\x00" + key.encode() + b"\x00" + value_json.encode()
        return self._token_mac.digest(message).hex()[:32]

    def seal_value(self, token: str, value_json: str) -> bytes:
        """`value_json` sealed for the dictionary entry of `token` (attribute_values)."""
        return _seal(self._aead, value_json.encode(), self._value_prefix + _associated(token))

    def open_value(self, token: str, sealed: bytes) -> str:
        """The canonical JSON of the value whose token is `token`. Raises SealBroken for an
        entry that is not this token's."""
        associated = self._value_prefix + _associated(token)
        return _open(self._aead, sealed, associated, "attribute value").decode()

    def seal(self, *, application: str, event_id: str, attributes_json: str) -> bytes:
        associated = self._attributes_associated(application, event_id)
        return _seal(self._aead, attributes_json.encode(), associated)

    def _attributes_associated(self, application: str, event_id: str) -> bytes:
        """`self._prefix + _associated(application, event_id)`, its head remembered per
        application: one is built for every event sealed and every one opened."""
        head = self._applications.get(application)
        if head is None:
            if len(self._applications) >= _APPLICATIONS_KEPT:
                self._applications.clear()
            head = self._applications[application] = self._prefix + _associated(application)
        eid = event_id.encode()
        return head + len(eid).to_bytes(4, "big") + eid

    def open(self, *, application: str, event_id: str, sealed: bytes) -> str:
        """The attributes' JSON text. Raises SealBroken for a value that is not this
        event's. Attributes stored in clear before encryption at rest existed are returned
        as they are."""
        if sealed[:1] == b"{":
            return sealed.decode()
        associated = self._attributes_associated(application, event_id)
        return _open(self._aead, sealed, associated, "attribute set").decode()

    def seal_reason(self, *, application: str, event_id: str, reason: str) -> bytes:
        """A cancellation's reason, sealed for the cancellation of this event only."""
        associated = self._reason_prefix + _associated(application, event_id)
        return _seal(self._aead, reason.encode(), associated)

    def open_reason(self, *, application: str, event_id: str, sealed: bytes) -> str:
        """Raises SealBroken for a value that is not this event's cancellation reason."""
        associated = self._reason_prefix + _associated(application, event_id)
        return _open(self._aead, sealed, associated, "cancellation reason").decode()

    def digest(self, content: bytes) -> bytes:
        return self._mac.digest(content)
