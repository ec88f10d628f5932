"""The one exception of the client SDK, carrying Tally's problem document."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class TallyError(Exception):
    """Tally refused a request, or could not be reached.

    `status` is the HTTP status of Tally's answer, or None when there was none (a connection
    error, a timeout, the client closed before an answer). `problem` is the parsed RFC 9457
    problem document (`type`, `title`, `status`, `detail`, `code`, `request_id`, `errors`…);
    without an answer, the SDK writes one with a `title` and a `detail` saying what happened.
    Neither ever holds the API key: it travels only in the Authorization header.
    """

    def __init__(self, status: int | None, problem: Mapping[str, Any]) -> None:
        self.status = status
        self.problem: dict[str, Any] = dict(problem)
        super().__init__(status, self.problem)

    @property
    def code(self) -> str | None:
        """The requirement's code, e.g. ERR-VAL-400, when Tally answered with one."""
        code = self.problem.get("code")
        return code if isinstance(code, str) else None

    @property
    def errors(self) -> list[dict[str, Any]]:
        """The problem's `errors` (each with a `pointer` or `parameter` and a `detail`)."""
        errors = self.problem.get("errors")
        return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no answer"
        parts = [str(self.problem[name]) for name in ("title", "detail") if name in self.problem]
        code = f" [{self.code}]" if self.code else ""
        return f"{where}{code}: {' — '.join(parts) or 'no problem document'}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, problem={self.problem!r})"


class BufferFull(TallyError):
    """`report()` found the client's buffer full for longer than its `timeout`; the event was
    not reported (the caller still holds it)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            None,
            {
                "title": "The client's buffer is full",
                "detail": f"{limit} events are waiting for Tally's acknowledgement.",
            },
        )


class ClientClosed(TallyError):
    """The client was closed: it takes no more events or requests."""

    def __init__(self) -> None:
        super().__init__(None, {"title": "The client is closed"})


class LogRewound(TallyError):
    """The export cursor is ahead of Tally's log (HTTP 409, type `/problems/log-rewound`):
    the store was restored from a backup, so entries after the restored point may have been
    stored again at other positions. Export again from `resume_cursor`, the last point this
    reader and the log agree on; entries read after it may come again, so deduplicate them
    by `(application, id, kind)`."""

    @property
    def resume_cursor(self) -> str | None:
        cursor = self.problem.get("resume_cursor")
        return cursor if isinstance(cursor, str) else None


def error_of(status: int | None, problem: Mapping[str, Any]) -> TallyError:
    """The SDK's exception for Tally's answer `status` with `problem`."""
    if status == 409 and str(problem.get("type", "")).endswith("/log-rewound"):
        return LogRewound(status, problem)
    return TallyError(status, problem)
