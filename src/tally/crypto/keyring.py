"""Master keys: where they come from, how they rotate, and how a keyring file is written.

A keyring is text, one master key per line: `<id> <base64 of 32 random bytes>`; blank lines
and `#` comments are ignored; the last key is the newest, and new data keys are wrapped with
it. `TALLY_KEYRING` names a file, or `command:PROGRAM ARGS…` whose standard output is a keyring
(for a secret manager: the keys then never touch Tally's disk). A keyring file must be
readable by its owner only. Master keys never leave this module except to wrap and unwrap
data keys (crypto/tenant_keys.py); nothing here logs or prints a key.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tally.files import replacing

KEY_BYTES = 32
COMMAND_PREFIX = "command:"
COMMAND_TIMEOUT = 15.0
_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEADER = (
    "# Tally keyring: one master key per line, '<id> <base64 of 32 bytes>'; the last is the\n"
    "# newest. Keep it secret, keep a copy apart from the database and its backups.\n"
)


class KeyringError(Exception):
    """The keyring is missing, unreadable, malformed or does not fit the store.

    The message says what to set or do; it never holds key material.
    """


@dataclass(frozen=True, slots=True)
class MasterKey:
    id: str
    secret: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Keyring:
    keys: tuple[MasterKey, ...]
    source: str  # for messages: the file, or "command"

    @property
    def newest(self) -> MasterKey:
        return self.keys[-1]

    def get(self, key_id: str) -> MasterKey | None:
        return next((key for key in self.keys if key.id == key_id), None)


def parse(text: str, *, source: str) -> Keyring:
    """Raises KeyringError naming the line that is wrong (never echoing it)."""
    keys: list[MasterKey] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not _ID.fullmatch(parts[0]):
            raise KeyringError(f"Keyring {source}, line {number}: expected '<id> <base64 key>'.")
        try:
            secret = base64.b64decode(parts[1], validate=True)
        except binascii.Error:
            secret = b""
        if len(secret) != KEY_BYTES:
            raise KeyringError(
                f"Keyring {source}, line {number}: the key must be {KEY_BYTES} bytes in base64."
            )
        if any(key.id == parts[0] for key in keys):
            raise KeyringError(f"Keyring {source}, line {number}: the id is used twice.")
        keys.append(MasterKey(parts[0], secret))
    if not keys:
        raise KeyringError(f"Keyring {source} holds no key.")
    return Keyring(tuple(keys), source)


def load(spec: str) -> Keyring:
    """The keyring `spec` (a TALLY_KEYRING value) names. Raises KeyringError."""
    if spec.startswith(COMMAND_PREFIX):
        return parse(_run(spec.removeprefix(COMMAND_PREFIX)), source="from TALLY_KEYRING's command")
    path = Path(spec)
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError:
        raise KeyringError(
            f"Keyring file {path} does not exist: create it with "
            f"'tally keyring generate --out {path}' or set TALLY_KEYRING to the right file."
        ) from None
    except OSError as error:
        raise KeyringError(f"Keyring file {path} cannot be read: {error.strerror}.") from None
    if mode & 0o077:
        raise KeyringError(
            f"Keyring file {path} can be read by other users: run 'chmod 600 {path}'."
        )
    return parse(text, source=str(path))


def _run(command: str) -> str:
    argv = shlex.split(command)
    if not argv:
        raise KeyringError("TALLY_KEYRING's command is empty: use command:PROGRAM [ARGS…].")
    try:
        done = subprocess.run(  # noqa: S603 - the operator's own command, run without a shell
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise KeyringError(
            f"TALLY_KEYRING's command could not be run: {type(error).__name__}."
        ) from None
    if done.returncode != 0:
        # Its output is not shown: it may hold keys.
        raise KeyringError(f"TALLY_KEYRING's command failed with exit code {done.returncode}.")
    return done.stdout


def new_key(now: datetime | None = None) -> MasterKey:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d")
    return MasterKey(f"mk-{stamp}-{secrets.token_hex(3)}", secrets.token_bytes(KEY_BYTES))


def render(keyring: Keyring) -> str:
    lines = [f"{key.id} {base64.b64encode(key.secret).decode()}" for key in keyring.keys]
    return _HEADER + "\n".join(lines) + "\n"


def write(path: Path, keyring: Keyring, *, replace: bool) -> None:
    """Write `keyring` to `path`, owner-only, atomically (a crash leaves the old file or the
    new one, never half of one). Raises KeyringError if `path` exists and not `replace`."""
    if path.exists() and not replace:
        raise KeyringError(f"Keyring file {path} exists already; it is not overwritten.")
    with replacing(path) as file:
        file.write(render(keyring).encode())


def generate(path: Path) -> Keyring:
    """A new keyring with one key, written to `path` (which must not exist)."""
    keyring = Keyring((new_key(),), str(path))
    write(path, keyring, replace=False)
    return keyring


def rotate(spec: str) -> Keyring:
    """Append a new newest key to the keyring file `spec`; older keys stay (old data keys
    are wrapped with them until `tally reencrypt` moves them). Raises KeyringError for a
    command keyring: rotate those in the secret manager that holds them."""
    if spec.startswith(COMMAND_PREFIX):
        raise KeyringError(
            "TALLY_KEYRING is a command: add the new key in the secret manager it reads."
        )
    current = load(spec)
    rotated = Keyring((*current.keys, new_key()), current.source)
    write(Path(spec), rotated, replace=True)
    return rotated


class KeyringSource:
    """The keyring a server uses, kept current without a restart.

    `tally keyring rotate` and `tally reencrypt` run beside live servers: a server must wrap
    new data keys with the newest master key and open data keys that were just re-wrapped
    with it. A keyring file is re-read when it changes (checked at most once a second); a
    command is re-run at most once a minute, and at once (at most once a second) when a data
    key names a master key this server has not seen. A re-read that fails keeps the keys
    already loaded (they are still valid), and `on_error` hears of it.
    """

    def __init__(
        self,
        spec: str,
        keyring: Keyring,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_error: Callable[[KeyringError], None] | None = None,
    ) -> None:
        self._spec = spec
        self._keyring = keyring
        self._clock = clock
        self._on_error = on_error
        self._lock = threading.Lock()
        self._checked = clock()
        self._loaded = clock()
        self._stamp = self._file_stamp()

    def current(self) -> Keyring:
        now = self._clock()
        if now - self._checked >= 1.0:
            with self._lock:
                self._checked = now
                if self._spec.startswith(COMMAND_PREFIX):
                    if now - self._loaded >= 60.0:
                        self._reload(now)
                elif self._file_stamp() != self._stamp:
                    self._reload(now)
        return self._keyring

    def refresh(self) -> Keyring:
        """Re-read now (at most once a second), for a master key id not in `current()`."""
        now = self._clock()
        with self._lock:
            if now - self._loaded >= 1.0:
                self._reload(now)
        return self._keyring

    def _reload(self, now: float) -> None:
        self._loaded = now
        stamp = self._file_stamp()
        try:
            self._keyring = load(self._spec)
        except KeyringError as error:
            if self._on_error is not None:
                self._on_error(error)
            return
        self._stamp = stamp

    def _file_stamp(self) -> tuple[int, int] | None:
        if self._spec.startswith(COMMAND_PREFIX):
            return None
        try:
            found = Path(self._spec).stat()
        except OSError:
            return None
        return (found.st_mtime_ns, found.st_size)
