"""Errors of the Trace domain.

Every error the platform raises on purpose derives from ``TraceError``. The split
that matters is who is at fault, because it decides retries, HTTP status and what
a user is shown::

    TraceError
    ├── UserError                 bad input from an API caller; 4xx, never retried
    │   ├── ValidationError       a field is wrong; carries the path of the field
    │   ├── NotFound              404; also what another org's row looks like
    │   ├── PermissionDenied      403; the caller's role is too low
    │   ├── Unauthenticated       401; no or bad credentials
    │   └── Conflict              409
    ├── UserCodeError             the user's job code failed (the user-code boundary);
    │                             retried by policy, shown with its stack trace
    └── PlatformError             the platform itself failed; retried, paged on
        └── StaleFence            409: a write on behalf of a task whose lease moved on (a
                                  worker race, not the user's fault; the attempt stops quietly)
"""

from __future__ import annotations

from typing import Any


class TraceError(Exception):
    """Base of every deliberate Trace error."""

    code = "trace_error"
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details: dict[str, Any] = details or {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class UserError(TraceError):
    code = "bad_request"
    http_status = 400


class ValidationError(UserError):
    """A request field is invalid; ``path`` names it (``jobs[1].inputs[0].from.job``)."""

    code = "invalid_value"

    def __init__(self, message: str, *, path: str = "", code: str | None = None,
                 details: dict[str, Any] | None = None):
        merged = {"path": path, **(details or {})}
        super().__init__(message, code=code, details=merged)
        self.path = path


class NotFound(UserError):
    code = "not_found"
    http_status = 404


class PermissionDenied(UserError):
    code = "forbidden"
    http_status = 403


class Unauthenticated(UserError):
    code = "unauthenticated"
    http_status = 401


class Conflict(UserError):
    code = "conflict"
    http_status = 409


class UserCodeError(TraceError):
    """Raised when code the user supplied fails; carries the user's stack trace."""

    code = "user_code_error"
    http_status = 422

    def __init__(self, message: str, *, error_type: str = "Error", stack_trace: str = "",
                 code: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message, code=code, details=details)
        self.error_type = error_type
        self.stack_trace = stack_trace


class PlatformError(TraceError):
    code = "platform_error"
    http_status = 500


class StaleFence(PlatformError):
    """The caller's fence is not the task's current fence, or its lease is gone.

    A race between workers (a zombie attempt, a lapsed lease), never the user's doing: it sits
    under PlatformError, yet answers 409 where the task API meets it, since the caller lost
    the task and must not retry the write, and it is not paged on.
    """

    code = "stale_fence"
    http_status = 409
