"""What a user can see and remove of how they sign in: their single sign-on identities and
their web sessions (issue 11: neither could be listed or removed)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db.models import Identity, User, WebSession
from server.errors import NotFound


def identities_of(s: Session, user: User) -> list[Identity]:
    return list(s.scalars(select(Identity).where(Identity.user_id == user.id)
                          .order_by(Identity.id)))


def unlink_identity(s: Session, user: User, identity_id: int) -> None:
    """Forget one of ``user``'s logins: signing in with it no longer reaches this user.
    Another user's identity is a 404 like a missing one."""
    row = s.get(Identity, identity_id)
    if row is None or row.user_id != user.id:
        raise NotFound(f"no identity {identity_id}")
    s.delete(row)


def sessions_of(s: Session, user: User) -> list[WebSession]:
    now = datetime.now(UTC)
    return list(s.scalars(select(WebSession).where(WebSession.user_id == user.id,
                                                   WebSession.expires_at > now)
                          .order_by(WebSession.id)))


def end_session(s: Session, user: User, session_id: int) -> None:
    """End one of ``user``'s web sessions; another user's is a 404 like a missing one."""
    row = s.get(WebSession, session_id)
    if row is None or row.user_id != user.id:
        raise NotFound(f"no session {session_id}")
    s.delete(row)
