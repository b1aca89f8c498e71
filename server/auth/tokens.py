"""API tokens: random, shown once, stored as SHA-256 (they carry 256 bits, so no slow hash)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from server.auth.token_cache import AUTH_UNCHANGED, TokenCache
from server.db.models import ApiToken, User, WebSession
from server.errors import NotFound, ValidationFailed

TOKEN_PREFIX = "den_"
USER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
LAST_USED_DEBOUNCE = timedelta(minutes=1)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def ensure_user(s: Session, name: str, *, admin: bool = False) -> User:
    """The user called ``name``, created when missing; ``admin=True`` also grants admin."""
    if USER_NAME_RE.fullmatch(name) is None:
        raise ValidationFailed(
            f"invalid user name {name!r}: lowercase letters, digits, '.', '_' and '-'"
        )
    user = s.scalar(select(User).where(User.name == name))
    if user is None:
        user = User(name=name, is_admin=admin)
        s.add(user)
        s.flush()
    elif admin and not user.is_admin:
        user.is_admin = True
    return user


MAX_TOKEN_LIFETIME_S = 10 * 365 * 86400


def issue_token(s: Session, user: User, *, name: str = "",
                expires_in_s: int | None = None) -> tuple[ApiToken, str]:
    """A new token for ``user``: the row and the secret (the only time it exists in clear).
    ``expires_in_s``: it stops working that many seconds from now (None: never)."""
    if len(name) > 128:
        raise ValidationFailed("token name is longer than 128 characters")
    if expires_in_s is not None and not 60 <= expires_in_s <= MAX_TOKEN_LIFETIME_S:
        raise ValidationFailed("expires_in_s must be between 60 seconds and ten years")
    token = new_token()
    expires = (datetime.now(UTC) + timedelta(seconds=expires_in_s)
               if expires_in_s is not None else None)
    row = ApiToken(user_id=user.id, name=name, token_hash=hash_token(token),
                   prefix=token[: len(TOKEN_PREFIX) + 4], expires_at=expires)
    s.add(row)
    s.flush()
    return row, token


@dataclass(frozen=True)
class Authenticated:
    user: User
    token_id: int
    expires_at: datetime | None


def authenticate_token(sessions: sessionmaker[Session], token: str,
                       cache: TokenCache | None = None) -> Authenticated | None:
    """Whose a bearer token is (and which token it is), or None: unknown, revoked, expired.
    With ``cache`` (watching ``sessions``) a token seen lately is answered without the
    database (:mod:`server.auth.token_cache`)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    digest = hash_token(token)
    now = datetime.now(UTC)
    if cache is not None:
        hit = cache.get(digest, now)
        if hit is not None:
            return Authenticated(hit.user(), hit.token_id, hit.expires_at)
        generation = cache.generation()
    with sessions.begin() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        if row.expires_at is not None and row.expires_at <= now:
            return None
        if row.last_used_at is None or row.last_used_at < now - LAST_USED_DEBOUNCE:
            s.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now)
                      .execution_options(**{AUTH_UNCHANGED: True}))
        user = row.user
        if cache is not None:
            cache.put(digest, token=row, user=user, generation=generation)
        s.expunge(user)
        return Authenticated(user, row.id, row.expires_at)


def authenticate(sessions: sessionmaker[Session], token: str,
                 cache: TokenCache | None = None) -> User | None:
    """The user a bearer token belongs to, or None."""
    found = authenticate_token(sessions, token, cache)
    return found.user if found is not None else None


def list_tokens(s: Session, user: User) -> list[ApiToken]:
    return list(s.scalars(select(ApiToken).where(ApiToken.user_id == user.id)
                          .order_by(ApiToken.id)))


def revoke_token(s: Session, user: User, token_id: int) -> None:
    """Revoke one of ``user``'s tokens, and end the web sessions it opened."""
    row = s.get(ApiToken, token_id)
    if row is None or row.user_id != user.id:
        raise NotFound(f"no token {token_id}")
    s.execute(delete(WebSession).where(WebSession.token_id == token_id))
    s.delete(row)
