"""The bearer-token cache (server/auth/token_cache.py): answers without the database, and
forgets at once what this process revokes or changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session, sessionmaker

from server.auth import tokens
from server.auth.token_cache import TokenCache
from server.db.models import ApiToken, User
from tests.conftest import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(sessions: sessionmaker[Session], clock: FakeClock) -> TokenCache:
    c = TokenCache(ttl_s=5, max_entries=3, clock=clock)
    c.watch(sessions)
    return c


def issue(sessions: sessionmaker[Session], name: str = "alice") -> tuple[int, str]:
    with sessions.begin() as s:
        row, secret = tokens.issue_token(s, tokens.ensure_user(s, name))
        return row.id, secret


def delete_behind_its_back(sessions: sessionmaker[Session], token_id: int) -> None:
    """A change no session of this process makes: another process's (den admin, a second
    den serve)."""
    engine = sessions.kw["bind"]
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM api_tokens WHERE id = :id"), {"id": token_id})


def test_a_token_seen_lately_is_answered_without_the_database(
        sessions: sessionmaker[Session], cache: TokenCache, clock: FakeClock) -> None:
    token_id, secret = issue(sessions)
    first = tokens.authenticate_token(sessions, secret, cache)
    assert first is not None and first.user.name == "alice" and len(cache) == 1
    delete_behind_its_back(sessions, token_id)
    again = tokens.authenticate_token(sessions, secret, cache)  # from the cache
    assert again is not None and again.token_id == token_id and again.user.id == first.user.id
    assert again.user is not first.user  # a fresh copy each time
    clock.now += 5  # past the TTL: the database says it is gone
    assert tokens.authenticate_token(sessions, secret, cache) is None
    assert len(cache) == 0


def test_revoking_takes_effect_at_once(sessions: sessionmaker[Session], cache: TokenCache) -> None:
    token_id, secret = issue(sessions)
    _, other = issue(sessions)
    assert tokens.authenticate(sessions, secret, cache) is not None
    assert tokens.authenticate(sessions, other, cache) is not None
    with sessions.begin() as s:
        user = s.scalar(select(User).where(User.name == "alice"))
        assert user is not None
        tokens.revoke_token(s, user, token_id)
    assert tokens.authenticate(sessions, secret, cache) is None
    assert tokens.authenticate(sessions, other, cache) is not None  # only that one


def test_deleting_the_user_or_a_bulk_delete_takes_effect_at_once(
        sessions: sessionmaker[Session], cache: TokenCache) -> None:
    _, secret = issue(sessions)
    _, bobs = issue(sessions, "bob")
    assert tokens.authenticate(sessions, secret, cache) is not None
    assert tokens.authenticate(sessions, bobs, cache) is not None
    with sessions.begin() as s:
        s.delete(s.scalar(select(User).where(User.name == "alice")))
    assert tokens.authenticate(sessions, secret, cache) is None
    with sessions.begin() as s:
        s.execute(delete(ApiToken))
    assert tokens.authenticate(sessions, bobs, cache) is None


def test_a_change_of_the_user_is_seen_at_once(
        sessions: sessionmaker[Session], cache: TokenCache) -> None:
    _, secret = issue(sessions)
    found = tokens.authenticate(sessions, secret, cache)
    assert found is not None and not found.is_admin and found.limits == {}
    with sessions.begin() as s:
        user = s.scalar(select(User).where(User.name == "alice"))
        assert user is not None
        user.limits = {"workspaces": 1}
        user.is_admin = True
    found = tokens.authenticate(sessions, secret, cache)
    assert found is not None and found.is_admin and found.limits == {"workspaces": 1}


def test_a_rolled_back_revocation_forgets_nothing(
        sessions: sessionmaker[Session], cache: TokenCache) -> None:
    token_id, secret = issue(sessions)
    assert tokens.authenticate(sessions, secret, cache) is not None
    with sessions() as s:
        s.delete(s.get(ApiToken, token_id))
        s.flush()
        s.rollback()
    assert len(cache) == 1
    assert tokens.authenticate(sessions, secret, cache) is not None


def test_an_expired_token_is_refused_whatever_is_cached(
        sessions: sessionmaker[Session], cache: TokenCache) -> None:
    token_id, secret = issue(sessions)
    found = tokens.authenticate_token(sessions, secret, cache)
    assert found is not None
    soon = datetime.now(UTC) + timedelta(seconds=1)
    hit = cache.get(tokens.hash_token(secret), datetime.now(UTC))
    assert hit is not None
    with sessions() as s:
        row, user = s.get(ApiToken, token_id), s.get(User, found.user.id)
        assert row is not None and user is not None
        row.expires_at = soon  # as cached, not committed: the cache alone decides below
        cache.put(tokens.hash_token(secret), token=row, user=user,
                  generation=cache.generation())
        s.rollback()
    assert cache.get(tokens.hash_token(secret), soon - timedelta(milliseconds=1)) is not None
    assert cache.get(tokens.hash_token(secret), soon) is None
    assert len(cache) == 0


def test_an_answer_older_than_a_revocation_is_not_cached(
        sessions: sessionmaker[Session], cache: TokenCache) -> None:
    token_id, secret = issue(sessions)
    generation = cache.generation()  # a lookup starts...
    with sessions() as s:
        row = s.get(ApiToken, token_id)
        assert row is not None
        user = row.user
        cache.forget(token_ids={token_id})  # ...a revocation commits meanwhile...
        cache.put(tokens.hash_token(secret), token=row, user=user, generation=generation)
    assert len(cache) == 0  # ...and its answer is dropped


def test_bounded(sessions: sessionmaker[Session], cache: TokenCache) -> None:
    secrets = [issue(sessions, f"u{i}")[1] for i in range(5)]
    for secret in secrets:
        assert tokens.authenticate(sessions, secret, cache) is not None
    assert len(cache) == 3
    assert cache.get(tokens.hash_token(secrets[0]), datetime.now(UTC)) is None  # oldest out
    assert cache.get(tokens.hash_token(secrets[4]), datetime.now(UTC)) is not None


def test_unknown_tokens_are_not_cached(sessions: sessionmaker[Session], cache: TokenCache) -> None:
    for i in range(10):
        assert tokens.authenticate(sessions, f"den_nope{i}", cache) is None
    assert len(cache) == 0
