"""`tally epoch show` and `tally epoch renew`, on both stores."""

from __future__ import annotations

import getpass

from tests.cli.conftest import Tally
from tests.cli.test_cli import ok_json


def test_renew_starts_an_epoch_at_the_log_end_and_audits_it(tally: Tally) -> None:
    shown = ok_json(tally("epoch", "show", "--json"))
    (first,) = shown["epochs"]
    assert shown["current"] == first["epoch"] and first["reason"] == "created"

    renewed = ok_json(tally("epoch", "renew", "--reason", "PITR to 10:00", "--json"))

    assert renewed["seq"] == 2 and renewed["reason"] == "PITR to 10:00"
    assert renewed["epoch"] != first["epoch"] and len(bytes.fromhex(renewed["epoch"])) == 16
    shown = ok_json(tally("epoch", "show", "--json"))
    assert [e["seq"] for e in shown["epochs"]] == [1, 2]
    assert shown["current"] == renewed["epoch"]
    (entry,) = ok_json(tally("audit", "list", "--action", "log.epoch_renew", "--json"))["entries"]
    assert entry["actor"] == f"cli:{getpass.getuser()}"


def test_show_prints_a_table_for_people(tally: Tally) -> None:
    tally("epoch", "renew")
    result = tally("epoch", "show")
    assert result.exit_code == 0
    assert "created" in result.stdout and "renewed by an operator" in result.stdout
