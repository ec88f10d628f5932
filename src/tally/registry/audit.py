"""Who performs an administrative action, and the audit entry that records it.

Every administrative action is recorded in the audit log in the same store transaction as the
action itself (see `EventStore`: administrative writes take `audit=`). An action that is not a
single transaction, or an attempt that was refused, is recorded on its own with
`Registry.audit`.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from datetime import datetime

from tally.store.interface import AuditEntry, JsonValue

CLI_SOURCE = "cli"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: `id` is a key id (API) or `cli:<OS user>`; `source` is the client's address
    (API) or `cli`; `request_id` ties the entry to the request's logs."""

    id: str
    source: str
    request_id: str | None = None

    @classmethod
    def cli(cls) -> Actor:
        """The operator running the `tally` command on this host."""
        try:
            user = getpass.getuser()
        except (OSError, KeyError):  # no login name and no passwd entry (some containers)
            user = "unknown"
        return cls(id=f"cli:{user}", source=CLI_SOURCE)

    @classmethod
    def api(cls, key_id: str, *, client: str | None, request_id: str | None) -> Actor:
        """A caller of the HTTP API, by its key id and its ASGI client address."""
        return cls(id=key_id, source=client or "unknown", request_id=request_id)

    def entry(
        self,
        action: str,
        *,
        at: datetime,
        target: str | None,
        details: dict[str, JsonValue] | None = None,
    ) -> AuditEntry:
        """An audit entry of `action` on `target` by this actor. `details` must hold no secret
        and no attribute value: ids, scopes, times and counts only."""
        return AuditEntry(
            at=at,
            actor=self.id,
            action=action,
            target=target,
            details=details or {},
            source=self.source,
            request_id=self.request_id,
        )


# Acting on nobody's behalf: test fixtures and code inside the process. Every API route and
# CLI command passes its own actor.
SYSTEM = Actor(id="system", source="local")
