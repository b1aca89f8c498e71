"""Users from OIDC / OAuth logins: who a login is, what the user is called, who is an admin.

The pure parts (``Profile``, ``name_candidate``, ``admin_by_policy``, ``Admission``) are
tested by equality; ``user_for_login`` is the one place that creates users from a login or
links one to a user, and it creates one only when the operator's :class:`Admission` lets the
login in (issue 11, finding 2: with a public issuer, anyone on the internet could sign in).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.auth.tokens import USER_NAME_RE
from server.db.models import Identity, User
from server.errors import Forbidden


class RegistrationClosed(Forbidden):
    code = "registration_closed"


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


@dataclass(frozen=True)
class Admission:
    """Which logins may get a new account. ``open``: anyone the issuer vouches for; else a
    login needs a verified email in ``email_domains``, a username or verified email in
    ``users``, or a group in ``groups`` (all compared without case)."""

    open: bool = False
    email_domains: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    @classmethod
    def of(cls, *, open: bool, email_domains: list[str], users: list[str],
           groups: list[str]) -> Admission:
        return cls(open, frozenset(d.lower().lstrip("@") for d in email_domains),
                   frozenset(u.lower() for u in users), frozenset(g.lower() for g in groups))

    @property
    def empty(self) -> bool:
        return not (self.email_domains or self.users or self.groups)

    def admits(self, profile: Profile) -> bool:
        if self.open:
            return True
        email = profile.email.lower() if profile.email_verified else ""
        if email and (email in self.users or email.rpartition("@")[2] in self.email_domains):
            return True
        if profile.username and profile.username.lower() in self.users:
            return True
        return any(g.lower() in self.groups for g in profile.groups)


def _free_name(s: Session, base: str) -> str:
    name, n = base, 1
    while s.scalar(select(User.id).where(User.name == name)) is not None:
        n += 1
        name = f"{base}-{n}"
    return name


def user_for_login(s: Session, profile: Profile, *, admin: bool, admitted: bool,
                   link_to: User | None = None) -> User:
    """The user this login belongs to. A known identity is that user's; an unknown one is
    linked to ``link_to`` (someone already signed in) or gets a new user, named after the
    login and never taking an existing user's name, but only when ``admitted`` (the
    operator's allowlist, or ``admin`` by policy): else RegistrationClosed. Existing
    accounts keep working whatever the allowlist says. ``admin`` grants admin (never
    revokes: admins made with ``den admin token --admin`` stay admins)."""
    now = datetime.now(UTC)
    ident = s.scalar(select(Identity).where(Identity.issuer == profile.issuer,
                                            Identity.subject == profile.subject))
    if ident is not None:
        user = s.get(User, ident.user_id)
        assert user is not None
    else:
        if link_to is not None:
            user = s.get(User, link_to.id) or link_to
        elif not (admitted or admin):
            raise RegistrationClosed(
                "this server does not give accounts to this login; ask its operator to "
                "allow you (your email domain, user name or group)")
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
