"""Errors of the forge layer: what a forge answered, or why Den refused a push.

    DenError
    ├── ForgeNotLinked        422 forge_not_linked      no linked account serves the repo URL
    ├── ForgeTokenInvalid     422 forge_token_invalid   the forge rejected the token (401)
    ├── ForgeForbidden        403 forge_forbidden       the token may not do this (403)
    ├── ForgeNotFound         404 forge_repo_not_found  repository missing or invisible
    ├── ForgeRateLimited      429 forge_rate_limited    Retry-After passed on
    ├── ForgeUnavailable      502 forge_unavailable     unreachable, timed out, 5xx
    ├── ForgeRejected         422 forge_rejected        any other refusal, in the forge's words
    ├── BaseMissing           422 base_missing          the base branch does not exist
    ├── BranchConflict        409 branch_conflict       the branch moved outside Den
    ├── PushRefused           403 push_refused          Den's push policy said no
    └── PushTooLarge          413 push_too_large        the new commits exceed the size limit

``httpx`` exceptions and git's stderr are translated into these in ``client.py`` and
``mirror.py``; nothing foreign leaves the package.
"""

from __future__ import annotations

from server.errors import DenError


class ForgeNotLinked(DenError):
    status_code = 422
    code = "forge_not_linked"


class ForgeTokenInvalid(DenError):
    status_code = 422
    code = "forge_token_invalid"


class ForgeForbidden(DenError):
    status_code = 403
    code = "forge_forbidden"


class ForgeNotFound(DenError):
    status_code = 404
    code = "forge_repo_not_found"


class ForgeRateLimited(DenError):
    status_code = 429
    code = "forge_rate_limited"

    def __init__(self, message: str, *, retry_after_s: int | None = None, detail: str = ""
                 ) -> None:
        super().__init__(message, detail=detail)
        self.retry_after_s = retry_after_s
        # Rendered as a Retry-After header by the app's error handler.
        self.headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else {}


class ForgeUnavailable(DenError):
    status_code = 502
    code = "forge_unavailable"


class ForgeRejected(DenError):
    status_code = 422
    code = "forge_rejected"


class BaseMissing(DenError):
    status_code = 422
    code = "base_missing"


class BranchConflict(DenError):
    status_code = 409
    code = "branch_conflict"


class PushRefused(DenError):
    status_code = 403
    code = "push_refused"


class PushTooLarge(DenError):
    status_code = 413
    code = "push_too_large"
