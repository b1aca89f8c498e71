"""Dependencies of the web pages: the signed-in user and the CSRF check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.db.models import User
from server.errors import Unauthorized
from server.web import csrf, sessions


def web_user(request: Request) -> User:
    """The user of the session cookie; 401 (a redirect to the login page) without one."""
    user = sessions.user_of(request, request.app.state.sessions)
    if user is None:
        raise Unauthorized("sign in first")
    return user


def safe_next(target: str | None, default: str = "/workspaces") -> str:
    """Where to go after login: a path on this site only (no //host, no scheme)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


WebUser = Annotated[User, Depends(web_user)]
CSRF = Depends(csrf.protect)
