"""A small cache of bearer-token authentications, so that an API call reads no database.

Only tokens that authenticated are cached, by their SHA-256, for ``ttl_s`` (5 s), at most
``max_entries`` (1024, least recently used dropped first). Within this process a revocation
takes effect at once: :meth:`TokenCache.watch` hooks the session factory, and every commit
that deletes or changes a token or a user (revoking a token, deleting a user, an admin's
change of a user's limits or admin flag) forgets what it touched; an expired token is
refused on its next use whatever the cache holds. A lookup that was under way while such a
commit happened does not put its (possibly stale) answer into the cache (``generation``).
Another process's change (``den admin``, a second ``den serve``) is seen here within
``ttl_s`` (docs/scaling.md).
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Delete, Update, event
from sqlalchemy.orm import ORMExecuteState, Session, make_transient_to_detached, sessionmaker

from server.db.models import ApiToken, User

TTL_S = 5.0
MAX_ENTRIES = 1024
_PENDING = "den_token_cache_pending"  # Session.info key: what the open transaction changed
# An execution option for an UPDATE of those tables that changes nothing authentication
# depends on (a token's last_used_at).
AUTH_UNCHANGED = "den_auth_unchanged"


@dataclass(frozen=True)
class CachedAuth:
    """What an authentication found: the token and a copy of its user's row."""

    token_id: int
    expires_at: datetime | None
    user_id: int
    user_name: str
    is_admin: bool
    user_created_at: datetime
    user_limits: dict[str, Any]
    cached_at: float

    def user(self) -> User:
        """A fresh detached ``User`` (never one shared between requests)."""
        u = User(id=self.user_id, name=self.user_name, is_admin=self.is_admin,
                 created_at=self.user_created_at, limits=copy.deepcopy(self.user_limits))
        make_transient_to_detached(u)
        return u


class TokenCache:
    """Token digest → :class:`CachedAuth`. Thread-safe."""

    def __init__(self, *, ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, CachedAuth] = OrderedDict()
        self._generation = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def generation(self) -> int:
        """Take before reading the database; pass to :meth:`put`."""
        return self._generation

    def get(self, digest: str, now: datetime) -> CachedAuth | None:
        """The cached authentication, or None (never cached, older than ``ttl_s``, or the
        token has expired at ``now``)."""
        with self._lock:
            hit = self._entries.get(digest)
            if hit is None:
                return None
            if (self._clock() - hit.cached_at >= self.ttl_s
                    or (hit.expires_at is not None and hit.expires_at <= now)):
                del self._entries[digest]
                return None
            self._entries.move_to_end(digest)
            return hit

    def put(self, digest: str, *, token: ApiToken, user: User, generation: int) -> None:
        """Remember a successful authentication, unless something was forgotten since
        ``generation`` was taken (the answer may predate a revocation)."""
        entry = CachedAuth(token_id=token.id, expires_at=token.expires_at, user_id=user.id,
                           user_name=user.name, is_admin=user.is_admin,
                           user_created_at=user.created_at,
                           user_limits=copy.deepcopy(user.limits or {}),
                           cached_at=self._clock())
        with self._lock:
            if generation != self._generation:
                return
            self._entries[digest] = entry
            self._entries.move_to_end(digest)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def forget(self, *, token_ids: AbstractSet[int] = frozenset(),
               user_ids: AbstractSet[int] = frozenset(), everything: bool = False) -> None:
        """Drop the entries of these tokens and users (or all of them)."""
        with self._lock:
            self._generation += 1
            if everything:
                self._entries.clear()
                return
            for digest in [d for d, e in self._entries.items()
                           if e.token_id in token_ids or e.user_id in user_ids]:
                del self._entries[digest]

    def watch(self, sessions: sessionmaker[Session]) -> None:
        """Forget, at each commit of ``sessions``, the tokens and users it changed or
        deleted; a bulk UPDATE or DELETE of either table forgets everything."""
        def pending(s: Session) -> dict[str, Any]:
            found: dict[str, Any] = s.info.setdefault(
                _PENDING, {"tokens": set(), "users": set(), "all": False})
            return found

        def after_flush(s: Session, _ctx: Any) -> None:
            for obj in (*s.deleted, *s.dirty):
                if isinstance(obj, ApiToken):
                    pending(s)["tokens"].add(obj.id)
                elif isinstance(obj, User):
                    pending(s)["users"].add(obj.id)

        def on_execute(state: ORMExecuteState) -> None:
            stmt = state.statement
            if (isinstance(stmt, Update | Delete)
                    and stmt.table in (ApiToken.__table__, User.__table__)
                    and not state.execution_options.get(AUTH_UNCHANGED, False)):
                pending(state.session)["all"] = True

        def after_commit(s: Session) -> None:
            p = s.info.pop(_PENDING, None)
            if p is not None:
                self.forget(token_ids=p["tokens"], user_ids=p["users"], everything=p["all"])

        def after_rollback(s: Session) -> None:
            s.info.pop(_PENDING, None)

        event.listen(sessions, "after_flush", after_flush)
        event.listen(sessions, "do_orm_execute", on_execute)
        event.listen(sessions, "after_commit", after_commit)
        event.listen(sessions, "after_rollback", after_rollback)
