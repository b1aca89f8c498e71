"""The ledger: the one writer of workspace state.

Every change of a workspace's ``state`` goes through :meth:`Ledger.transition`, which checks
the transition table, compares-and-sets the row, takes or gives back the workspace's GPUs and
records an event, all in one database transaction. The rest of the workspaces package (the
service's lifecycle, restores and forks, reconcile, the engine's events) decides *what* should
happen and calls the ledger to write it; nothing else updates ``Workspace.state``.

Besides transitions the ledger writes what is not a state change but must be recorded with
the same care: events (:meth:`note`), activity (:meth:`touch`), the backend's engine
handle (:meth:`set_engine`) and any other field of the row (:meth:`change`: the branch a
clone found, a devcontainer's image, the network policy, a restore's new data, a keepalive),
and the claim of a prebuild's fork made ahead by a create (:meth:`claim`: one transaction).
Nothing outside this module updates a ``Workspace`` row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from server.db.models import Event, Workspace
from server.errors import Conflict, NotFound
from server.gpus.allocation import GpuPool
from server.workspaces.feed import EventFeed
from server.workspaces.states import Sleep, State, can_transition
from server.workspaces.touches import TouchCoalescer

log = logging.getLogger(__name__)

ACTIVITY_DEBOUNCE = timedelta(seconds=5)


class Ledger:
    """Writes workspace state, events, activity and engine handles (see the module doc)."""

    def __init__(self, *, sessions: sessionmaker[Session], gpus: GpuPool,
                 feed: EventFeed) -> None:
        self.sessions = sessions
        self.gpus = gpus  # allocated in the transaction of each transition
        self.feed = feed  # wakes the readers of the events WebSocket
        self.touches = TouchCoalescer()  # activity: at most one write a second per workspace
        # Told of every state a workspace reaches, after its commit (the memory guard).
        self.watchers: list[Callable[[str, State], None]] = []

    def record(self, s: Session, workspace_id: str, *, kind: str, actor: str, message: str,
               src: State | None = None, dst: State | None = None) -> None:
        """Add an event to the open transaction ``s``."""
        s.add(Event(workspace_id=workspace_id, kind=kind, actor=actor, message=message,
                    from_state=src.value if src else None, to_state=dst.value if dst else None))

    def insert(self, row: Workspace, *, check: Callable[[Session], None], actor: str,
               message: str) -> None:
        """Add a new workspace in ``creating``, with its event and GPUs, in one transaction
        that first runs ``check`` (limits, a unique name: it raises to refuse)."""
        row.state = State.CREATING.value
        with self.sessions.begin() as s:
            check(s)
            s.add(row)
            s.flush()
            self.gpus.on_transition(s, row.id, None, State.CREATING)
            self.record(s, row.id, kind="state", actor=actor, message=message,
                        dst=State.CREATING)
        self.feed.changed(row.id)

    def transition(self, workspace_id: str, src: State, dst: State, *, actor: str,
                   message: str = "", reason: str = "", sleep: Sleep = Sleep.SAVED) -> None:
        """Move ``workspace_id`` from ``src`` to ``dst`` atomically, with an event. ``sleep``
        is the tier a ``paused`` workspace sleeps in (any other state has none). Conflict
        when the move is not in the table or the row is no longer in ``src``."""
        if not can_transition(src, dst):
            raise Conflict(f"cannot go from {src.value} to {dst.value}")
        now = datetime.now(UTC)
        values: dict[str, Any] = {"state": dst.value, "state_reason": reason, "updated_at": now,
                                  "sleep": sleep.value if dst is State.PAUSED else None}
        if dst is State.RUNNING:  # a start or a resume is activity: the idle clock restarts
            values["last_activity_at"] = now
        with self.sessions.begin() as s:
            res = s.execute(
                update(Workspace)
                .where(Workspace.id == workspace_id, Workspace.state == src.value)
                .values(**values)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                current = s.scalar(select(Workspace.state).where(Workspace.id == workspace_id))
                raise Conflict(
                    f"workspace is {current or 'gone'}, not {src.value}; try again",
                )
            self.gpus.on_transition(s, workspace_id, src, dst)  # taken or given back with it
            self.record(s, workspace_id, kind="state", actor=actor,
                        message=message or reason, src=src, dst=dst)
        self.feed.changed(workspace_id)
        for watcher in self.watchers:  # the transition is committed: a watcher's failure
            try:                        # must not make its caller think otherwise
                watcher(workspace_id, dst)
            except Exception:
                log.exception("workspace %s: a watcher of %s failed", workspace_id, dst.value)
        log.info("workspace %s: %s -> %s %s", workspace_id, src.value, dst.value, reason)

    def claim(self, workspace_id: str, *, made_for: str, values: Mapping[str, Any],
              check: Callable[[Session], None], actor: str, message: str) -> bool:
        """A workspace made ahead for prebuild ``made_for`` (hidden, ``paused`` frozen)
        becomes a create's: ``values`` (its name, owner's settings) written, no longer
        hidden, ``paused`` -> ``creating``, with its event, in one transaction that first runs
        ``check`` (a unique name: it raises to refuse). False, with nothing written, when it
        is no longer there to take (another create took it, or it is being deleted)."""
        if values.keys() & {"state", "sleep", "id", "prebuild_id"}:
            raise ValueError(f"claim() cannot write {sorted(values)}")
        now = datetime.now(UTC)
        with self.sessions.begin() as s:
            check(s)
            res = s.execute(
                update(Workspace)
                .where(Workspace.id == workspace_id, Workspace.prebuild_id == made_for,
                       Workspace.state == State.PAUSED.value,
                       Workspace.sleep == Sleep.FROZEN.value)
                .values(**values, prebuild_id=None, state=State.CREATING.value, sleep=None,
                        state_reason="", updated_at=now)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return False
            self.gpus.on_transition(s, workspace_id, State.PAUSED, State.CREATING)
            self.record(s, workspace_id, kind="state", actor=actor, message=message,
                        src=State.PAUSED, dst=State.CREATING)
        self.feed.changed(workspace_id)
        log.info("workspace %s: claimed (made ahead for prebuild %s)", workspace_id, made_for)
        return True

    def note(self, workspace_id: str, kind: str, message: str, *, actor: str = "system") -> None:
        """Record an event that is not a state change."""
        with self.sessions.begin() as s:
            self.record(s, workspace_id, kind=kind, actor=actor, message=message)
        self.feed.changed(workspace_id)

    def touch(self, workspace_id: str, *, force: bool = False) -> None:
        """Mark activity on a workspace (debounced writes, coalesced in this process unless
        ``force``: :mod:`server.workspaces.touches`)."""
        if not force and not self.touches.due(workspace_id):
            return
        now = datetime.now(UTC)
        with self.sessions.begin() as s:
            s.execute(
                update(Workspace)
                .where(Workspace.id == workspace_id,
                       Workspace.last_activity_at < now - ACTIVITY_DEBOUNCE)
                .values(last_activity_at=now)
            )

    def set_engine(self, workspace_id: str, engine: dict[str, Any]) -> None:
        """Persist the workspace's engine handle (no state change)."""
        with self.sessions.begin() as s:
            s.execute(update(Workspace).where(Workspace.id == workspace_id)
                      .values(engine=engine))

    def change(self, workspace_id: str,
               values: Mapping[str, Any] | Callable[[Workspace], Mapping[str, Any]], *,
               event: tuple[str, str] | None = None, actor: str = "system",
               also: Callable[[Session], None] | None = None) -> None:
        """Write fields of a workspace that are not its state, in one transaction with the
        event ``(kind, message)`` when given and ``also`` (rows that belong with the change,
        such as a devcontainer's forwarded ports). ``values`` may be computed from the row as
        it is inside the transaction (a merge of the engine handle). NotFound when the row
        is gone; ``state`` and ``sleep`` are :meth:`transition`'s alone."""
        with self.sessions.begin() as s:
            row = s.get(Workspace, workspace_id, with_for_update={"of": Workspace})
            if row is None:
                raise NotFound(f"no workspace {workspace_id!r}")
            fields = dict(values(row) if callable(values) else values)
            if fields.keys() & {"state", "sleep", "id"}:
                raise ValueError(f"change() cannot write {sorted(fields)}: use transition()")
            for name, value in fields.items():
                setattr(row, name, value)
            if also is not None:
                also(s)
            if event is not None:
                self.record(s, workspace_id, kind=event[0], actor=actor, message=event[1])
        if event is not None:
            self.feed.changed(workspace_id)
