"""`tally backup verify`: every chunk and the manifest are checked, with only the keyring; a
flipped byte, a cut, chunks swapped or spliced from another backup, a wrong keyring and rows
that do not add up to the manifest are each named."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tally.backup import fileformat, service
from tally.backup.fileformat import BackupDamaged, WrongKeyring
from tally.backup.service import ManifestMismatch
from tally.cli.main import app
from tally.crypto import keyring as keyrings
from tally.crypto.keyring import Keyring, MasterKey
from tests.backup.conftest import SMALL, Clock, MakeStore

# The last migration, whichever store the backup is of (both have the same ones).
MIGRATIONS = Path(__file__).parents[2] / "src/tally/store/migrations/sqlite"
LATEST_MIGRATION = max(path.stem for path in MIGRATIONS.glob("*.sql"))


def frames(path: Path) -> list[tuple[int, int]]:
    """(offset, size) of each chunk's frame in the file."""
    data = path.read_bytes()
    (length,) = struct.unpack(">I", data[len(fileformat.MAGIC) : len(fileformat.MAGIC) + 4])
    at = len(fileformat.MAGIC) + 4 + length
    found = []
    while at < len(data):
        _, size = struct.unpack(">BI", data[at : at + 5])
        found.append((at, 5 + size))
        at += 5 + size
    return found


def edited(
    path: Path, target: Path, edit: Callable[[bytearray, list[tuple[int, int]]], bytes]
) -> Path:
    target.write_bytes(edit(bytearray(path.read_bytes()), frames(path)))
    return target


def damage(path: Path, keyring: Keyring) -> str:
    with pytest.raises(BackupDamaged) as raised:
        service.read(path, keyring)
    return str(raised.value)


def test_an_intact_backup_verifies_and_its_manifest_counts_every_table(
    backup: Path, keyring: Keyring
) -> None:
    manifest = service.read(backup, keyring)
    assert len(frames(backup)) > 10
    assert manifest.figures.tables["events"] == 7
    assert manifest.figures.tables["secrets"] == 1  # the cursor secret
    assert manifest.origin.schema_version == LATEST_MIGRATION
    assert manifest.figures.log_epoch is not None
    assert sum(manifest.figures.high_water_marks) == 9  # 7 events and 2 cancellations


def test_a_flipped_byte_names_its_chunk(backup: Path, keyring: Keyring, tmp_path: Path) -> None:
    def flip(data: bytearray, chunks: list[tuple[int, int]]) -> bytes:
        offset, size = chunks[3]
        data[offset + size // 2] ^= 0x01
        return bytes(data)

    assert "chunk 3 was altered" in damage(edited(backup, tmp_path / "f.tbk", flip), keyring)


def test_a_flipped_final_flag_or_header_byte_is_caught(
    backup: Path, keyring: Keyring, tmp_path: Path
) -> None:
    def unfinal(data: bytearray, chunks: list[tuple[int, int]]) -> bytes:
        offset, _ = chunks[-1]
        data[offset] = 0
        return bytes(data)

    assert "chunk" in damage(edited(backup, tmp_path / "u.tbk", unfinal), keyring)

    def header(data: bytearray, chunks: list[tuple[int, int]]) -> bytes:
        at = bytes(data).index(b'"created_at":"') + len('"created_at":"') + 3
        data[at] = ord("9") if data[at] != ord("9") else ord("8")
        return bytes(data)

    assert "chunk 0" in damage(edited(backup, tmp_path / "h.tbk", header), keyring)


def test_a_truncated_backup_is_refused_wherever_it_is_cut(
    backup: Path, keyring: Keyring, tmp_path: Path
) -> None:
    chunks = frames(backup)
    whole = backup.read_bytes()
    at_boundary = tmp_path / "b.tbk"
    at_boundary.write_bytes(whole[: chunks[-1][0]])
    assert "truncated" in damage(at_boundary, keyring)
    inside = tmp_path / "i.tbk"
    inside.write_bytes(whole[: chunks[2][0] + 7])
    assert "truncated: it ends inside chunk 2" in damage(inside, keyring)
    extra = tmp_path / "x.tbk"
    extra.write_bytes(whole + b"\x00")
    assert "follow its final chunk" in damage(extra, keyring)


def test_swapped_or_dropped_chunks_are_caught(
    backup: Path, keyring: Keyring, tmp_path: Path
) -> None:
    def swap(data: bytearray, chunks: list[tuple[int, int]]) -> bytes:
        (a, a_size), (b, b_size) = chunks[2], chunks[3]
        raw = bytes(data)
        return raw[:a] + raw[b : b + b_size] + raw[a : a + a_size] + raw[b + b_size :]

    assert "chunk 2" in damage(edited(backup, tmp_path / "s.tbk", swap), keyring)

    def drop(data: bytearray, chunks: list[tuple[int, int]]) -> bytes:
        offset, size = chunks[4]
        raw = bytes(data)
        return raw[:offset] + raw[offset + size :]

    assert "chunk 4" in damage(edited(backup, tmp_path / "d.tbk", drop), keyring)


def test_a_chunk_spliced_from_another_backup_is_caught(
    make_store: MakeStore, backup: Path, keyring: Keyring, tmp_path: Path
) -> None:
    # The same store again: the same plaintext, under another backup's key and header.
    other = tmp_path / "other.tbk"
    store = make_store("sqlite")
    service.take(store.store, other, keyring=keyring, now=Clock()(), chunk_bytes=SMALL)
    theirs = frames(other)[0]
    foreign = other.read_bytes()[theirs[0] : theirs[0] + theirs[1]]

    def splice(data: bytearray, chunks: list[tuple[int, int]]) -> bytes:
        offset, size = chunks[0]
        raw = bytes(data)
        return raw[:offset] + foreign + raw[offset + size :]

    assert "chunk 0" in damage(edited(backup, tmp_path / "sp.tbk", splice), keyring)


def test_a_wrong_keyring_is_named_as_such(backup: Path, keyring: Keyring) -> None:
    with pytest.raises(WrongKeyring, match="does not hold master key"):
        service.read(backup, keyrings.Keyring((keyrings.new_key(),), "other.keyring"))
    impostor = keyrings.Keyring((MasterKey(keyring.newest.id, b"\x07" * 32),), "impostor")
    with pytest.raises(WrongKeyring, match="does not open this backup's key"):
        service.read(backup, impostor)


def rewritten(
    path: Path, keyring: Keyring, target: Path, edit: Callable[[list[str]], list[str]]
) -> Path:
    """`path`'s content decrypted, edited line by line, and encrypted again as a backup of
    the same id (what a buggy or malicious writer holding the keyring could make)."""
    with path.open("rb") as file:
        header, digest = fileformat.read_header(file)
        key = fileformat.backup_key(header, keyring)
        plain = b"".join(chunk for _, chunk in fileformat.chunks(file, header, digest, key))
    lines = edit(plain.decode().splitlines())
    with target.open("wb") as file:
        writer = fileformat.Writer(
            file, keyring=keyring, backup_id=header.backup_id, created_at=header.created_at
        )
        writer.write(("\n".join(lines) + "\n").encode())
        writer.close()
    return target


def test_rows_that_do_not_add_up_to_the_manifest_are_listed(
    backup: Path, keyring: Keyring, tmp_path: Path
) -> None:
    def lose_an_event(lines: list[str]) -> list[str]:
        lines.remove(next(line for line in lines if '"feb-1"' in line and line[0] == "["))
        lines[lines.index('{"end":"events","rows":7}')] = '{"end":"events","rows":6}'
        return lines

    with pytest.raises(ManifestMismatch) as raised:
        service.read(rewritten(backup, keyring, tmp_path / "lost.tbk", lose_an_event), keyring)
    lines = raised.value.lines
    assert "table events: 7 rows in the manifest, 6 found" in lines
    assert (
        "tenant acme, type compute.vcpu_seconds, month of 2026-02: count 2 in the manifest, 1 found"
        in lines
    )

    def other_digest(lines: list[str]) -> list[str]:
        manifest = json.loads(lines[-1])
        manifest["manifest"]["periods"][0]["digest"] = "sha256-adhash4096:" + "0" * 64
        lines[-1] = json.dumps(manifest)
        return lines

    with pytest.raises(ManifestMismatch, match="reconciliation digest differs"):
        service.read(rewritten(backup, keyring, tmp_path / "d.tbk", other_digest), keyring)


def test_the_cli_exits_non_zero_naming_what_is_wrong(
    backup: Path, keyring_file: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    env = {"TALLY_KEYRING": str(keyring_file), "TALLY_DATABASE_URL": "sqlite:///nowhere.db"}
    good = runner.invoke(app, ["backup", "verify", str(backup)], env=env)
    assert good.exit_code == 0, good.output
    assert "is intact" in good.stdout and "acme" in good.stdout
    assert not Path("nowhere.db").exists()  # no store was opened, nor made

    data = bytearray(backup.read_bytes())
    data[frames(backup)[5][0] + 20] ^= 0x80
    broken = tmp_path / "broken.tbk"
    broken.write_bytes(bytes(data))
    bad = runner.invoke(app, ["backup", "verify", str(broken)], env=env)
    assert bad.exit_code == 1
    assert "chunk 5 was altered" in bad.stderr

    other = tmp_path / "other.keyring"
    keyrings.generate(other)
    wrong = runner.invoke(
        app, ["backup", "verify", str(backup), "--keyring", str(other), "--json"], env=env
    )
    assert wrong.exit_code == 2
    assert json.loads(wrong.stdout)["error"]["code"] == "keyring"

    shown = runner.invoke(app, ["backup", "verify", str(backup), "--json"], env=env)
    summary = json.loads(shown.stdout)
    assert summary["valid"] is True and summary["tables"]["cancellations"] == 2
