"""Disks from snapshots: a fork's build, a restore of a workspace to one of its snapshots, and
the engine side of taking and deleting a snapshot (server/snapshots/ owns the rows and calls
these, so that it never reaches the runtime behind the workspace service's back).

State changes go through the ledger. A restore is crash-consistent: see :meth:`Restores.restore`;
reconcile finishes or undoes one cut short (server/workspaces/reconcile.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from server import faults
from server.db.models import Snapshot, Workspace
from server.errors import Conflict, DenError
from server.runtime.base import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_SNAPSHOT,
    Checkpoints,
    DiskSnapshots,
    Handle,
    SnapshotSpec,
    WorkspaceSpec,
    names,
)
from server.workspaces.handles import CHECKPOINT, RESTORING, backend_handle, without_restore
from server.workspaces.part import ServicePart
from server.workspaces.states import State

log = logging.getLogger(__name__)


class Restores(ServicePart):
    """Forks, restores and the engine objects of snapshots, for :class:`WorkspaceService`."""

    def disks(self) -> DiskSnapshots:
        """The runtime, as one that copies disks into snapshots; 409 when it cannot."""
        if not isinstance(self.runtime, DiskSnapshots):
            raise Conflict("this server's backend cannot snapshot, fork or restore "
                           "workspaces", code="snapshots_unsupported")
        return self.runtime

    async def build_fork(self, ws_id: str, snap: Snapshot, *, then: Callable[
            [str, WorkspaceSpec], Coroutine[Any, Any, None]] | None = None) -> None:
        spec = self.svc.spec_for(self.svc.get(ws_id))
        try:
            async with self.svc.metrics.operation("fork"), self.svc.locked(ws_id):
                await self.disks().load_snapshot(spec, self.snapshot_spec(snap))
                how = await self.boot_from(spec, snap)
                await self.svc.networks.sync(ws_id)
                if then is not None:  # a prebuild's: newer commits, postStartCommand
                    await then(ws_id, spec)
                self.ledger.transition(ws_id, State.CREATING, State.RUNNING, actor="system",
                                       message=f"running from snapshot {snap.id} ({how})")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self.svc.creation_failed(ws_id, spec, exc)

    def labels(self, snapshot_id: str) -> dict[str, str]:
        return {LABEL_MANAGED: "true", LABEL_INSTANCE: self.svc.instance_id,
                LABEL_SNAPSHOT: snapshot_id}

    def new_snapshot(self, snapshot_id: str) -> SnapshotSpec:
        """A new snapshot as the backend names it (its row stores ``image`` and ``handle``)."""
        return self.disks().new_snapshot(snapshot_id, self.labels(snapshot_id))

    def snapshot_spec(self, snap: Snapshot) -> SnapshotSpec:
        return SnapshotSpec(snapshot_id=snap.id, image=snap.image, handle=snap.engine,
                            labels=self.labels(snap.id))

    async def restore(self, ws_id: str, snap: Snapshot, *, actor: str) -> Workspace:
        """Roll the workspace back to ``snap``: stop it, replace its container filesystem and
        /workspace with the snapshot's, start it. A workspace in ``error`` (a failed
        restore, say) can be restored too.

        Atomic: the snapshot is copied into a new volume while the workspace keeps its own;
        only once the copy is complete does the row switch to it (one transaction, with its
        event), and then the container is recreated on it and the old volume removed. The
        row's engine handle says a restore is in progress (``restoring``), so that reconcile
        after a crash knows which half it was in: before the switch it removes the partial
        copy and the workspace is as it was; after it, it finishes the restore."""
        disks = self.disks()
        if self.svc.get(ws_id).state != State.ERROR.value:
            await self.svc.stop(ws_id, actor=actor)
        async with self.svc.metrics.operation("restore"), self.svc.locked(ws_id):
            ws = self.svc.get(ws_id)
            if ws.state not in (State.STOPPED.value, State.ERROR.value):
                raise Conflict(f"workspace is {ws.state}; try again")
            was = State(ws.state)
            old = self.svc.spec_for(ws)
            new = disks.restore_handle(old)
            self.ledger.transition(ws_id, was, State.STARTING, actor=actor,
                                   message=f"restore snapshot {snap.id} ({snap.name})")
            self.ledger.set_engine(ws_id, {**ws.engine, RESTORING: {
                "snapshot": snap.id, "handle": new, "old": dict(old.handle),
                "from": was.value, "reason": ws.state_reason}})
            try:
                await disks.copy_snapshot(old, self.snapshot_spec(snap), into=new)
            except DenError as exc:
                with contextlib.suppress(DenError):
                    await self.remove_named(ws_id, names(new) - names(old.handle))
                self.ledger.set_engine(ws_id, without_restore(self.svc.get(ws_id).engine))
                why = (f"restore of snapshot {snap.id} failed ({exc.message}); the workspace "
                       "is as it was")
                self.ledger.transition(ws_id, State.STARTING, was, actor=actor, message=why,
                                       reason=ws.state_reason if was is State.ERROR else "")
                raise
            self._switch(ws_id, snap, new, actor=actor)
            faults.point("restore.swap")
            spec = self.svc.spec_for(self.svc.get(ws_id))
            try:
                await disks.replace_container(spec, old=old.handle)
                self.ledger.set_engine(ws_id, without_restore(self.svc.get(ws_id).engine))
                how = await self.boot_from(spec, snap)
                await self.svc.networks.sync(ws_id)
            except DenError as exc:
                self.ledger.transition(ws_id, State.STARTING, State.ERROR, actor=actor,
                                       reason=f"restore of snapshot {snap.id} failed: "
                                              f"{exc.message}; restore it again")
                raise
            self.ledger.transition(ws_id, State.STARTING, State.RUNNING, actor=actor,
                                   message=f"restored snapshot {snap.id} ({snap.name}; {how})")
            return self.svc.get(ws_id)

    def _switch(self, ws_id: str, snap: Snapshot, handle: Handle, *, actor: str) -> None:
        """The commit point of a restore: the workspace's data is now the complete copy that
        ``handle`` names (and its image the snapshot's), with the event saying so."""
        before = backend_handle(self.svc.get(ws_id).engine or {})  # held under its lock
        copy = ", ".join(sorted(names(handle) - names(before)))
        self.ledger.change(ws_id, lambda ws: {"engine": {**ws.engine, **handle},
                                              "image": snap.image},
                           event=("restore", f"the copy of snapshot {snap.id} is complete; "
                                             f"the workspace now uses it ({copy})"),
                           actor=actor)

    async def remove_named(self, ws_id: str, wanted: set[str]) -> None:
        """Remove the workspace's engine objects of these names (a restore's partial copy)."""
        for obj in await self.runtime.list_objects(self.svc.instance_id):
            if obj.workspace_id == ws_id and obj.name in wanted:
                await self.runtime.remove_object(obj)

    def memory_dir(self, snapshot_id: str) -> Path:
        """Where a memory snapshot's checkpoint is kept on the host (under a 0700 directory:
        it is the workspace's memory, unencrypted)."""
        root = self.settings.data_dir / "snapshots"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return root / snapshot_id

    async def boot_from(self, spec: WorkspaceSpec, snap: Snapshot) -> str:
        """Start a container just loaded from ``snap``: from its saved memory when it has
        some (processes running), else, or when that fails, cold from its disk."""
        if snap.memory and not isinstance(self.runtime, Checkpoints):
            await self.runtime.start(spec)
            return "started cold from disk: this server's backend cannot restore memory"
        if snap.memory and isinstance(self.runtime, Checkpoints):
            try:
                await self.runtime.import_checkpoint(
                    spec, checkpoint=CHECKPOINT, src=self.memory_dir(snap.id))
                await self.runtime.resume(spec, checkpoint=CHECKPOINT)
                return "with its memory and processes"
            except DenError as exc:
                log.warning("workspace %s: memory of snapshot %s not restored: %s %s",
                            spec.workspace_id, snap.id, exc.message, exc.detail)
                await self.runtime.start(spec)
                return f"memory not restored ({exc.message}); started cold from disk"
        await self.runtime.start(spec)
        return "started from disk"



    async def take(self, ws: Workspace, snap: Snapshot) -> int:
        """Copy the workspace's disk (and, for a memory snapshot of a paused workspace, its
        checkpoint) into ``snap``'s engine objects; returns the bytes copied. A failure (a
        disk full while copying memory too) leaves nothing behind."""
        disks = self.disks()
        spec = self.snapshot_spec(snap)
        memory_dir = self.memory_dir(snap.id)
        try:
            size = await disks.snapshot(self.svc.spec_for(ws), spec)
            if snap.memory:
                if not isinstance(self.runtime, Checkpoints):
                    raise Conflict("this server's backend cannot save a workspace's memory",
                                   code="pause_unsupported")
                size += await self.runtime.export_checkpoint(
                    self.svc.spec_for(ws), checkpoint=CHECKPOINT, dest=memory_dir)
        except Exception:
            with contextlib.suppress(DenError):
                await disks.delete_snapshot(spec)
            shutil.rmtree(memory_dir, ignore_errors=True)
            raise
        return size

    async def delete(self, snap: Snapshot) -> None:
        """Remove the snapshot's engine objects and saved memory; missing ones are success."""
        await self.disks().delete_snapshot(self.snapshot_spec(snap))
        shutil.rmtree(self.memory_dir(snap.id), ignore_errors=True)
