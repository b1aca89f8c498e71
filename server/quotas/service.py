"""Enforcing the per-user limits (:mod:`server.quotas.limits`).

Stock limits are checked in the transaction that adds the thing counted, after the user's
row is locked (an UPDATE of it: a row lock on PostgreSQL, the write lock on SQLite), so two
creates at once, from one server or several on one database, cannot both take the last
slot. Snapshots take minutes to copy before their row exists: one being taken holds a
reservation from the check to the insert.

Concurrency limits (execs, streams, terminals, SSH channels) count what this server has open
for the user, in memory; :meth:`Quotas.take` hands out a :class:`Slot` that its holder
releases when the call or channel ends.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.db.models import Snapshot, User, Workspace
from server.errors import LimitReached, NotFound, QuotaExceeded
from server.quotas import limits


@dataclass(frozen=True)
class Quota:
    limit: float
    used: float
    default: float


class Slot:
    """One unit of a concurrency limit, held until :meth:`release` (idempotent)."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


class Quotas:
    def __init__(self, *, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self._lock = threading.Lock()
        self._held: dict[tuple[int, str], int] = {}  # (user id, limit) -> open now
        self._snapshots: dict[int, int] = {}  # user id -> snapshots being taken

    def limits_of(self, user: User) -> dict[str, float]:
        return limits.effective(self.settings, user.limits)

    # --- stock ---------------------------------------------------------------------------

    def check_workspace(self, s: Session, user: User, *, cpus: float, memory_mb: int,
                        disk_gb: int) -> None:
        """In the transaction that inserts a workspace: refuse it (409) when it would pass
        one of the user's limits. Locks the user's row until the transaction ends."""
        lock_user(s, user.id)
        used = stock_usage(s, user.id)
        mine = self.limits_of(user)
        if used["workspaces"] + 1 > mine["workspaces"]:
            raise LimitReached(
                f"you already have {used['workspaces']:g} workspaces, your limit "
                f"(workspaces: {mine['workspaces']:g}); delete one first, or ask an admin "
                "to raise it", limit="workspaces", value=mine["workspaces"])
        for name, add in (("cpus", cpus), ("memory_mb", memory_mb), ("disk_gb", disk_gb)):
            if used[name] + add > mine[name]:
                lim = limits.LIMITS[name]
                raise LimitReached(
                    f"this workspace's {add:g} would bring you to {used[name] + add:g} "
                    f"{lim.what}, above your limit ({name}: {mine[name]:g}); ask for less, "
                    "delete a workspace, or ask an admin to raise it",
                    limit=name, value=mine[name])

    @contextlib.contextmanager
    def snapshot_slot(self, user_id: int) -> Iterator[None]:
        """Reserve one snapshot for ``user_id`` while it is taken (409 when the user has as
        many as their limit, those being taken included)."""
        with self.sessions() as s:
            user = s.get(User, user_id)
            if user is None:
                raise NotFound(f"no user {user_id}")
            mine = self.limits_of(user)["snapshots"]
            kept = s.scalar(select(func.count()).select_from(Snapshot)
                            .where(Snapshot.owner_id == user_id)) or 0
        with self._lock:
            taking = self._snapshots.get(user_id, 0)
            if kept + taking + 1 > mine:
                raise LimitReached(
                    f"you have {kept + taking} snapshots (with those of deleted workspaces "
                    f"and those being taken), your limit (snapshots: {mine:g}); delete one "
                    "first, or ask an admin to raise it", limit="snapshots", value=mine)
            self._snapshots[user_id] = taking + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._snapshots[user_id] - 1
                if left:
                    self._snapshots[user_id] = left
                else:
                    del self._snapshots[user_id]

    # --- concurrency ---------------------------------------------------------------------

    def take(self, user: User, kind: str) -> Slot:
        """One of ``user``'s ``kind`` (a concurrency limit), or 429 ``quota_exceeded`` when
        they have their limit's worth open already."""
        lim = limits.LIMITS[kind]
        mine = self.limits_of(user)[kind]
        key = (user.id, kind)
        with self._lock:
            held = self._held.get(key, 0)
            if held + 1 > mine:
                raise QuotaExceeded(
                    f"you have {held} {lim.what}, your limit ({kind}: {mine:g}); wait for one "
                    "to end, or ask an admin to raise it", limit=kind, value=mine)
            self._held[key] = held + 1

        def release() -> None:
            with self._lock:
                left = self._held[key] - 1
                if left:
                    self._held[key] = left
                else:
                    del self._held[key]

        return Slot(release)

    def held(self, user_id: int, kind: str) -> int:
        with self._lock:
            return self._held.get((user_id, kind), 0)

    # --- reading -------------------------------------------------------------------------

    def report(self, user: User) -> dict[str, Quota]:
        """Each limit of ``user`` with what they use of it now, and the server's default."""
        with self.sessions() as s:
            used: dict[str, float] = stock_usage(s, user.id)
        with self._lock:
            used["snapshots"] += self._snapshots.get(user.id, 0)
            for kind in limits.CONCURRENT:
                used[kind] = self._held.get((user.id, kind), 0)
        mine, default = self.limits_of(user), limits.defaults(self.settings)
        return {name: Quota(limit=mine[name], used=used[name], default=default[name])
                for name in limits.LIMITS}

    def set_overrides(self, name: str, body: dict[str, Any]) -> User:
        """Replace the user ``name``'s overrides (an admin's call)."""
        overrides = limits.validate_overrides(body)
        with self.sessions.begin() as s:
            user = s.scalar(select(User).where(User.name == name))
            if user is None:
                raise NotFound(f"no user {name!r}")
            user.limits = overrides
        return user

    def user_named(self, name: str) -> User:
        with self.sessions() as s:
            user = s.scalar(select(User).where(User.name == name))
        if user is None:
            raise NotFound(f"no user {name!r}")
        return user


def lock_user(s: Session, user_id: int) -> None:
    """Lock the user's row for the rest of the transaction: writes to it (a no-op one here)
    wait for each other on PostgreSQL, and on SQLite the first write takes the database's
    write lock, so what the transaction reads next is current."""
    s.execute(update(User).where(User.id == user_id).values(name=User.name)
              .execution_options(synchronize_session=False))


def stock_usage(s: Session, user_id: int) -> dict[str, float]:
    """What ``user_id`` holds: workspaces (any state) and their resources, snapshots."""
    count, cpus, memory_mb, disk_gb = s.execute(
        select(func.count(), func.coalesce(func.sum(Workspace.cpus), 0),
               func.coalesce(func.sum(Workspace.memory_mb), 0),
               func.coalesce(func.sum(Workspace.disk_gb), 0))
        .where(Workspace.owner_id == user_id)).one()
    snapshots = s.scalar(select(func.count()).select_from(Snapshot)
                         .where(Snapshot.owner_id == user_id)) or 0
    return {"workspaces": count, "cpus": float(cpus), "memory_mb": int(memory_mb),
            "disk_gb": int(disk_gb), "snapshots": snapshots}
