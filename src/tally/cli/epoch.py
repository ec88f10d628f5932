"""`tally epoch show` and `tally epoch renew`: the export log's epochs (events/log.py LogEpoch).

A restore rewinds the export log; a billing system's cursor may then be ahead of it. `tally
restore` starts a new epoch by itself; after a restore Tally does not make (a point-in-time
recovery of PostgreSQL, docs/operations.md), the operator runs `tally epoch renew` before
starting Tally, so that every cursor issued before is refused with where to resume instead
of silently skipping the entries that take the offsets it has passed.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tally.bootstrap import utc_now
from tally.cli.common import JsonOption, command_store, emit, table_of
from tally.events.log import LogEpoch
from tally.events.model import format_time
from tally.registry.audit import EPOCH_RENEWED, Actor

app = typer.Typer(no_args_is_help=True, help="Show or renew the export log's epoch.")


def _row(epoch: LogEpoch) -> dict[str, Any]:
    return {
        "seq": epoch.seq,
        "epoch": epoch.id.hex(),
        "started_at": format_time(epoch.started_at),
        "reason": epoch.reason,
        "base": sum(epoch.base),
    }


@app.command("show")
def show(as_json: JsonOption = False) -> None:
    """The log's epochs, oldest first; the last is current. `base` is how many offsets the
    log had taken, over all partitions, when the epoch began."""
    with command_store() as store:
        epochs = store.log_epochs()
    rows = [_row(epoch) for epoch in epochs]
    emit(
        {"current": rows[-1]["epoch"], "epochs": [_row(e) | {"base": e.base} for e in epochs]},
        as_json=as_json,
        table=table_of(rows, ["seq", "epoch", "started_at", "reason", "base"]),
    )


@app.command("renew")
def renew(
    reason: Annotated[
        str, typer.Option(help="Why, for the record (e.g. 'PITR to 2026-12-01 10:00').")
    ] = "renewed by an operator",
    as_json: JsonOption = False,
) -> None:
    """Start a new epoch at the log's end now: every cursor issued before is refused (409
    log-rewound) with a resume cursor. Run it after restoring the store by other means than
    `tally restore` (a point-in-time recovery), before Tally serves again."""
    at = utc_now()
    with command_store() as store:
        audit = Actor.cli().entry(EPOCH_RENEWED, at=at, target=None)
        epoch = store.renew_log_epoch(reason=reason, at=at, audit=audit)
    emit(
        _row(epoch) | {"base": epoch.base},
        as_json=as_json,
        text=f"The export log is in epoch {epoch.id.hex()} (#{epoch.seq}) from now on; "
        "cursors issued before are refused with where to resume.",
    )
