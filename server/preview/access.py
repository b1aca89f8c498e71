"""Who is opening a preview: the one place that decides it (docs/preview.md).

In order: a Den API token (``Authorization: Bearer den_...``: agents and scripts; removed
before the request goes to the app); on the path form, Den's own session cookie (same
origin); on a preview origin, that origin's ``den_preview`` cookie, set by
``/_den/auth`` after a redirect through Den and valid exactly as long as the Den session it
came from. The decision itself is :func:`server.preview.service.may_open`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection

from server.auth.tokens import authenticate
from server.db.models import User
from server.preview import tokens
from server.web import sessions as web_sessions

if TYPE_CHECKING:
    from server.preview.service import PreviewService

PREVIEW_COOKIE = "den_preview"  # a preview origin's sign-in (HttpOnly, host-only)
SHARE_COOKIE = "den_share"  # a share link's token, kept after its first use
SHARE_PARAM = "den_share"
GRANT_TTL_S = 60


def _bearer(conn: HTTPConnection) -> str | None:
    scheme, _, value = conn.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def viewer(conn: HTTPConnection, *, state: Any, previews: PreviewService,
           preview_host: str | None) -> User | None:
    """The user behind this preview request, or None. ``preview_host``: the preview origin's
    host (subdomain form), None on Den's own origin (path form). A Den session is looked up
    through the previews' cache (:meth:`PreviewService.signed_in`)."""
    token = _bearer(conn)
    if token is not None and token.startswith("den_"):
        return authenticate(state.sessions, token, getattr(state, "token_cache", None))
    if preview_host is None:
        shash = web_sessions.session_hash(conn)
        return previews.signed_in(shash) if shash is not None else None
    cookie = conn.cookies.get(PREVIEW_COOKIE)
    payload = tokens.verify(previews.key, tokens.COOKIE, cookie or "", now=time.time())
    if payload is None or payload.get("h") != preview_host or not isinstance(payload.get("s"),
                                                                               str):
        return None
    return previews.signed_in(payload["s"])


def grant(key: bytes, *, preview_host: str, session_hash: str) -> str:
    """A one-minute token that carries a Den sign-in to ``preview_host``."""
    return tokens.sign(key, tokens.GRANT, {"h": preview_host, "s": session_hash},
                       expires_at=int(time.time()) + GRANT_TTL_S)


def cookie_from_grant(key: bytes, token: str, *, preview_host: str,
                      max_age_s: int) -> str | None:
    """The value of ``den_preview`` for a valid grant made for ``preview_host``, or None."""
    payload = tokens.verify(key, tokens.GRANT, token, now=time.time())
    if payload is None or payload.get("h") != preview_host or not isinstance(payload.get("s"),
                                                                               str):
        return None
    return tokens.sign(key, tokens.COOKIE, {"h": preview_host, "s": payload["s"]},
                       expires_at=int(time.time()) + max_age_s)
