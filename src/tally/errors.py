"""Domain errors. The HTTP edge maps each to one RFC 9457 problem document (api/problems.py).

Nothing in a message may carry a key, an attribute value or a stack trace: messages are written
for the caller and name fields, never the values in them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem with one field: a JSON pointer (RFC 6901) into the body, or a parameter."""

    pointer: str
    detail: str
    parameter: str | None = None  # set instead of a pointer for a query or path parameter

    def under(self, prefix: str) -> FieldError:
        return FieldError(pointer=f"{prefix}{self.pointer}", detail=self.detail)


class TallyError(Exception):
    """Base of every error that Tally turns into a problem document."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(TallyError):
    """The request is malformed or invalid (ERR-VAL-400); `errors` locate each problem."""

    def __init__(self, detail: str, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors or []


class UnsupportedMediaType(InvalidInput):
    """The content type is not one Tally reads (ERR-VAL-400, HTTP 415)."""


class NotAcceptable(InvalidInput):
    """The request's Accept header names no format the route answers (406)."""


class Conflict(InvalidInput):
    """The identity is taken by different content (ERR-VAL-409, HTTP 409)."""


class PeriodFinal(Conflict):
    """The change would alter a final period's figures, which never change (ERR-VAL-409,
    HTTP 409, type /problems/period-final; docs/reconciliation.md)."""


class LogRewound(Conflict):
    """The cursor is ahead of the export log it is presented to: a restore rewound the log
    (ERR-VAL-409, HTTP 409, type /problems/log-rewound). `resume_cursor` continues from the
    last point the reader and the log agree on (docs/operations.md)."""

    def __init__(self, detail: str, *, resume_cursor: str) -> None:
        super().__init__(detail)
        self.resume_cursor = resume_cursor


class AlreadyExists(Conflict):
    """A tenant, application or key with this id exists already."""


class LastAdminKey(Conflict):
    """Revoking this key would leave no admin key that stays valid (HTTP 409)."""

    def __init__(self, hint: str = "") -> None:
        super().__init__(
            "This is the last admin key that stays valid: revoking it would lock every "
            f"operator out. Issue (or rotate to) another admin key first.{hint}"
        )


class NotFound(TallyError):
    """No such event, tenant, application or key (ERR-RES-404)."""


class Unauthenticated(TallyError):
    """Missing, unknown, expired or revoked key (ERR-AUTH-401). One message for all four."""

    def __init__(self) -> None:
        super().__init__("A valid API key is required: send 'Authorization: Bearer <key>'.")


class Forbidden(TallyError):
    """The key lacks the scope, tenant or region for this request (ERR-AUTH-403)."""


class StoreUnavailable(TallyError):
    """The store cannot be reached or is shutting down (ERR-SYS-503); safe to retry."""


class StoreFull(StoreUnavailable):
    """The disk under the store is full (ERR-SYS-503): the transaction was rolled back, so
    nothing of the request was stored; safe to retry once space is freed."""


class RateLimited(TallyError):
    """Over a rate limit (ERR-RATE-429); nothing was done, so a retry after `retry_after`
    seconds is safe. `limit`, `remaining` and `reset` describe the limit that refused."""

    def __init__(
        self, detail: str, *, limit: int, remaining: int, reset: int, retry_after: int
    ) -> None:
        super().__init__(detail)
        self.limit = limit
        self.remaining = remaining
        self.reset = reset
        self.retry_after = retry_after
