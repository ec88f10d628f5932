"""Keyrings: the file format, owner-only files, command keyrings, rotation, live re-reading."""

from __future__ import annotations

import base64
import os
import shlex
import stat
import sys
from pathlib import Path

import pytest

from tally.crypto import keyring as keyrings
from tally.crypto.keyring import KeyringError, KeyringSource

KEY = base64.b64encode(bytes(range(32))).decode()


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_keyring_file_lists_keys_oldest_first(tmp_path: Path) -> None:
    other = base64.b64encode(bytes(32)).decode()
    path = write(tmp_path / "k", f"# comment\n\nold {KEY}\n  new {other}  \n")

    keyring = keyrings.load(str(path))

    assert [k.id for k in keyring.keys] == ["old", "new"]
    assert keyring.newest.id == "new" and keyring.newest.secret == bytes(32)
    assert keyring.get("old") is not None and keyring.get("gone") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no key"),
        (f"one {KEY} extra\n", "line 1: expected"),
        (f"bad/id {KEY}\n", "line 1: expected"),
        ("short " + base64.b64encode(b"x" * 16).decode(), "32 bytes"),
        ("notbase64 !!!!\n", "32 bytes"),
        (f"a {KEY}\na {KEY}\n", "line 2: the id is used twice"),
    ],
)
def test_a_malformed_keyring_is_refused_without_echoing_it(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path / "k", text)
    with pytest.raises(KeyringError, match=message) as raised:
        keyrings.load(str(path))
    assert KEY not in str(raised.value)


def test_a_keyring_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "k", f"a {KEY}\n", mode=0o640)
    with pytest.raises(KeyringError, match="chmod 600"):
        keyrings.load(str(path))


def test_a_missing_keyring_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="tally keyring generate"):
        keyrings.load(str(tmp_path / "absent"))


def test_generate_writes_an_owner_only_file_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "k"
    made = keyrings.generate(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keyrings.load(str(path)).newest == made.newest
    with pytest.raises(KeyringError, match="exists already"):
        keyrings.generate(path)
    assert keyrings.load(str(path)).newest == made.newest


def test_rotate_adds_a_newest_key_and_keeps_the_old_ones(tmp_path: Path) -> None:
    path = tmp_path / "k"
    first = keyrings.generate(path).newest

    rotated = keyrings.rotate(str(path))

    assert rotated.keys[0].id == first.id and rotated.newest.id != first.id
    assert keyrings.load(str(path)).keys == rotated.keys
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k"]  # no temporary file left


def command_printing(path: Path) -> str:
    script = f"print(open({str(path)!r}).read())"
    return f"command:{shlex.quote(sys.executable)} -c {shlex.quote(script)}"


def test_a_command_keyring_reads_its_output(tmp_path: Path) -> None:
    # The file the command prints need not be owner-only: the command is the operator's.
    source = write(tmp_path / "from-vault", f"vault-1 {KEY}\n", mode=0o644)
    keyring = keyrings.load(command_printing(source))
    assert keyring.newest.id == "vault-1"


def test_a_failing_command_is_reported_without_its_output(tmp_path: Path) -> None:
    script = f"import sys; print({KEY!r}); sys.exit(3)"
    spec = f"command:{shlex.quote(sys.executable)} -c {shlex.quote(script)}"
    with pytest.raises(KeyringError, match="exit code 3") as raised:
        keyrings.load(spec)
    assert KEY not in str(raised.value)
    with pytest.raises(KeyringError, match="could not be run"):
        keyrings.load(f"command:{tmp_path / 'no-such-program'}")


def test_a_command_keyring_is_rotated_in_its_secret_manager(tmp_path: Path) -> None:
    source = write(tmp_path / "from-vault", f"vault-1 {KEY}\n")
    with pytest.raises(KeyringError, match="secret manager"):
        keyrings.rotate(command_printing(source))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_running_server_sees_a_rotated_keyring_file(tmp_path: Path) -> None:
    path = tmp_path / "k"
    first = keyrings.generate(path)
    clock = Clock()
    source = KeyringSource(str(path), first, clock=clock)
    rotated = keyrings.rotate(str(path))

    assert source.current().newest == first.newest  # checked at most once a second
    clock.now = 1.5
    assert source.current().newest == rotated.newest


def test_a_broken_rewrite_keeps_the_keys_already_loaded(tmp_path: Path) -> None:
    path = tmp_path / "k"
    first = keyrings.generate(path)
    clock = Clock()
    errors: list[KeyringError] = []
    source = KeyringSource(str(path), first, clock=clock, on_error=errors.append)
    write(path, "garbage\n")
    os.utime(path, ns=(1, 1))

    clock.now = 2.0
    assert source.current() == first
    assert len(errors) == 1 and KEY not in str(errors[0])


def test_an_unknown_master_key_makes_a_command_keyring_reload_at_once(tmp_path: Path) -> None:
    vault = write(tmp_path / "vault", f"v1 {KEY}\n")
    spec = command_printing(vault)
    clock = Clock()
    source = KeyringSource(spec, keyrings.load(spec), clock=clock)
    newer = base64.b64encode(bytes(32)).decode()
    write(vault, f"v1 {KEY}\nv2 {newer}\n")

    clock.now = 5.0  # commands are re-run once a minute unless asked
    assert source.current().get("v2") is None
    assert source.refresh().get("v2") is not None
