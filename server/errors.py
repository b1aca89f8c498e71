"""Domain errors that carry their HTTP meaning.

    DenError                      500 internal (a bug if it ever reaches a user)
    ├── BadRequest                400 bad_request
    ├── ValidationFailed          422 invalid
    ├── Unauthorized              401 unauthorized
    ├── Forbidden                 403 forbidden
    ├── NotFound                  404 not_found
    ├── Conflict                  409 conflict
    ├── PayloadTooLarge           413 too_large
    ├── QuotaExceeded             429 quota_exceeded
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


class QuotaExceeded(DenError):
    status_code = 429
    code = "quota_exceeded"


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
