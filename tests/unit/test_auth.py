"""API tokens: random, shown once, stored as SHA-256, revocable; users and bearer parsing."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from server.api.deps import _bearer, user_from_header
from server.auth import tokens
from server.db.models import ApiToken, User
from server.errors import NotFound, Unauthorized, ValidationFailed


def issue(sessions: sessionmaker[Session], name: str = "alice", *, admin: bool = False,
          label: str = "") -> tuple[int, str]:
    with sessions.begin() as s:
        row, secret = tokens.issue_token(s, tokens.ensure_user(s, name, admin=admin), name=label)
        return row.id, secret


def test_new_tokens_are_random_and_prefixed() -> None:
    made = {tokens.new_token() for _ in range(100)}
    assert len(made) == 100
    for t in made:
        assert t.startswith("den_")
        assert len(t) >= 4 + 43  # 32 random bytes, urlsafe base64


def test_hash_is_sha256_hex() -> None:
    assert tokens.hash_token("den_abc") == hashlib.sha256(b"den_abc").hexdigest()


def test_only_the_hash_and_a_short_prefix_are_stored(sessions: sessionmaker[Session]) -> None:
    token_id, secret = issue(sessions, label="ci")
    with sessions() as s:
        row = s.get(ApiToken, token_id)
        assert row is not None
        assert row.token_hash == tokens.hash_token(secret)
        assert row.prefix == secret[:8]
        assert row.name == "ci"
        raw = [tuple(r) for r in s.execute(text("SELECT * FROM api_tokens"))]
    assert not any(secret in str(v) for r in raw for v in r)
    assert not any(secret[8:20] in str(v) for r in raw for v in r)


def test_authenticate(sessions: sessionmaker[Session]) -> None:
    _, alice = issue(sessions, "alice")
    _, root = issue(sessions, "root", admin=True)
    user = tokens.authenticate(sessions, alice)
    assert user is not None and (user.name, user.is_admin) == ("alice", False)
    admin = tokens.authenticate(sessions, root)
    assert admin is not None and (admin.name, admin.is_admin) == ("root", True)


@pytest.mark.parametrize(
    "bad",
    ["", "den_", "den_nope", "nope", "Bearer den_x", "den_" + "a" * 300],
)
def test_authenticate_refuses(sessions: sessionmaker[Session], bad: str) -> None:
    issue(sessions)
    assert tokens.authenticate(sessions, bad) is None


def test_a_near_miss_is_refused(sessions: sessionmaker[Session]) -> None:
    _, secret = issue(sessions)
    assert tokens.authenticate(sessions, secret + "x") is None
    assert tokens.authenticate(sessions, secret[:-1]) is None
    assert tokens.authenticate(sessions, secret.upper()) is None


def test_last_used_is_recorded_and_debounced(sessions: sessionmaker[Session]) -> None:
    token_id, secret = issue(sessions)

    def last_used() -> datetime | None:
        with sessions() as s:
            return s.scalar(select(ApiToken.last_used_at).where(ApiToken.id == token_id))

    assert last_used() is None
    tokens.authenticate(sessions, secret)
    first = last_used()
    assert first is not None
    tokens.authenticate(sessions, secret)
    assert last_used() == first  # within the debounce window: no write
    old = datetime.now(UTC) - timedelta(hours=1)
    with sessions.begin() as s:
        s.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=old))
    tokens.authenticate(sessions, secret)
    latest = last_used()
    assert latest is not None and latest > old


def test_revoke(sessions: sessionmaker[Session]) -> None:
    alice_id, alice = issue(sessions, "alice")
    _, bob = issue(sessions, "bob")
    with sessions.begin() as s:
        bob_user = tokens.ensure_user(s, "bob")
        with pytest.raises(NotFound):
            tokens.revoke_token(s, bob_user, alice_id)
    assert tokens.authenticate(sessions, alice) is not None
    with sessions.begin() as s:
        tokens.revoke_token(s, tokens.ensure_user(s, "alice"), alice_id)
    assert tokens.authenticate(sessions, alice) is None
    assert tokens.authenticate(sessions, bob) is not None
    with sessions.begin() as s, pytest.raises(NotFound):
        tokens.revoke_token(s, tokens.ensure_user(s, "alice"), alice_id)


def test_list_tokens_is_per_user(sessions: sessionmaker[Session]) -> None:
    a1, _ = issue(sessions, "alice", label="one")
    a2, _ = issue(sessions, "alice", label="two")
    issue(sessions, "bob")
    with sessions() as s:
        alice = s.scalar(select(User).where(User.name == "alice"))
        assert alice is not None
        assert [(t.id, t.name) for t in tokens.list_tokens(s, alice)] == [(a1, "one"),
                                                                           (a2, "two")]


def test_token_names_are_bounded(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s, pytest.raises(ValidationFailed):
        tokens.issue_token(s, tokens.ensure_user(s, "alice"), name="x" * 129)


def test_ensure_user_creates_once_and_only_promotes(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        first = tokens.ensure_user(s, "carol")
        assert first.is_admin is False
        again = tokens.ensure_user(s, "carol")
        assert again.id == first.id
        assert tokens.ensure_user(s, "carol", admin=True).is_admin is True
        # asking again without admin does not demote
        assert tokens.ensure_user(s, "carol").is_admin is True
    with sessions() as s:
        assert s.scalar(select(User.is_admin).where(User.name == "carol")) is True
        assert len(list(s.scalars(select(User).where(User.name == "carol")))) == 1


@pytest.mark.parametrize("name", ["", "Alice", "-x", ".x", "a b", "a/b", "x" * 64, "é"])
def test_invalid_user_names(sessions: sessionmaker[Session], name: str) -> None:
    with sessions.begin() as s, pytest.raises(ValidationFailed):
        tokens.ensure_user(s, name)


@pytest.mark.parametrize("name", ["a", "alice", "a.b", "a_b", "a-b", "0", "x" * 63])
def test_valid_user_names(sessions: sessionmaker[Session], name: str) -> None:
    with sessions.begin() as s:
        assert tokens.ensure_user(s, name).name == name


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer    ", None),
        ("Basic abc", None),
        ("Bearer den_abc", "den_abc"),
        ("bearer den_abc", "den_abc"),
        ("BEARER  den_abc ", "den_abc"),
    ],
)
def test_bearer_header_parsing(header: str | None, token: str | None) -> None:
    assert _bearer(header) == token


def test_user_from_header(sessions: sessionmaker[Session]) -> None:
    _, secret = issue(sessions)

    class State:
        pass

    state = State()
    state.sessions = sessions  # type: ignore[attr-defined]
    assert user_from_header(state, f"Bearer {secret}").name == "alice"
    with pytest.raises(Unauthorized, match="missing"):
        user_from_header(state, None)
    with pytest.raises(Unauthorized, match="invalid or revoked"):
        user_from_header(state, "Bearer den_nope")
