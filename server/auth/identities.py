"""Users from OIDC / OAuth logins: who a login is, what the user is called, who is an admin.

The pure parts (``Profile``, ``name_candidate``, ``admin_by_policy``) are tested by equality;
``user_for_login`` is the one place that creates users from a login or links one to a user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.auth.tokens import USER_NAME_RE
from server.db.models import Identity, User


@dataclass(frozen=True)
class Profile:
    """What a provider says about the person who logged in."""

    issuer: str
    subject: str
    username: str = ""
    email: str = ""
    email_verified: bool = False
    groups: tuple[str, ...] = ()


def name_candidate(profile: Profile) -> str:
    """A valid Den user name from the login: its username, else the email's local part."""
    raw = profile.username or profile.email.partition("@")[0] or "user"
    name = re.sub(r"[^a-z0-9._-]+", "-", raw.lower()).strip("-._")[:56]
    if not name or USER_NAME_RE.fullmatch(name) is None:
        name = "user"
    return name


def admin_by_policy(profile: Profile, *, domains: list[str], groups: list[str]) -> bool:
    """True when the operator's policy makes this login an admin: a verified email in one of
    ``domains``, or membership of one of ``groups`` (both compared without case)."""
    if profile.email and profile.email_verified:
        domain = profile.email.rpartition("@")[2].lower()
        if domain and domain in {d.lower().lstrip("@") for d in domains}:
            return True
    wanted = {g.lower() for g in groups}
    return any(g.lower() in wanted for g in profile.groups)


def _free_name(s: Session, base: str) -> str:
    name, n = base, 1
    while s.scalar(select(User.id).where(User.name == name)) is not None:
        n += 1
        name = f"{base}-{n}"
    return name


def user_for_login(s: Session, profile: Profile, *, admin: bool,
                   link_to: User | None = None) -> User:
    """The user this login belongs to. A known identity is that user's; an unknown one is
    linked to ``link_to`` (someone already signed in) or gets a new user, named after the
    login and never taking an existing user's name. ``admin`` grants admin (never revokes:
    admins made with ``den admin token --admin`` stay admins)."""
    now = datetime.now(UTC)
    ident = s.scalar(select(Identity).where(Identity.issuer == profile.issuer,
                                            Identity.subject == profile.subject))
    if ident is not None:
        user = s.get(User, ident.user_id)
        assert user is not None
    else:
        if link_to is not None:
            user = s.get(User, link_to.id) or link_to
        else:
            user = User(name=_free_name(s, name_candidate(profile)), is_admin=False)
            s.add(user)
            s.flush()
        ident = Identity(user_id=user.id, issuer=profile.issuer, subject=profile.subject)
        s.add(ident)
    ident.email = profile.email[:255]
    ident.last_login_at = now
    if admin and not user.is_admin:
        user.is_admin = True
    s.flush()
    return user
