"""The README's worked example, pasted as it stands into bash against a real `tally serve`.

Only the two things a reader fills in change: the admin key the server printed and the port.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
from pathlib import Path
from typing import Any

from tests.support.readme import readme_block
from tests.support.server import Server

SCRIPT_TIMEOUT = 60


def worked_example() -> str:
    return readme_block("## A worked example", "sh")


def reconciling() -> str:
    """The block of '## Reconciling', which continues the worked example's shell."""
    return readme_block("## Reconciling", "sh")


def json_documents(text: str) -> list[Any]:
    """Every JSON document in `text`, in order (curl prints bodies without newlines)."""
    decoder = json.JSONDecoder()
    documents: list[Any] = []
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            return documents
        document, position = decoder.raw_decode(text, position)
        documents.append(document)


def test_the_example_is_a_script_with_the_placeholders_this_test_fills() -> None:
    script = worked_example()
    assert re.search(r"^export ADMIN=\S+$", script, re.MULTILINE)
    assert "http://127.0.0.1:8000" in script


def run_example(server: Server, tmp_path: Path, script: str) -> str:
    """`script` (README blocks) against `server`, with its admin key and port; its stdout."""
    script = re.sub(r"^export ADMIN=\S+$", f"export ADMIN={server.admin_key}", script, flags=re.M)
    script = script.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    assert server.admin_key in script
    assert ":8000" not in script
    path = tmp_path / "worked_example.sh"
    path.write_text(script, encoding="utf-8")

    # -e and pipefail: any failing step (curl -f on an error status, a key not in a response)
    # fails the script, not just its last command.
    ran = subprocess.run(
        ["bash", "-e", "-o", "pipefail", str(path)],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        cwd=tmp_path,
        check=False,
    )
    assert ran.returncode == 0, f"{ran.stdout}\n{ran.stderr}\n{server.logs()}"
    return ran.stdout


def test_the_reconciling_example_runs_after_the_worked_example(
    tally_server: Server, tmp_path: Path
) -> None:
    stdout = run_example(tally_server, tmp_path, worked_example() + reconciling())

    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('{"rows"'))
    (row,) = json.loads(lines[start])["rows"]
    assert (row["tenant"], row["type"], row["count"], row["sum"]) == (
        "acme",
        "compute.vcpu_seconds",
        2,
        "0.3",
    )
    assert row["digest"].startswith("sha256-adhash4096:")
    assert row["final"] is False
    table = list(csv.DictReader(io.StringIO("\n".join(lines[start + 1 :]))))
    assert [(r["tenant"], r["count"], r["sum"], r["digest"]) for r in table] == [
        ("acme", "2", "0.3", row["digest"])
    ]


def test_the_worked_example_runs_as_written(tally_server: Server, tmp_path: Path) -> None:
    stdout = run_example(tally_server, tmp_path, worked_example())

    # Each curl's output ends with a newline: one document per line, none run into the next
    # (or into the shell's prompt).
    assert stdout.endswith("\n")
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert [json.loads(line) for line in lines] == json_documents(stdout)
    tenant, application, batch, first, second = json_documents(stdout)
    assert tenant["id"] == "acme"
    assert tenant["name"] == "Acme Corp"
    assert application["id"] == "vm-service"

    assert (batch["accepted"], batch["duplicates"], batch["rejected"]) == (2, 1, 1)
    assert [e["status"] for e in batch["events"]] == [
        "accepted",
        "accepted",
        "duplicate",
        "rejected",
    ]
    pointers = {error["pointer"] for error in batch["events"][3]["errors"]}
    assert {"/events/3/quantity", "/events/3/time"} <= pointers

    assert [e["id"] for e in first["events"]] == ["evt-1"]
    assert first["has_more"] is True
    assert [e["id"] for e in second["events"]] == ["evt-2"]
    one, two = first["events"][0], second["events"][0]
    assert (one["quantity"], two["quantity"]) == ("0.1", "0.2")
    for exported in (one, two):
        assert exported["tenant"] == "acme"
        assert exported["application"] == "vm-service"
        assert exported["region"] == "local"
        assert exported["subject"] == "vm-42"
        assert exported["unit"] == "s"
        assert exported["attributes"] == {"zone": "eu-1a"}
        assert exported["received_at"]
    assert second["next_cursor"] != first["next_cursor"]
