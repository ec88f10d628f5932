"""A full run, with debug logging, leaves no key and no attribute value in any output.

A real `tally serve` process goes through a whole run (keys issued, rotated and revoked,
events accepted, duplicated, conflicting and invalid, refused keys, exports, errors) and its
stdout and stderr are searched afterwards; so is every output of the CLI's administrative
commands. The one print of a secret allowed is the one-time print of a key just issued.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tally.auth import keys
from tally.crypto import keyring as keyrings
from tests.conftest import event
from tests.support.server import running_server

TALLY = Path(sys.executable).parent / "tally"
_PRINTED_KEY = re.compile(r"tly_[A-Za-z0-9]+")


@dataclass
class Run:
    """Everything a run printed, and every secret that must not be in it."""

    environment: dict[str, str]
    outputs: dict[str, str] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    values: list[str] = field(default_factory=list)

    def cli(self, *args: str, issues_key: bool = False) -> str:
        """`tally ARGS`; its stdout. With `issues_key`, the one key it printed is taken out
        of the recorded stdout (that print is the point of the command) and remembered."""
        done = subprocess.run(
            [str(TALLY), *args],
            env=self.environment,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        stdout = done.stdout
        if issues_key:
            printed = set(_PRINTED_KEY.findall(stdout))
            assert len(printed) == 1, stdout
            (secret,) = printed
            assert stdout.count(secret) == 1, "a new key is printed once"
            self.keys.append(secret)
            stdout = stdout.replace(secret, "<the one-time print>")
        self.outputs[f"tally {' '.join(args)} (stdout)"] = stdout
        self.outputs[f"tally {' '.join(args)} (stderr)"] = done.stderr
        return done.stdout

    def new_key(self, *args: str) -> tuple[str, str]:
        """(id, secret) of a key issued by `tally keys ARGS --json`."""
        issued = json.loads(self.cli("keys", *args, "--json", issues_key=True))
        return str(issued["id"]), str(issued["key"])

    def secret_value(self, label: str) -> str:
        value = f"secret-{label}-{uuid.uuid4().hex}"
        self.values.append(value)
        return value


def forbidden_in(run: Run) -> list[str]:
    """Each key whole and its random body (without prefix and checksum), each value."""
    bodies = [secret[len(keys.PREFIX) : -6] for secret in run.keys]
    return run.keys + bodies + run.values


def _environment(database_url: str, tmp_path: Path) -> dict[str, str]:
    keyring = tmp_path / "tally.keyring"
    keyrings.generate(keyring)
    return {
        "TALLY_DATABASE_URL": database_url,
        "TALLY_KEYRING": str(keyring),
        "TALLY_LOG_LEVEL": "debug",
        "TALLY_LOG_JSON": "true",
    }


def assert_secret_free(run: Run) -> None:
    leaks = {
        (where, secret[:12] + "…")
        for where, text in run.outputs.items()
        for secret in forbidden_in(run)
        if secret in text
    }
    assert leaks == set()
    tracebacks = [where for where, text in run.outputs.items() if "Traceback" in text]
    assert tracebacks == []


def test_the_cli_prints_a_secret_only_when_it_issues_the_key(
    database_url: str, tmp_path: Path
) -> None:
    settings = _environment(database_url, tmp_path)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    run = Run(environment | settings)

    run.cli("migrate")
    run.cli("tenants", "create", "acme")
    run.cli("applications", "create", "vm")
    run.cli("keys", "create", "--scope", "admin", issues_key=True)
    run.new_key("create", "--scope", "events:write", "--application", "vm")
    doomed_id, _ = run.new_key("create", "--scope", "events:read", "--tenant", "acme")
    run.cli("keys", "rotate", doomed_id, "--grace", "1h", issues_key=True)
    run.cli("keys", "revoke", doomed_id)
    run.cli("keys", "list")
    run.cli("keys", "list", "--json")
    run.cli("audit", "list")

    assert_secret_free(run)


def test_a_full_server_run_logs_no_key_no_attribute_value_and_no_traceback(
    database_url: str, tmp_path: Path
) -> None:
    settings = _environment(database_url, tmp_path)
    run = Run({})

    with running_server(database_url, tmp_path, env=settings, label="logged") as server:
        admin = server.admin_key
        assert admin, server.logs()
        run.keys.append(admin)
        with httpx.Client(base_url=server.base_url, timeout=30) as http:

            def call(method: str, path: str, key: str | None, **kwargs: Any) -> httpx.Response:
                headers = dict(kwargs.pop("headers", {}))
                if key is not None:
                    headers["Authorization"] = f"Bearer {key}"
                return http.request(method, path, headers=headers, **kwargs)

            def status(method: str, path: str, key: str | None, **kwargs: Any) -> int:
                return call(method, path, key, **kwargs).status_code

            def issue(**spec: Any) -> tuple[str, str]:
                issued = call("POST", "/v1/keys", admin, json=spec).json()
                run.keys.append(issued["key"])
                return str(issued["id"]), str(issued["key"])

            # Administration: tenants, an application, keys issued, rotated and revoked.
            assert status("POST", "/v1/tenants", admin, json={"id": "acme"}) == 201
            assert status("POST", "/v1/tenants", admin, json={"id": "globex"}) == 201
            assert status("POST", "/v1/tenants", admin, json={"id": "acme"}) == 409
            assert status("POST", "/v1/applications", admin, json={"id": "vm"}) == 201
            _, writer = issue(scopes=["events:write"], application="vm")
            _, reader = issue(scopes=["events:read"])
            _, acme_reader = issue(scopes=["events:read"], tenants=["acme"])
            old_id, _ = issue(scopes=["events:read"])
            renewed = call(
                "POST", f"/v1/keys/{old_id}/rotate", admin, json={"grace_seconds": 60}
            ).json()
            run.keys.append(renewed["key"])
            assert status("GET", "/v1/events", renewed["key"]) == 200
            assert status("DELETE", f"/v1/keys/{renewed['id']}", admin) == 204
            revoked = renewed["key"]

            # Ingestion: accepted, duplicate, conflicting and invalid events, bad bodies.
            kept = event(
                "evt-1",
                subject="vm-1",
                attributes={"note": run.secret_value("attr"), "sku": run.secret_value("sku")},
            )
            conflicting = {**kept, "attributes": {"note": run.secret_value("conflict")}}
            invalid = event(
                "evt-2",
                quantity="-1",
                time="yesterday",
                attributes={"note": run.secret_value("invalid"), "x" * 65: "a key too long"},
            )
            batch = {
                "events": [
                    kept,
                    kept,
                    conflicting,
                    invalid,
                    event("evt-3", tenant="globex", attributes={"z": run.secret_value("glob")}),
                    event("evt-4", attributes={"n": run.secret_value("long") + "x" * 300}),
                ]
            }
            assert status("POST", "/v1/events", writer, json=batch) == 200
            assert status("POST", "/v1/events", writer, json=kept) == 200  # a duplicate
            assert status("POST", "/v1/events", writer, json=conflicting) == 409
            assert status("POST", "/v1/events", writer, json=invalid) == 400
            as_json = {"Content-Type": "application/json"}
            broken = b'{"id": "evt-9", "attributes": {"a": "' + run.secret_value("raw").encode()
            assert status("POST", "/v1/events", writer, content=broken, headers=as_json) == 400
            huge = json.dumps({"events": [kept] * 20_000}).encode()
            assert status("POST", "/v1/events", writer, content=huge, headers=as_json) == 413
            plain = {"Content-Type": "text/plain"}
            assert (
                status("POST", "/v1/events", writer, content=json.dumps(kept), headers=plain) == 415
            )
            cloud = {
                "specversion": "1.0",
                "id": "ce-1",
                "source": "vm",
                "type": "compute.vcpu_seconds",
                "time": kept["time"],
                "data": {
                    "tenant": "acme",
                    "quantity": "2",
                    "attributes": {"a": run.secret_value("ce")},
                },
            }
            as_cloud = {"Content-Type": "application/cloudevents+json"}
            assert (
                status("POST", "/v1/events", writer, content=json.dumps(cloud), headers=as_cloud)
                == 200
            )

            # Refused callers: malformed, unknown and revoked keys, none, wrong scope or tenant.
            malformed = "tly_" + uuid.uuid4().hex
            unknown = keys.new_secret()
            run.keys.extend([malformed, unknown])
            for bad in (malformed, unknown, revoked, None):
                assert status("GET", "/v1/events", bad) == 401
            assert status("POST", "/v1/events", reader, json=kept) == 403
            assert status("GET", "/v1/events?tenant=globex", acme_reader) == 403
            assert status("GET", "/v1/keys", writer) == 403

            # Reads in each format, and errors.
            assert status("GET", "/v1/events", reader) == 200
            ndjson = {"Accept": "application/x-ndjson"}
            assert status("GET", "/v1/events", reader, headers=ndjson) == 200
            assert status("GET", "/v1/events", reader, headers={"Accept": "text/csv"}) == 200
            assert status("GET", "/v1/events?tenant=acme", acme_reader) == 200
            assert status("GET", "/v1/events/vm/evt-1", reader) == 200
            assert status("GET", "/v1/events/vm/evt-3", acme_reader) == 404  # another tenant's
            assert status("GET", "/v1/events/vm/nothing", reader) == 404
            assert status("GET", "/v1/events?cursor=forged", reader) == 400
            assert status("GET", "/v1/nowhere", reader) == 404
            assert status("PUT", "/v1/events", writer) == 405
            for path in ("/v1/keys", "/v1/tenants", "/v1/applications", "/v1/audit"):
                assert status("GET", path, admin) == 200
    # Its stdout is not a terminal: the first admin key went to the owner-only file it names,
    # so that stdout, like every log, must not hold it.
    stdout = server.stdout.read_text(errors="replace")
    run.outputs["server stdout"] = stdout
    run.outputs["server stderr"] = server.stderr.read_text(errors="replace")

    # The capture holds the run: an access line per request at least.
    assert run.outputs["server stderr"].count('"event": "request"') >= 40, run.outputs
    assert_secret_free(run)
