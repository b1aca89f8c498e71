"""Domain errors that carry their HTTP meaning.

    DenError                      500 internal (a bug if it ever reaches a user)
    ├── BadRequest                400 bad_request
    ├── ValidationFailed          422 invalid
    ├── Unauthorized              401 unauthorized
    ├── Forbidden                 403 forbidden
    ├── NotFound                  404 not_found
    ├── Conflict                  409 conflict
    │   └── LimitReached          409 quota_exceeded (a per-user stock limit: limit, value)
    ├── PayloadTooLarge           413 too_large
    ├── QuotaExceeded             429 quota_exceeded (a per-user concurrency limit)
    ├── RateLimited               429 rate_limited (with Retry-After)
    ├── RuntimeUnavailable        503 runtime_unavailable
    └── Overloaded                503 overloaded (with Retry-After)

Foreign exceptions (docker, git, SQLAlchemy) are translated into these at the module that
calls the foreign library; routes only ever see DenError. ``message`` is safe to show to
the user; ``detail`` is for the operator's log only.
"""

from __future__ import annotations


class DenError(Exception):
    status_code = 500
    code = "internal"

    def __init__(self, message: str, *, code: str | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        if code is not None:
            self.code = code


class BadRequest(DenError):
    status_code = 400
    code = "bad_request"


class ValidationFailed(DenError):
    status_code = 422
    code = "invalid"


class Unauthorized(DenError):
    status_code = 401
    code = "unauthorized"


class Forbidden(DenError):
    status_code = 403
    code = "forbidden"


class NotFound(DenError):
    status_code = 404
    code = "not_found"


class Conflict(DenError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(DenError):
    status_code = 413
    code = "too_large"


class LimitReached(Conflict):
    """A per-user stock limit (workspaces, CPUs, memory, disk, snapshots) would be passed.
    The error body names the limit and its value (``limit``, ``value``)."""

    code = "quota_exceeded"

    def __init__(self, message: str, *, limit: str, value: float) -> None:
        super().__init__(message)
        self.fields: dict[str, object] = {"limit": limit, "value": value}


class QuotaExceeded(DenError):
    """Too many of something at once (SSH keys; a per-user concurrency limit, named in the
    body as ``limit`` and ``value`` when there is one)."""

    status_code = 429
    code = "quota_exceeded"

    def __init__(self, message: str, *, limit: str | None = None,
                 value: float | None = None) -> None:
        super().__init__(message)
        self.fields: dict[str, object] = (
            {} if limit is None else {"limit": limit, "value": value})


class RateLimited(DenError):
    """More requests than the rate allows; Retry-After says when the next one is let in."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, retry_after_s))}


class RuntimeUnavailable(DenError):
    status_code = 503
    code = "runtime_unavailable"


class Overloaded(DenError):
    """Too many long calls are running and waiting: shed, do not queue forever."""

    status_code = 503
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1, detail: str = "") -> None:
        super().__init__(message, detail=detail)
        self.headers = {"Retry-After": str(max(1, retry_after_s))}
