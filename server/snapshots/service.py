"""Snapshot rows and their engine objects. Changes of a workspace's state (a restore, a
fork's build) go through the workspace service, which alone writes state."""

from __future__ import annotations

import logging
import secrets

from sqlalchemy import delete, select

from server.db.models import Snapshot, User, Workspace
from server.errors import Conflict, NotFound, ValidationFailed
from server.workspaces.service import WorkspaceService
from server.workspaces.states import State

log = logging.getLogger(__name__)

SNAPSHOT_STATES = (State.RUNNING, State.STOPPED, State.PAUSED)


def new_snapshot_id() -> str:
    return "sn" + secrets.token_hex(6)


class SnapshotService:
    def __init__(self, workspaces: WorkspaceService) -> None:
        self.workspaces = workspaces
        self.sessions = workspaces.sessions
        self.settings = workspaces.settings

    def list_for(self, ws: Workspace) -> list[Snapshot]:
        with self.sessions() as s:
            q = (select(Snapshot).where(Snapshot.workspace_id == ws.id)
                 .order_by(Snapshot.created_at))
            return list(s.scalars(q))

    def list_owned(self, user: User) -> list[Snapshot]:
        """Every snapshot of the user (those of deleted workspaces too); all for an admin."""
        with self.sessions() as s:
            q = select(Snapshot).order_by(Snapshot.created_at)
            if not user.is_admin:
                q = q.where(Snapshot.owner_id == user.id)
            return list(s.scalars(q))

    def get_for(self, user: User, snapshot_id: str) -> Snapshot:
        """The snapshot as ``user`` may see it; another user's is a 404."""
        with self.sessions() as s:
            snap = s.get(Snapshot, snapshot_id)
        if snap is None or (snap.owner_id != user.id and not user.is_admin):
            raise NotFound(f"no snapshot {snapshot_id!r}")
        return snap

    async def create(self, ws_id: str, *, name: str, memory: bool, actor: str) -> Snapshot:
        """Copy the workspace's disk as it is now; it keeps running."""
        if not name or len(name) > 64 or any(c in name for c in "\0\n"):
            raise ValidationFailed("snapshot name must be 1-64 characters on one line")
        svc = self.workspaces
        svc.restores.disks()  # 409 when this backend makes no snapshots
        with svc.quotas.snapshot_slot(svc.get(ws_id).owner_id):
            snap = await self._pause_and_take(ws_id, name=name, memory=memory, actor=actor)
        what = "with memory" if memory else "disk only"
        svc.note(ws_id, "snapshot", f"snapshot {snap.id} ({name}, {what}) taken, "
                                    f"{snap.size_bytes // (1024 * 1024)} MiB", actor=actor)
        await self._retain(ws_id, actor=actor)
        return self.get(snap.id)

    async def _pause_and_take(self, ws_id: str, *, name: str, memory: bool, actor: str
                              ) -> Snapshot:
        svc = self.workspaces
        paused_here = False
        if memory:  # memory comes from a pause; the disk is then copied at the same moment
            state = State(svc.get(ws_id).state)
            if state not in (State.RUNNING, State.PAUSED):
                raise Conflict(f"workspace is {state.value}; a memory snapshot needs it "
                               "running or paused")
            paused_here = state is State.RUNNING
            await svc.pause(ws_id, actor=actor)
        try:
            snap = await self._take(ws_id, name=name, memory=memory)
        finally:
            if paused_here:
                await svc.resume(ws_id, actor=actor)
        return snap

    async def _take(self, ws_id: str, *, name: str, memory: bool) -> Snapshot:
        svc = self.workspaces
        async with svc.metrics.operation("snapshot"), svc.locked(ws_id):
            ws = svc.get(ws_id)
            allowed = (State.PAUSED,) if memory else SNAPSHOT_STATES
            if State(ws.state) not in allowed:
                raise Conflict(
                    "workspace was woken while its memory was being saved; try again"
                    if memory else f"workspace is {ws.state}; snapshot it when it is running, "
                    "paused or stopped")
            named = svc.restores.new_snapshot(new_snapshot_id())
            snap = Snapshot(
                id=named.snapshot_id, owner_id=ws.owner_id, workspace_id=ws.id, name=name,
                memory=memory, image=named.image, engine=dict(named.handle),
                repo_url=ws.repo_url, repo_branch=ws.repo_branch, repo_dir=ws.repo_dir,
                runtime=ws.runtime, network=dict(ws.network or {}),
                devcontainer=dict(ws.devcontainer or {}),
            )
            snap.size_bytes = await svc.restores.take(ws, snap)
            with self.sessions.begin() as s:
                s.add(snap)
            return snap

    def get(self, snapshot_id: str) -> Snapshot:
        with self.sessions() as s:
            snap = s.get(Snapshot, snapshot_id)
        if snap is None:
            raise NotFound(f"no snapshot {snapshot_id!r}")
        return snap

    async def _retain(self, ws_id: str, *, actor: str) -> None:
        """Keep at most ``max_snapshots_per_workspace``: the oldest go first."""
        snaps = self.list_for(self.workspaces.get(ws_id))
        for old in snaps[: max(0, len(snaps) - self.settings.max_snapshots_per_workspace)]:
            await self.delete(old.id, actor=f"{actor} (retention)")

    async def restore(self, snap: Snapshot, *, actor: str) -> Workspace:
        if snap.workspace_id is None:
            raise Conflict("the snapshot's workspace is deleted; fork the snapshot instead",
                           code="workspace_gone")
        return await self.workspaces.restores.restore(snap.workspace_id, snap, actor=actor)

    async def fork(self, user: User, snap: Snapshot, *, name: str) -> Workspace:
        return await self.workspaces.create_fork(user, name, snap)

    async def delete(self, snapshot_id: str, *, actor: str) -> None:
        snap = self.get(snapshot_id)
        await self.workspaces.restores.delete(snap)
        with self.sessions.begin() as s:
            s.execute(delete(Snapshot).where(Snapshot.id == snapshot_id))
        if snap.workspace_id is not None:
            self.workspaces.note(snap.workspace_id, "snapshot",
                                 f"snapshot {snap.id} ({snap.name}) deleted", actor=actor)
        log.info("snapshot %s deleted by %s", snapshot_id, actor)

    async def delete_all_of(self, ws_id: str, *, actor: str) -> None:
        for snap in self.list_for(self.workspaces.get(ws_id)):
            await self.delete(snap.id, actor=actor)
