"""CSRF protection for the web UI's forms, and the Origin check the terminal's WebSocket
shares. Every state-changing form carries the session's token in ``csrf_token``; the token is
compared in constant time, and a request whose Origin header names another site is refused
even with the right token."""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from fastapi import Request
from starlette.requests import HTTPConnection

from server.errors import Forbidden

FIELD = "csrf_token"


def token(conn: HTTPConnection) -> str:
    """This session's CSRF token (made on first use)."""
    value = conn.session.get("csrf")
    if not isinstance(value, str):
        value = secrets.token_urlsafe(32)
        conn.session["csrf"] = value
    return value


def expected_origin(conn: HTTPConnection, public_url: str) -> str:
    """The one origin Den's own pages have: DEN_PUBLIC_URL's, else this request's host."""
    if public_url:
        parts = urlsplit(public_url)
        return f"{parts.scheme}://{parts.netloc}".lower()
    scheme = {"ws": "http", "wss": "https"}.get(conn.url.scheme, conn.url.scheme)
    return f"{scheme}://{conn.headers.get('host', '')}".lower()


def same_origin(conn: HTTPConnection, public_url: str, *, required: bool) -> bool:
    """Whether the Origin header is Den's own; a missing one passes unless ``required``."""
    origin = conn.headers.get("origin")
    if origin is None:
        return not required
    return origin.lower().rstrip("/") == expected_origin(conn, public_url)


async def protect(request: Request) -> None:
    """FastAPI dependency of every form POST: 403 without the session's token."""
    settings = request.app.state.settings
    if not same_origin(request, settings.public_url, required=False):
        raise Forbidden("cross-site form post refused", code="csrf")
    form = await request.form()
    sent = form.get(FIELD)
    known = request.session.get("csrf")
    if not isinstance(sent, str) or not isinstance(known, str) or not hmac.compare_digest(
        sent.encode(), known.encode()
    ):
        raise Forbidden("the form is out of date or did not come from Den (CSRF token "
                        "missing or wrong); reload the page and try again", code="csrf")
