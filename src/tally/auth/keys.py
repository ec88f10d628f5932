"""API key format: `tly_` + 36 random base62 characters + a 6-character base62 CRC-32.

The prefix lets secret scanners recognise a leaked Tally key; the checksum lets Tally refuse a
mistyped key before any lookup. Only the SHA-256 of a key is stored.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import zlib

PREFIX = "tly_"
_ALPHABET = string.digits + string.ascii_letters
_BODY = 36
_CHECK = 6


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECK)


def new_secret() -> str:
    body = "".join(secrets.choice(_ALPHABET) for _ in range(_BODY))
    return f"{PREFIX}{body}{_checksum(body)}"


def new_key_id() -> str:
    return f"key_{secrets.token_hex(8)}"


def well_formed(secret: str) -> bool:
    """Prefix, length, alphabet and checksum are right. Says nothing of whether it exists."""
    if not secret.startswith(PREFIX) or len(secret) != len(PREFIX) + _BODY + _CHECK:
        return False
    body, check = secret[len(PREFIX) : -_CHECK], secret[-_CHECK:]
    if any(char not in _ALPHABET for char in body):
        return False
    return secrets.compare_digest(check, _checksum(body))


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()
