"""Reconcile: bring the database and the engine into agreement, at startup and each time the
engine answers after failing (server/workspaces/supervisor.py).

Every row is settled from what the engine says its objects are, through the ledger (so each
decision is an event with the reason); what belongs to no row is removed. Operations in
progress in this process (a workspace's lock held, its build running) are left to finish.
"""

from __future__ import annotations

import logging
import shutil

from sqlalchemy import select

from server.db.models import Snapshot, Workspace
from server.errors import DenError
from server.runtime.base import (
    ROLE_COPY,
    Checkpoints,
    ContainerStatus,
    EngineObject,
    Freezer,
    Recovers,
    WorkspaceSpec,
    names,
)
from server.workspaces.handles import (
    CHECKPOINT,
    RESTORING,
    restore_handles,
    without_restore,
)
from server.workspaces.part import ServicePart
from server.workspaces.states import Sleep, State

log = logging.getLogger(__name__)

# How long reconcile waits for a pause's checkpoint that a crash left being written (1 GiB
# takes ~3 s; docs/benchmarks.md): longer, and the writer is ended and its image removed.
CHECKPOINT_SETTLE_S = 120.0


class Reconciler(ServicePart):
    """Settles rows and engine objects for :class:`WorkspaceService` (which calls it)."""

    def remove_leftovers(self) -> None:
        """At startup, before anything runs: the build directories and the saved memory of
        snapshots without a row that a previous run left (it stopped while making them)."""
        shutil.rmtree(self.settings.data_dir / "tmp", ignore_errors=True)
        with self.sessions() as s:
            snapshots = set(s.scalars(select(Snapshot.id)))
        saved = self.settings.data_dir / "snapshots"
        for d in sorted(saved.iterdir()) if saved.is_dir() else []:
            if d.name not in snapshots:
                log.warning("startup: removing orphan saved memory %s", d)
                shutil.rmtree(d, ignore_errors=True)

    async def reconcile(self) -> None:
        """Bring the database and the engine into agreement: at startup, and again each time
        the engine answers after failing, while requests run. A workspace with an operation in
        progress (its lock held, or its build running) is left to that operation, and so are
        the engine objects it may be making.

        Three passes: volume-copy helpers left by a crash go first (they hold the volumes
        that a fork's or a restore's clean-up must remove: "volume is in use"); then each
        workspace's row is settled; then what belongs to no row, and volumes of a workspace
        that are not its current one (a restore's unfinished copy, or the data it replaced),
        are removed."""
        objects = await self.runtime.list_objects(self.svc.instance_id)  # before the rows: an
        with self.sessions() as s:  # object made meanwhile then has its row
            rows = list(s.scalars(select(Workspace)))
            snapshots = set(s.scalars(select(Snapshot.id)))
        for obj in objects:
            if obj.role == ROLE_COPY and not self.svc.busy(obj.workspace_id):
                log.warning("reconcile: removing copy helper %s of workspace %s left by a "
                            "restart", obj.name, obj.workspace_id or "?")
                await self.runtime.remove_object(obj)
        listed = listed_status(objects)
        for ws in rows:
            if self.svc.busy(ws.id) or settled(ws, listed.get(ws.id)):
                continue
            try:
                async with self.svc.locked(ws.id):
                    with self.sessions() as s:
                        current = s.get(Workspace, ws.id)
                    if current is not None:
                        await self._one(current)
            except DenError as exc:
                log.error("reconcile of workspace %s failed: %s %s", ws.id, exc.message,
                          exc.detail)
        with self.sessions() as s:
            handles = {ws.id: self.svc.spec_for(ws).handle
                       for ws in s.scalars(select(Workspace))}
        for obj in objects:
            if obj.role == ROLE_COPY:
                continue
            if obj.snapshot_id and obj.snapshot_id in snapshots:
                continue
            if obj.workspace_id in handles and not obj.snapshot_id and not self.runtime.stale(
                    obj, handles[obj.workspace_id]):
                continue
            if obj.workspace_id and self.svc.busy(obj.workspace_id):
                continue  # a snapshot, fork or restore in progress
            if self.svc.pool is not None and obj.workspace_id in self.svc.pool.owned():
                continue  # a warm pool's sandbox (made before its row)
            log.warning("reconcile: removing orphan %s %s", obj.kind, obj.name)
            await self.runtime.remove_object(obj)
        if self.svc.network is not None:
            await self.svc.network.sync(self.svc.networks.policies)

    async def _one(self, ws: Workspace) -> None:
        """Settle one row from its container's status (asked of the engine)."""
        spec = self.svc.spec_for(ws)
        state = State(ws.state)
        status = await self.runtime.status(spec)
        actor = "reconcile"
        if state is State.CREATING:
            left = ""
            try:
                await self.runtime.destroy(spec)
            except DenError as exc:  # the row must not stay "creating": say what remains
                left = f"; its engine objects could not all be removed ({exc.message})"
            self.ledger.transition(ws.id, state, State.ERROR, actor=actor,
                                   reason="Den restarted while this workspace was being created"
                                          f"{left}; delete it and create it again")
        elif state is State.DELETING:
            await self.svc.finish_delete(ws, actor=actor)
        elif state is State.STARTING and RESTORING in ws.engine:
            await self._restore(ws)
        elif state is State.PAUSING and status is not ContainerStatus.MISSING:
            await self._pause(ws, spec)
        elif state is State.RESUMING and status is not ContainerStatus.MISSING:
            # Its checkpoint is kept (or it started cold); resume falls back to a cold
            # start when it is missing, so "paused" is always safe. A wake from the frozen
            # tier cut short before the thaw: still frozen, and recorded so.
            dst = State.RUNNING if status is ContainerStatus.RUNNING else State.PAUSED
            self.ledger.transition(ws.id, state, dst, actor=actor,
                                   sleep=Sleep.FROZEN if status is ContainerStatus.FROZEN
                                   else Sleep.SAVED,
                                   message=f"{state.value} was interrupted by a restart")
        elif (state is State.PAUSED and ws.sleep == Sleep.FROZEN.value
              and status is ContainerStatus.FROZEN and isinstance(self.runtime, Freezer)):
            await self.runtime.freeze(spec)  # idempotent; a thaw cut short left it half-frozen
        elif (state is State.PAUSED and ws.sleep == Sleep.FROZEN.value
              and status is ContainerStatus.STOPPED):
            self.ledger.transition(ws.id, state, State.STOPPED, actor=actor,
                                   message="the frozen workspace's container exited meanwhile: "
                                           "running processes were lost, files are kept; it starts "
                                           "on the next access")
        elif state is State.RUNNING and status is ContainerStatus.FROZEN:
            if isinstance(self.runtime, Freezer):  # frozen from outside Den: it must answer
                await self.runtime.thaw(spec)
                self.ledger.note(ws.id, "reconcile", "found frozen in the engine; thawed")
        elif (state is State.RUNNING and status is ContainerStatus.RUNNING
              and isinstance(self.runtime, Recovers)):
            done = await self.runtime.recover_running(spec)
            if done:
                self.ledger.note(ws.id, "reconcile", done)
        elif state is State.PAUSED and status is ContainerStatus.RUNNING:
            self.ledger.transition(ws.id, state, State.RESUMING, actor=actor)
            self.ledger.transition(ws.id, State.RESUMING, State.RUNNING, actor=actor,
                                   message="found running in the engine")
        elif state is State.STARTING and status is not ContainerStatus.MISSING:
            if status is ContainerStatus.RUNNING:
                self.ledger.transition(ws.id, state, State.RUNNING, actor=actor)
            else:
                self.ledger.transition(ws.id, state, State.STOPPED, actor=actor,
                                       message="start was interrupted by a restart")
        elif state is State.STOPPING and status is not ContainerStatus.MISSING:
            await self.runtime.stop(spec, timeout_s=self.settings.stop_timeout_s)
            self.ledger.transition(ws.id, state, State.STOPPED, actor=actor,
                                   message="finished a stop interrupted by a restart")
        elif status is ContainerStatus.MISSING and state is not State.ERROR:
            self.ledger.transition(ws.id, state, State.ERROR, actor=actor,
                                   reason="the workspace's container is gone from the engine; "
                                          "its data volume may remain; delete the workspace")
        elif state is State.RUNNING and status is ContainerStatus.STOPPED:
            self.ledger.transition(ws.id, state, State.STOPPED, actor=actor,
                                   message="found stopped in the engine")
        elif state is State.STOPPED and status is ContainerStatus.RUNNING:
            self.ledger.transition(ws.id, state, State.RUNNING, actor=actor,
                                   message="found running in the engine")

    async def _restore(self, ws: Workspace) -> None:
        """A restore cut short by a crash: before its commit point (the row's handle is still
        the old one) the workspace is exactly as it was and the partial copy goes; after it,
        the restore is finished (container recreated on the copy, the old data removed) and
        the workspace is left stopped (the next access starts it)."""
        pending = dict(ws.engine[RESTORING])
        spec = self.svc.spec_for(ws)
        what = f"restore of snapshot {pending.get('snapshot', '?')}"
        was = State(str(pending.get("from") or State.STOPPED.value))
        new, old = restore_handles(pending, spec.handle)
        if dict(spec.handle) != new:
            await self.svc.restores.remove_named(ws.id, names(new) - names(spec.handle))
            self.ledger.set_engine(ws.id, without_restore(ws.engine))
            self.ledger.transition(ws.id, State.STARTING, was, actor="reconcile",
                                   message=f"{what} was interrupted by a restart before its "
                                           "copy was complete; the partial copy is removed and "
                                           "the workspace is exactly as it was",
                                   reason=str(pending.get("reason") or "")
                                   if was is State.ERROR else "")
            return
        await self.svc.restores.disks().replace_container(
            spec, old=old)
        self.ledger.set_engine(ws.id, without_restore(ws.engine))
        self.ledger.transition(ws.id, State.STARTING, State.STOPPED, actor="reconcile",
                               message=f"{what} was interrupted by a restart after its copy was "
                                       "complete; it is finished now (files restored; memory not): "
                                       "the workspace starts on the next access")

    async def _pause(self, ws: Workspace, spec: WorkspaceSpec) -> None:
        """A pause cut short by a crash: its checkpoint may still be being written (runsc
        outlives Den). Wait for it, bounded; a complete one makes the workspace paused, an
        incomplete one is removed and the workspace is what its container is."""
        saved = isinstance(self.runtime, Checkpoints) and await self.runtime.settle_checkpoint(
            spec, checkpoint=CHECKPOINT, wait_s=CHECKPOINT_SETTLE_S)
        status = await self.runtime.status(spec)
        if status is ContainerStatus.FROZEN:  # a freeze (or a save of a frozen one) cut short
            self.ledger.transition(ws.id, State.PAUSING, State.PAUSED, actor="reconcile",
                                   sleep=Sleep.FROZEN,
                                   message="pause was interrupted by a restart; the workspace is "
                                           "frozen in place, memory and processes kept")
        elif saved and status is not ContainerStatus.RUNNING:
            self.ledger.transition(ws.id, State.PAUSING, State.PAUSED, actor="reconcile",
                                   message="pause was interrupted by a restart; its checkpoint was "
                                           "complete: memory and processes are saved")
        elif status is ContainerStatus.RUNNING:
            self.ledger.transition(ws.id, State.PAUSING, State.RUNNING, actor="reconcile",
                                   message="pause was interrupted by a restart before its "
                                           "checkpoint was made; the workspace kept running")
        else:
            self.ledger.transition(ws.id, State.PAUSING, State.STOPPED, actor="reconcile",
                                   message="pause was interrupted by a restart and its checkpoint "
                                           "was incomplete (removed): running processes were lost, "
                                           "files are kept; it starts on the next access")


def listed_status(objects: list[EngineObject]) -> dict[str, ContainerStatus]:
    """Workspace id -> its container's status as the engine's list said, for workspaces
    with exactly one container listed with a status."""
    found: dict[str, list[ContainerStatus | None]] = {}
    for obj in objects:
        if obj.kind == "container" and obj.workspace_id and obj.role != ROLE_COPY:
            found.setdefault(obj.workspace_id, []).append(obj.status)
    return {ws_id: s[0] for ws_id, s in found.items() if len(s) == 1 and s[0] is not None}


def settled(ws: Workspace, listed: ContainerStatus | None) -> bool:
    """Whether reconcile has nothing to do for this row, the engine's list having said how
    its container is (``listed``; None: not said), so that no engine call is made for it:
    a host with 2,000 paused workspaces would otherwise inspect each container at every
    reconcile (bench_paused). Only the states that :meth:`Reconciler._one` leaves as they
    are: ``error`` whatever the engine says, a saved ``paused`` or a ``stopped`` one whose
    container is stopped. The row was read after the list; an operation that started
    meanwhile holds the workspace (``busy``) and is skipped anyway."""
    if ws.state == State.ERROR.value:
        return True
    if listed is not ContainerStatus.STOPPED:
        return False
    return ws.state == State.STOPPED.value or (ws.state == State.PAUSED.value
                                               and ws.sleep != Sleep.FROZEN.value)

