"""The Tally client SDK: report billable events exactly once, read them back resumably.

Only httpx and the standard library: the package can be used without the server's
dependencies. See the README's "Client SDK".
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any

from tally.client.client import Client
from tally.client.errors import BufferFull, ClientClosed, LogRewound, TallyError
from tally.client.events import Event, new_id
from tally.client.reading import Export, Meters
from tally.client.reporter import Failure, FlushResult
from tally.client.transport import RetryPolicy

__all__ = [
    "BufferFull",
    "Client",
    "ClientClosed",
    "Event",
    "Export",
    "Failure",
    "FlushResult",
    "LogRewound",
    "Meters",
    "RetryPolicy",
    "TallyError",
    "new_id",
    "reconciliation_digest",
]


def reconciliation_digest(entries: Iterable[Mapping[str, Any]]) -> str:
    """The digest of one tenant, type and period (docs/reconciliation.md), computed from that
    period's exported entries (events and cancellations, in any order): equal to the
    `digest` of its row in `reconciliation()` when the copy matches Tally's.

    The server's own function, `tally.events.digest.reconciliation_digest`, so there is one
    definition; imported on first use, which keeps the SDK's import free of it.
    """
    digest = importlib.import_module("tally.events.digest")
    result: str = digest.reconciliation_digest(entries)
    return result
