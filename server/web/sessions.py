"""Browser sessions: a signed, HttpOnly, SameSite=Lax cookie carrying a random session id
whose SHA-256 is a row in ``web_sessions``. Logout deletes the row, so a copied cookie stops
working too. The cookie also carries the CSRF token and Authlib's login state.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import HTTPConnection

from server.config import Settings
from server.db.models import User, WebSession

COOKIE = "den_session"


def session_secret(settings: Settings) -> str:
    """DEN_SESSION_SECRET, or a key generated once into <data_dir>/session_secret (0600)."""
    if settings.session_secret:
        return settings.session_secret
    path: Path = settings.data_dir / "session_secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def _hash(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def start(conn: HTTPConnection, sessions: sessionmaker[Session], user: User, *,
          method: str, max_age_s: int, token_id: int | None = None,
          token_expires_at: datetime | None = None) -> None:
    """Sign ``user`` in: a fresh session (new id, new CSRF token; nothing carried over from
    before the login, against session fixation). A session opened with an API token
    (``token_id``) ends when the token is revoked, and no later than the token expires."""
    end(conn, sessions)
    sid = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    expires = now + timedelta(seconds=max_age_s)
    if token_expires_at is not None:
        expires = min(expires, token_expires_at)
    with sessions.begin() as s:
        s.execute(delete(WebSession).where(WebSession.expires_at < now))
        s.add(WebSession(user_id=user.id, session_hash=_hash(sid), method=method,
                         created_at=now, expires_at=expires, token_id=token_id))
    conn.session["sid"] = sid
    conn.session["csrf"] = secrets.token_urlsafe(32)
    conn.scope["den.web_user"] = user


def end(conn: HTTPConnection, sessions: sessionmaker[Session]) -> None:
    """Sign out: delete the session row and empty the cookie."""
    sid = conn.session.get("sid")
    if isinstance(sid, str):
        with sessions.begin() as s:
            s.execute(delete(WebSession).where(WebSession.session_hash == _hash(sid)))
    conn.session.clear()
    conn.scope["den.web_user"] = None


def user_of(conn: HTTPConnection, sessions: sessionmaker[Session]) -> User | None:
    """The signed-in user of this request's cookie, or None (no cookie, expired, logged out).
    Works for WebSockets too."""
    if "session" not in conn.scope:
        return None
    cached: Any = conn.scope.get("den.web_user", False)
    if cached is not False:
        return cached  # type: ignore[no-any-return]
    user = None
    sid = conn.session.get("sid")
    if isinstance(sid, str) and len(sid) < 100:
        with sessions() as s:
            row = s.scalar(select(WebSession).where(WebSession.session_hash == _hash(sid)))
            if row is not None and row.expires_at > datetime.now(UTC):
                user = s.get(User, row.user_id)
                if user is not None:
                    s.expunge(user)
    conn.scope["den.web_user"] = user
    return user


def session_hash(conn: HTTPConnection) -> str | None:
    """The stored hash of this request's session id (what a preview origin's cookie carries
    instead of the id itself), or None without a session."""
    if "session" not in conn.scope:
        return None
    sid = conn.session.get("sid")
    return _hash(sid) if isinstance(sid, str) and len(sid) < 100 else None


def user_of_hash(sessions: sessionmaker[Session], session_hash: str) -> User | None:
    """The user of the live session whose id hashes to ``session_hash``: a preview origin's
    sign-in lasts exactly as long as the Den session it came from (logout ends both)."""
    with sessions() as s:
        row = s.scalar(select(WebSession).where(WebSession.session_hash == session_hash))
        if row is None or row.expires_at <= datetime.now(UTC):
            return None
        user = s.get(User, row.user_id)
        if user is not None:
            s.expunge(user)
        return user
