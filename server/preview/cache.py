"""The preview access decision's database reads, remembered for a burst of requests.

A page load is dozens of requests to one preview; each used to read the workspace, the
port's share level, the share link and the sign-in behind the preview cookie. Here they are
kept for ``ttl_s`` (at most ``size`` of them, least recently used out first), and forgotten
all at once whenever this process commits a write to a table the decision reads
(:data:`WATCHED`): a share set back to private, a deleted or renamed workspace, a revoked
link, a logout stop access with the request after the commit. What expires with time (a
share link, a Den session) is checked against its expiry on every use, not only on loading.
``ttl_s`` bounds how long a write made by another process (none in a normal install) may go
unseen.

Races: an entry loaded before a commit and stored after it would be stale; every load notes
the cache's generation first and is stored only if no invalidation came in between, and the
invalidation runs after the commit, so a read that started later sees the new rows.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

from server.db.models import PreviewLink, PreviewPort, User, WebSession, Workspace

T = TypeVar("T")

WATCHED = (Workspace, PreviewPort, PreviewLink, WebSession, User)
_WATCHED_TABLES = frozenset(m.__tablename__ for m in WATCHED)
# An update that only marks activity changes nothing the decision reads (and comes often).
HARMLESS_COLUMNS = frozenset({"last_activity_at"})
_FLAG = "den.preview_cache_stale"


class AccessCache:
    def __init__(self, *, ttl_s: float = 5.0, size: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._generation = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        """The remembered value of ``key``, or ``load()`` (remembered unless the cache was
        invalidated while it ran)."""
        now = self._clock()
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and now - hit[0] < self.ttl_s:
                self._entries.move_to_end(key)
                self.hits += 1
                return hit[1]  # type: ignore[no-any-return]
            generation = self._generation
            self.misses += 1
        value = load()
        with self._lock:
            if generation == self._generation:
                self._entries[key] = (now, value)
                self._entries.move_to_end(key)
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        return value

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()

    # --- watching the database ------------------------------------------------------------

    def watch(self, sessions: sessionmaker[Session]) -> None:
        """Invalidate after every commit, by a session of ``sessions``, that wrote a watched
        table (ORM objects or ORM-enabled insert/update/delete statements)."""
        event.listen(sessions, "after_flush", self._after_flush)
        event.listen(sessions, "do_orm_execute", self._on_execute)
        event.listen(sessions, "after_commit", self._after_commit)
        event.listen(sessions, "after_rollback", self._after_rollback)

    def _after_flush(self, session: Session, _context: Any) -> None:
        for obj in (*session.new, *session.dirty, *session.deleted):
            if isinstance(obj, WATCHED):
                session.info[_FLAG] = True
                return

    def _on_execute(self, state: ORMExecuteState) -> None:
        if state.is_select or not writes_watched(state.statement):
            return
        state.session.info[_FLAG] = True

    def _after_commit(self, session: Session) -> None:
        if session.info.pop(_FLAG, False):
            self.invalidate()

    def _after_rollback(self, session: Session) -> None:
        session.info.pop(_FLAG, None)


def writes_watched(statement: Any) -> bool:
    """Whether an insert, update or delete statement may change what the decision reads."""
    table = getattr(statement, "table", None)
    if getattr(table, "name", None) not in _WATCHED_TABLES:
        return False
    if getattr(statement, "is_update", False):
        values = getattr(statement, "_values", None) or {}
        names = {getattr(k, "key", k) for k in values}
        if names and names <= HARMLESS_COLUMNS:
            return False
    return True
