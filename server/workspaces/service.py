"""The workspace service: the only writer of workspace state, the only caller of the runtime's
lifecycle methods. Every state change goes through :meth:`WorkspaceService._transition`,
which checks the transition table, compares-and-sets the row and records an event in the
same database transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import shutil
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from server import faults
from server.config import Settings
from server.db.models import Event, Snapshot, User, Workspace
from server.devcontainer import ports as devc_ports
from server.devcontainer import source as devc_source
from server.devcontainer.setup import DevContainers, Plan, Resources
from server.errors import (
    Conflict,
    DenError,
    Forbidden,
    NotFound,
    ValidationFailed,
)
from server.git import clone as git_clone
from server.gpus.allocation import GpuPool
from server.logs import bind_workspace
from server.metrics import Metrics
from server.network import policy as net_policy
from server.network.denials import Denial, RateLimit
from server.network.guard import NetworkGuard
from server.outbound import OutboundPolicy, git_pin
from server.quotas.service import Quotas
from server.runtime.base import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_SNAPSHOT,
    ROLE_COPY,
    AgentChannel,
    ContainerStatus,
    EngineEvent,
    EngineEventKind,
    EngineObject,
    ExecRequest,
    ExecResult,
    ExecStream,
    Freezer,
    PortConnector,
    Runtime,
    SnapshotSpec,
    WorkspaceSpec,
    labels_for,
)
from server.runtime.errors import EngineConflict, ObjectMissing
from server.workspaces import image_policy, limits, naming
from server.workspaces.activity import Activity
from server.workspaces.admission import Gate
from server.workspaces.feed import EventFeed
from server.workspaces.states import (
    PAUSE,
    RESUME,
    START,
    STOP,
    TRANSITIONAL,
    Operation,
    Sleep,
    State,
    can_transition,
    plan,
)

log = logging.getLogger(__name__)

WORKSPACE_ROOT = "/workspace"
ACTIVITY_DEBOUNCE = timedelta(seconds=5)
CHECKPOINT = "den-pause"  # the one memory checkpoint a paused workspace has
RUNTIMES = ("gvisor", "runc", "microvm")
OOM_MEMORY = 1024  # workspaces whose "oom" event waits for its "die"
OOM_MEMORY_S = 60.0  # an "oom" this old no longer explains a "die"
# How long reconcile waits for a pause's checkpoint that a crash left being written (1 GiB
# takes ~3 s; docs/benchmarks.md): longer, and the writer is ended and its image removed.
CHECKPOINT_SETTLE_S = 120.0
RESTORING = "restoring"  # the key, in a workspace's engine handle, of a restore in progress
FROZEN_BYTES = "frozen_bytes"  # the key, in the engine handle, of the memory it held frozen


@dataclass(frozen=True)
class CreateRequest:
    """A validated-shape create request (the API's pydantic model fills it)."""

    name: str | None
    repo_url: str
    branch: str | None = None
    image: str | None = None
    runtime: str | None = None
    cpus: float | None = None
    memory_mb: int | None = None
    disk_gb: int | None = None
    gpus: int = 0
    gpu_model: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    idle_timeout_s: int | None = None
    stop_after_s: int | None = None
    keep_alive: bool = False
    network_mode: str | None = None  # None: the operator's default
    network_allow: tuple[str, ...] = ()
    devcontainer: bool = True  # build from the repository's devcontainer.json, if it has one


# bash when the image has it, else sh: any image works (one sh more per session, ~20 ms).
_LOGIN_SHELL = ('if command -v bash >/dev/null 2>&1; then exec bash -l "$@"; '
                'else exec sh -l "$@"; fi')


def login_shell_argv(command: str | None) -> list[str]:
    """A login shell, or one running ``command``."""
    extra = [] if command is None else ["-c", command]
    return ["/bin/sh", "-c", _LOGIN_SHELL, "den-shell", *extra]


class WorkspaceService:
    """Creates, starts, stops, deletes and reconciles workspaces; runs commands in them."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        runtime: Runtime,
        instance_id: str,
        metrics: Metrics | None = None,
        network: NetworkGuard | None = None,
        quotas: Quotas | None = None,
        devcontainers: DevContainers | None = None,
        gpus: GpuPool | None = None,
    ) -> None:
        self.settings = settings
        self.quotas = quotas if quotas is not None else Quotas(settings=settings,
                                                               sessions=sessions)
        # Builds workspaces from devcontainer.json (None: a runtime that builds no images;
        # a repository with one is then refused).
        self.devcontainers = devcontainers
        self.gpus = gpus if gpus is not None else GpuPool()  # allocated in _transition
        # Enforces network policies on the host (None: workspaces on the engine's default
        # bridge, no policy enforced).
        self.network = network
        self._containers: dict[str, str] = {}  # container name -> workspace id
        self._denials = RateLimit()
        self.outbound = OutboundPolicy.of(settings.outbound_allow)
        self.metrics = metrics if metrics is not None else Metrics()
        # Long calls (execs) are admitted through one gate: a bounded queue, then 503.
        self.long_calls = Gate(limit=settings.exec_concurrency,
                               queue_max=settings.exec_queue_max)
        self.sessions = sessions
        self.runtime = runtime
        self.instance_id = instance_id
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._tmp = settings.data_dir / "tmp"
        self._oom: dict[str, float] = {}  # workspace -> when the engine last said "oom"
        self.activity = Activity()
        self.feed = EventFeed()  # wakes the readers of the events WebSocket
        # Set by the forge service (server/forges): git environment that authenticates a
        # host-side clone (a linked account's token, in memory only), what to do to a fresh
        # clone before it is packed (Den's git hooks), and clean-up after a delete.
        self.clone_env: Callable[[Workspace], Mapping[str, str] | None] | None = None
        self.prepare_clone: Callable[[Workspace, Path, str], None] | None = None
        self.deleted_hooks: list[Callable[[str], None]] = []
        if isinstance(runtime, AgentChannel):
            runtime.on_fallback(self._agent_fallback)

    # --- reading ----------------------------------------------------------------------

    def list_for(self, user: User) -> list[Workspace]:
        with self.sessions() as s:
            q = select(Workspace).order_by(Workspace.created_at)
            if not user.is_admin:
                q = q.where(Workspace.owner_id == user.id)
            return list(s.scalars(q))

    def get_for(self, user: User, ref: str) -> Workspace:
        """The workspace ``ref`` (id or name) as ``user`` may see it; another user's is 404."""
        with self.sessions() as s:
            row = s.get(Workspace, ref)
            if row is None:
                row = s.scalar(
                    select(Workspace).where(Workspace.owner_id == user.id, Workspace.name == ref)
                )
            if row is None or (row.owner_id != user.id and not user.is_admin):
                raise NotFound(f"no workspace {ref!r}")
            bind_workspace(row.id)
            return row

    def get(self, workspace_id: str) -> Workspace:
        with self.sessions() as s:
            row = s.get(Workspace, workspace_id)
            if row is None:
                raise NotFound(f"no workspace {workspace_id!r}")
            return row

    def events(self, workspace_id: str, *, limit: int = 500, after: int = 0) -> list[Event]:
        """The last ``limit`` events (those after id ``after``), oldest first."""
        with self.sessions() as s:
            q = (
                select(Event)
                .where(Event.workspace_id == workspace_id, Event.id > after)
                .order_by(Event.id.desc())
                .limit(limit)
            )
            return list(reversed(list(s.scalars(q))))

    def spec_for(self, ws: Workspace) -> WorkspaceSpec:
        return WorkspaceSpec(
            workspace_id=ws.id,
            container_name=ws.engine.get("container")
            or naming.container_name(self.settings.engine_prefix, ws.id),
            volume_name=ws.engine.get("volume")
            or naming.volume_name(self.settings.engine_prefix, ws.id),
            image=ws.image,
            runtime=ws.runtime,
            cpus=ws.cpus,
            memory_mb=ws.memory_mb,
            disk_gb=ws.disk_gb,
            pids_limit=ws.pids_limit,
            hostname=ws.name,
            labels=labels_for(
                instance=self.instance_id, workspace_id=ws.id, owner=str(ws.owner_id)
            ),
            env={str(k): str(v) for k, v in ws.env.items()},
            gpus=self.gpus.devices_for(ws),
        )

    def repo_path(self, ws: Workspace) -> str:
        return f"{WORKSPACE_ROOT}/{ws.repo_dir}"

    # --- state ------------------------------------------------------------------------

    def locked(self, workspace_id: str) -> asyncio.Lock:
        """The workspace's operation lock: lifecycle operations hold it, and so does work
        that must not overlap one but changes no state (a snapshot)."""
        bind_workspace(workspace_id)
        return self._locks.setdefault(workspace_id, asyncio.Lock())

    def _record(self, s: Session, workspace_id: str, *, kind: str, actor: str, message: str,
                src: State | None = None, dst: State | None = None) -> None:
        s.add(Event(workspace_id=workspace_id, kind=kind, actor=actor, message=message,
                    from_state=src.value if src else None, to_state=dst.value if dst else None))

    def _transition(self, workspace_id: str, src: State, dst: State, *, actor: str,
                    message: str = "", reason: str = "", sleep: Sleep = Sleep.SAVED) -> None:
        """Move ``workspace_id`` from ``src`` to ``dst`` atomically, with an event. ``sleep``
        is the tier a ``paused`` workspace sleeps in (any other state has none)."""
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
            self._record(s, workspace_id, kind="state", actor=actor,
                         message=message or reason, src=src, dst=dst)
        self.feed.changed(workspace_id)
        log.info("workspace %s: %s -> %s %s", workspace_id, src.value, dst.value, reason)

    def _agent_fallback(self, workspace_id: str, reason: str) -> None:
        try:
            self.note(workspace_id, "agent", f"the workspace's agent did not answer: {reason}")
        except SQLAlchemyError:  # the workspace is gone meanwhile; the server log has it
            log.info("workspace %s: no event for the agent's fallback", workspace_id)

    def note(self, workspace_id: str, kind: str, message: str, *, actor: str = "system") -> None:
        """Record an event that is not a state change."""
        with self.sessions.begin() as s:
            self._record(s, workspace_id, kind=kind, actor=actor, message=message)
        self.feed.changed(workspace_id)

    def touch(self, workspace_id: str) -> None:
        """Mark activity on a workspace (debounced writes)."""
        now = datetime.now(UTC)
        with self.sessions.begin() as s:
            s.execute(
                update(Workspace)
                .where(Workspace.id == workspace_id,
                       Workspace.last_activity_at < now - ACTIVITY_DEBOUNCE)
                .values(last_activity_at=now)
            )

    # --- create -----------------------------------------------------------------------

    async def create(self, user: User, req: CreateRequest) -> Workspace:
        """Validate, insert the row in ``creating`` and start building in the background."""
        source = git_clone.validate_repo_url(
            req.repo_url,
            allowed_schemes=self.settings.allowed_git_schemes,
            local_roots=self.settings.local_repo_roots,
        )
        # Checked again, and pinned, when the clone connects (DNS may change meanwhile).
        await asyncio.to_thread(git_pin, source.url, source.kind, self.outbound)
        name = req.name if req.name is not None else naming.default_name(req.repo_url)
        if (problem := naming.validate_name(name)) is not None:
            raise ValidationFailed(problem)
        runtime = self._validate_runtime(req.runtime)
        image = await self._validate_image(req.image)
        cpus, memory_mb, disk_gb = self._validate_resources(req)
        env = limits.validate_env(req.env)
        network = self.validate_network(req.network_mode, req.network_allow)
        for field_name in ("idle_timeout_s", "stop_after_s"):
            value = getattr(req, field_name)
            if value is not None and not 0 <= value <= 365 * 86400:
                raise ValidationFailed(f"{field_name} must be between 0 (never) and a year")
        row = self._insert(
            user, name, message_prefix="create from",
            repo_url=source.url if source.kind != "file" else req.repo_url.strip(),
            repo_branch=req.branch, repo_dir=naming.repo_basename(source.url), image=image,
            runtime=runtime, cpus=cpus, memory_mb=memory_mb, disk_gb=disk_gb, gpus=req.gpus,
            gpu_model=req.gpu_model,
            env=env, idle_timeout_s=req.idle_timeout_s, stop_after_s=req.stop_after_s,
            keep_alive=req.keep_alive, network=network.to_json(),
        )
        self._spawn(row.id, self._build(row.id, source, req.branch,
                                        devcontainer=req.devcontainer))
        return self.get(row.id)

    def _insert(self, user: User, name: str, *, message_prefix: str, **fields: Any
                ) -> Workspace:
        """Insert a workspace row in ``creating`` (limits and name checked, event recorded)."""
        ws_id = naming.new_workspace_id()
        with self.sessions.begin() as s:
            self.quotas.check_workspace(s, user, cpus=fields["cpus"],
                                        memory_mb=fields["memory_mb"], disk_gb=fields["disk_gb"])
            exists = s.scalar(
                select(Workspace.id).where(Workspace.owner_id == user.id, Workspace.name == name)
            )
            if exists is not None:
                raise Conflict(f"you already have a workspace named {name!r}",
                               code="name_taken")
            row = Workspace(
                id=ws_id, owner_id=user.id, name=name, pids_limit=self.settings.default_pids,
                state=State.CREATING.value,
                engine={
                    "container": naming.container_name(self.settings.engine_prefix, ws_id),
                    "volume": naming.volume_name(self.settings.engine_prefix, ws_id),
                },
                **fields,
            )
            s.add(row)
            s.flush()
            self.gpus.on_transition(s, ws_id, None, State.CREATING)
            self._record(s, ws_id, kind="state", actor=user.name,
                         message=f"{message_prefix} {row.repo_url}", dst=State.CREATING)
        log.info("workspace %s: creating %r for %s (%s %s)", ws_id, name, user.name,
                 message_prefix, row.repo_url)
        return row

    def _spawn(self, ws_id: str, work: Coroutine[Any, Any, None]) -> None:
        """Run a workspace's build in the background; delete cancels it."""
        task = asyncio.create_task(work, name=f"build-{ws_id}")
        self._tasks[ws_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(ws_id, None))

    async def create_fork(self, user: User, name: str, snap: Snapshot) -> Workspace:
        """A new, independent workspace from a snapshot: its disk (container filesystem and
        /workspace) is a copy of the snapshot's."""
        if (problem := naming.validate_name(name)) is not None:
            raise ValidationFailed(problem)
        # The policy of now, not of when the snapshot was taken (a runc snapshot after the
        # operator turned runc off must not run unsandboxed).
        runtime = self._validate_runtime(snap.runtime)
        row = self._insert(
            user, name, message_prefix=f"fork of snapshot {snap.id} ({snap.name}) of",
            repo_url=snap.repo_url, repo_branch=snap.repo_branch, repo_dir=snap.repo_dir,
            image=snap.image, runtime=runtime, cpus=self.settings.default_cpus,
            memory_mb=self.settings.default_memory_mb, disk_gb=self._forked_disk_gb(snap),
            gpus=0, env={}, network=self._forked_network(snap).to_json(),
        )
        self._spawn(row.id, self._build_fork(row.id, snap))
        return self.get(row.id)

    def _forked_disk_gb(self, snap: Snapshot) -> int:
        """The origin's disk while it exists (else the default), and room for the snapshot."""
        base = self.settings.default_disk_gb
        if snap.workspace_id is not None:
            with self.sessions() as s:
                origin = s.get(Workspace, snap.workspace_id)
                base = origin.disk_gb if origin is not None else base
        return min(max(base, -(-snap.size_bytes // 1024**3)), self.settings.max_disk_gb)

    async def _build_fork(self, ws_id: str, snap: Snapshot) -> None:
        spec = self.spec_for(self.get(ws_id))
        try:
            async with self.metrics.operation("fork"), self.locked(ws_id):
                await self.runtime.load_snapshot(spec, self.snapshot_spec(snap))
                how = await self._boot_from(spec, snap)
                await self.sync_network(ws_id)
                self._transition(ws_id, State.CREATING, State.RUNNING, actor="system",
                                 message=f"running from snapshot {snap.id} ({how})")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._creation_failed(ws_id, spec, exc)

    async def _creation_failed(self, ws_id: str, spec: WorkspaceSpec, exc: Exception) -> None:
        """Remove what a failed create or fork made; the row goes to ``error`` with why."""
        reason = exc.message if isinstance(exc, DenError) else "internal error while creating"
        if not isinstance(exc, DenError):
            log.error("workspace %s: create failed", ws_id, exc_info=exc)
        else:
            log.warning("workspace %s: create failed: %s %s", ws_id, reason, exc.detail)
        with contextlib.suppress(Exception):
            await self.runtime.destroy(spec)
        with contextlib.suppress(Conflict):
            self._transition(ws_id, State.CREATING, State.ERROR, actor="system", reason=reason)

    # --- snapshots: the state-changing part (server/snapshots/ owns the rest) ----------

    def snapshot_spec(self, snap: Snapshot) -> SnapshotSpec:
        return SnapshotSpec(
            snapshot_id=snap.id, image=snap.image, volume=snap.volume,
            labels={LABEL_MANAGED: "true", LABEL_INSTANCE: self.instance_id,
                    LABEL_SNAPSHOT: snap.id},
        )

    async def restore_snapshot(self, ws_id: str, snap: Snapshot, *, actor: str) -> Workspace:
        """Roll the workspace back to ``snap``: stop it, replace its container filesystem and
        /workspace with the snapshot's, start it. A workspace in ``error`` (a failed
        restore, say) can be restored too.

        Atomic: the snapshot is copied into a new volume while the workspace keeps its own;
        only once the copy is complete does the row switch to it (one transaction, with its
        event), and then the container is recreated on it and the old volume removed. The
        row's engine handle says a restore is in progress (``restoring``), so that reconcile
        after a crash knows which half it was in: before the switch it removes the partial
        copy and the workspace is as it was; after it, it finishes the restore."""
        if self.get(ws_id).state != State.ERROR.value:
            await self.stop(ws_id, actor=actor)
        async with self.metrics.operation("restore"), self.locked(ws_id):
            ws = self.get(ws_id)
            if ws.state not in (State.STOPPED.value, State.ERROR.value):
                raise Conflict(f"workspace is {ws.state}; try again")
            was = State(ws.state)
            old = self.spec_for(ws)
            volume = naming.restore_volume_name(self.settings.engine_prefix, ws_id)
            self._transition(ws_id, was, State.STARTING, actor=actor,
                             message=f"restore snapshot {snap.id} ({snap.name})")
            self._set_engine(ws_id, {**ws.engine, RESTORING: {
                "snapshot": snap.id, "volume": volume, "old_volume": old.volume_name,
                "from": was.value, "reason": ws.state_reason}})
            try:
                await self.runtime.copy_snapshot(old, self.snapshot_spec(snap), volume=volume)
            except DenError as exc:
                with contextlib.suppress(DenError):
                    await self.runtime.remove_object(EngineObject("volume", volume, ws_id))
                self._set_engine(ws_id, _without_restore(self.get(ws_id).engine))
                why = (f"restore of snapshot {snap.id} failed ({exc.message}); the workspace "
                       "is as it was")
                self._transition(ws_id, State.STARTING, was, actor=actor, message=why,
                                 reason=ws.state_reason if was is State.ERROR else "")
                raise
            self._switch_volume(ws_id, snap, volume, actor=actor)
            faults.point("restore.swap")
            spec = self.spec_for(self.get(ws_id))
            try:
                await self.runtime.replace_container(spec, old_volume=old.volume_name)
                self._set_engine(ws_id, _without_restore(self.get(ws_id).engine))
                how = await self._boot_from(spec, snap)
                await self.sync_network(ws_id)
            except DenError as exc:
                self._transition(ws_id, State.STARTING, State.ERROR, actor=actor,
                                 reason=f"restore of snapshot {snap.id} failed: {exc.message}; "
                                        "restore it again")
                raise
            self._transition(ws_id, State.STARTING, State.RUNNING, actor=actor,
                             message=f"restored snapshot {snap.id} ({snap.name}; {how})")
            return self.get(ws_id)

    def _set_engine(self, ws_id: str, engine: dict[str, Any]) -> None:
        """Persist the workspace's engine handle (no state change)."""
        with self.sessions.begin() as s:
            s.execute(update(Workspace).where(Workspace.id == ws_id).values(engine=engine))

    def _switch_volume(self, ws_id: str, snap: Snapshot, volume: str, *, actor: str) -> None:
        """The commit point of a restore: the workspace's data is now the complete copy in
        ``volume`` (and its image the snapshot's), with the event saying so."""
        with self.sessions.begin() as s:
            ws = s.get(Workspace, ws_id)
            if ws is None:
                raise NotFound(f"no workspace {ws_id!r}")
            ws.engine = {**ws.engine, "volume": volume}
            ws.image = snap.image
            self._record(s, ws_id, kind="restore", actor=actor,
                         message=f"the copy of snapshot {snap.id} is complete; the workspace "
                                 f"now uses it (volume {volume})")

    def snapshot_memory_dir(self, snapshot_id: str) -> Path:
        """Where a memory snapshot's checkpoint is kept on the host (under a 0700 directory:
        it is the workspace's memory, unencrypted)."""
        root = self.settings.data_dir / "snapshots"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return root / snapshot_id

    async def _boot_from(self, spec: WorkspaceSpec, snap: Snapshot) -> str:
        """Start a container just loaded from ``snap``: from its saved memory when it has
        some (processes running), else, or when that fails, cold from its disk."""
        if snap.memory:
            try:
                await self.runtime.import_checkpoint(
                    spec, checkpoint=CHECKPOINT, src=self.snapshot_memory_dir(snap.id))
                await self.runtime.resume(spec, checkpoint=CHECKPOINT)
                return "with its memory and processes"
            except DenError as exc:
                log.warning("workspace %s: memory of snapshot %s not restored: %s %s",
                            spec.workspace_id, snap.id, exc.message, exc.detail)
                await self.runtime.start(spec)
                return f"memory not restored ({exc.message}); started cold from disk"
        await self.runtime.start(spec)
        return "started from disk"

    def _validate_runtime(self, runtime: str | None) -> str:
        runtime = runtime or "gvisor"
        if runtime not in RUNTIMES:
            raise ValidationFailed(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
        if runtime == "microvm":
            raise ValidationFailed("the microvm runtime is not available on this server yet")
        if runtime == "runc" and not self.settings.allow_insecure_runc:
            raise ValidationFailed(
                "runtime 'runc' is disabled: it runs workspaces without the gVisor sandbox "
                "(the operator can allow it with DEN_ALLOW_INSECURE_RUNC=true)"
            )
        return runtime

    async def _validate_image(self, image: str | None) -> str:
        image = image or self.settings.default_image
        image_policy.check(self.settings, image)
        if not await self.runtime.image_exists(image):
            raise ValidationFailed(
                f"image {image!r} is not built on this server (run `make images`)",
                code="image_missing",
            )
        return image

    def _validate_resources(self, req: CreateRequest) -> tuple[float, int, int]:
        st = self.settings
        cpus = st.default_cpus if req.cpus is None else req.cpus
        memory_mb = st.default_memory_mb if req.memory_mb is None else req.memory_mb
        disk_gb = st.default_disk_gb if req.disk_gb is None else req.disk_gb
        if not 0.1 <= cpus <= st.max_cpus:
            raise ValidationFailed(f"resources.cpus must be between 0.1 and {st.max_cpus:g}")
        if not 128 <= memory_mb <= st.max_memory_mb:
            raise ValidationFailed(
                f"resources.memory_mb must be between 128 and {st.max_memory_mb}"
            )
        if not 1 <= disk_gb <= st.max_disk_gb:
            raise ValidationFailed(f"resources.disk_gb must be between 1 and {st.max_disk_gb}")
        self.gpus.validate(req.gpus, req.gpu_model, max_gpus=st.max_gpus)
        return cpus, memory_mb, disk_gb

    async def _build(self, ws_id: str, source: git_clone.RepoSource, branch: str | None, *,
                     devcontainer: bool = True) -> None:
        """Clone, create the engine objects, start: ``creating`` -> ``running`` or ``error``."""
        ws = self.get(ws_id)
        spec = self.spec_for(ws)
        work = self._tmp / ws_id
        try:
            async with self.metrics.operation("create"), self.locked(ws_id):
                work.mkdir(parents=True, exist_ok=True)
                repo = work / "repo"
                tar = work / "seed.tar"
                head = await asyncio.to_thread(
                    git_clone.clone, source, branch=branch, dest=repo,
                    timeout_s=self.settings.clone_timeout_s,
                    max_bytes=self.settings.clone_max_mb * 1024 * 1024,
                    known_hosts=self.settings.data_dir / "ssh_known_hosts",
                    extra_env=self.clone_env(ws) if self.clone_env else None,
                    outbound=self.outbound,
                )
                if self.prepare_clone is not None:
                    await asyncio.to_thread(self.prepare_clone, ws, repo, head)
                await asyncio.to_thread(
                    git_clone.pack_for_workspace, repo, arcname=ws.repo_dir, out=tar
                )
                if head and not ws.repo_branch:
                    with self.sessions.begin() as s:
                        s.execute(update(Workspace).where(Workspace.id == ws_id)
                                  .values(repo_branch=head))
                self.note(ws_id, "clone", f"cloned {ws.repo_url} ({head or 'detached'})")
                faults.point("create.clone")
                setup = await self._devcontainer(ws, repo, work) if devcontainer else None
                spec = self.spec_for(self.get(ws_id)) if setup else spec
                await self.runtime.create(spec)
                await self.runtime.start(spec)
                await self.sync_network(ws_id)
                await self.runtime.seed(spec, tar)
                if setup is not None and self.devcontainers is not None:
                    await self.devcontainers.created(self.runtime, spec, setup,
                                                     note=self._noter(ws_id))
                self._transition(ws_id, State.CREATING, State.RUNNING, actor="system",
                                 message=f"running under {ws.runtime}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._creation_failed(ws_id, spec, exc)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _noter(self, ws_id: str) -> Callable[[str, str], None]:
        return lambda kind, message: self.note(ws_id, kind, message)

    async def _devcontainer(self, ws: Workspace, repo: Path, work: Path) -> Plan | None:
        """The plan of the clone's devcontainer.json (server/devcontainer/), written into the
        row (image, env, what later starts need, forwarded ports); None when it has none."""
        if self.devcontainers is None:
            if any(os.path.lexists(repo / c) for c in devc_source.CANDIDATES):
                raise ValidationFailed("this server's runtime cannot build devcontainer "
                                       "images; create the workspace with --no-devcontainer")
            return None
        made = await self.devcontainers.prepare(
            repo, repo_path=self.repo_path(ws), user_env=ws.env, work=work,
            resources=Resources(cpus=ws.cpus, memory_mb=ws.memory_mb, disk_gb=ws.disk_gb,
                                gpus=ws.gpus), note=self._noter(ws.id))
        if made is None:
            return None
        forwarded = devc_ports.rows(made.config,
                                    public_allowed=self.settings.preview_public_sharing)
        with self.sessions.begin() as s:
            s.execute(update(Workspace).where(Workspace.id == ws.id).values(
                image=made.image, env=limits.validate_env(dict(made.env)),
                devcontainer=made.stored))
            devc_ports.write(s, ws.id, forwarded)
            if forwarded:
                self._record(s, ws.id, kind="devcontainer", actor="system",
                             message=f"forwarded ports: {devc_ports.describe(forwarded)}")
        return made

    # --- network policy ---------------------------------------------------------------

    def validate_network(self, mode: str | None, allow: Sequence[str]) -> net_policy.NetworkPolicy:
        """A requested policy checked against the operator's ceiling (422/403)."""
        st = self.settings
        return net_policy.validate(
            mode or st.network_default_mode, list(allow), ceiling=st.network_max_mode,
            user_ranges=net_policy.parse_ranges(st.network_user_allow),
            operator=net_policy.parse_ranges(st.network_allow),
            domains=net_policy.user_domains(st))

    def network_policy(self, ws: Workspace) -> net_policy.NetworkPolicy:
        return net_policy.NetworkPolicy.from_json(ws.network,
                                                  default=self.settings.network_default_mode)

    def _forked_network(self, snap: Snapshot) -> net_policy.NetworkPolicy:
        """A fork gets its origin's policy (kept on the snapshot), within today's ceiling."""
        wanted = net_policy.NetworkPolicy.from_json(snap.network,
                                                    default=self.settings.network_default_mode)
        ceiling = self.settings.network_max_mode
        if net_policy.MODES.index(wanted.mode) > net_policy.MODES.index(ceiling):
            return net_policy.NetworkPolicy(mode=ceiling)
        return net_policy.within(wanted, net_policy.user_domains(self.settings))

    async def set_network(self, ws_id: str, mode: str, allow: Sequence[str], *, actor: str
                          ) -> Workspace:
        """Change a workspace's policy; a running one gets it at once, with its processes
        and connections as they are (a tighter policy cuts the connections it forbids)."""
        policy = self.validate_network(mode, allow)
        with self.sessions.begin() as s:
            res = s.execute(update(Workspace).where(Workspace.id == ws_id)
                            .values(network=policy.to_json(), updated_at=datetime.now(UTC)))
            if res.rowcount != 1:  # type: ignore[attr-defined]
                raise NotFound(f"no workspace {ws_id!r}")
            allowed = f" ({', '.join(str(e) for e in policy.allow)})" if policy.allow else ""
            self._record(s, ws_id, kind="network", actor=actor,
                         message=f"network policy set to {policy.mode}{allowed}")
        if self.network is not None:
            await self.network.sync(self.network_policies)
        return self.get(ws_id)

    def network_policies(self) -> dict[str, net_policy.NetworkPolicy]:
        with self.sessions() as s:
            rows = list(s.scalars(select(Workspace)))
        self._containers = {self.spec_for(ws).container_name: ws.id for ws in rows}
        return {self.spec_for(ws).container_name: self.network_policy(ws) for ws in rows}

    def record_denial(self, denial: Denial) -> None:
        """A connection the firewall refused: an event of kind ``network`` on the workspace
        that tried (at most one per destination a minute)."""
        container = self.network.container_at(denial.source) if self.network else None
        ws_id = self._containers.get(container or "")
        if ws_id is None or not self._denials.allow(ws_id, denial.describe()):
            return
        try:
            mode = self.network_policy(self.get(ws_id)).mode
            self.note(ws_id, "network", f"denied {denial.describe()} (network policy {mode}; "
                                        "further denials of it are not recorded for a minute)")
        except (DenError, SQLAlchemyError):  # the workspace went meanwhile
            return

    async def sync_network(self, ws_id: str) -> None:
        """Bring the host's firewall in step after ``ws_id`` started, stopped or went.
        A failure leaves the workspace without network (unknown addresses are rejected)
        and is recorded."""
        if self.network is None:
            return
        try:
            await self.network.sync(self.network_policies)
        except DenError as exc:
            log.error("workspace %s: network rules not applied: %s %s", ws_id, exc.message,
                      exc.detail)
            with contextlib.suppress(SQLAlchemyError):
                self.note(ws_id, "network", f"network rules not applied: {exc.message}")

    # --- lifecycle --------------------------------------------------------------------

    async def start(self, ws_id: str, *, actor: str) -> Workspace:
        if self.get(ws_id).state == State.PAUSED.value:  # starting a paused one resumes it
            return await self.resume(ws_id, actor=actor)
        async with self.metrics.operation("start"), self.locked(ws_id):
            ws = self.get(ws_id)
            try:
                step = plan(START, State(ws.state))
            except ValueError as exc:
                raise Conflict(str(exc)) from exc
            if step is None:
                return ws
            src = State(ws.state)
            self._transition(ws_id, src, step, actor=actor)
            spec = self.spec_for(ws)
            try:
                if await self.runtime.status(spec) is ContainerStatus.MISSING:
                    raise ObjectMissing("the workspace's container is gone from the engine")
                await self.runtime.start(spec)
            except DenError as exc:
                self._transition(ws_id, step, State.ERROR, actor=actor,
                                 reason=f"start failed: {exc.message}")
                raise
            await self.sync_network(ws_id)
            self._transition(ws_id, step, State.RUNNING, actor=actor)
            await self._post_start(ws_id, spec, ws.devcontainer)
            return self.get(ws_id)

    async def _post_start(self, ws_id: str, spec: WorkspaceSpec, stored: dict[str, Any]
                          ) -> None:
        """The devcontainer's postStartCommand after a cold start; a failure is recorded
        (the workspace runs: its disk and tools are there)."""
        if self.devcontainers is None or not stored.get("post_start"):
            return
        try:
            await self.devcontainers.started(self.runtime, spec, stored, note=self._noter(ws_id))
        except DenError as exc:
            self.note(ws_id, "devcontainer", exc.message)

    async def stop(self, ws_id: str, *, actor: str) -> Workspace:
        async with self.metrics.operation("stop"), self.locked(ws_id):
            ws = self.get(ws_id)
            try:
                step = plan(STOP, State(ws.state))
            except ValueError as exc:
                raise Conflict(str(exc)) from exc
            if step is None:
                return ws
            was = State(ws.state)
            self._transition(ws_id, was, step, actor=actor)
            try:
                await self.runtime.stop(self.spec_for(ws), timeout_s=self.settings.stop_timeout_s)
                # Stop drops the memory (of a pause, or kept since the last resume).
                await self.runtime.delete_checkpoint(self.spec_for(ws), checkpoint=CHECKPOINT)
            except DenError as exc:
                self._transition(ws_id, step, State.ERROR, actor=actor,
                                 reason=f"stop failed: {exc.message}")
                raise
            self._transition(ws_id, step, State.STOPPED, actor=actor)
            await self.sync_network(ws_id)
            return self.get(ws_id)

    def _plan(self, op: Operation, ws: Workspace) -> State | None:
        try:
            return plan(op, State(ws.state))
        except ValueError as exc:
            raise Conflict(str(exc)) from exc

    async def pause(self, ws_id: str, *, actor: str) -> Workspace:
        """Checkpoint memory and processes and free CPU and RAM: ``running`` (or ``paused``
        frozen) -> ``paused`` saved. On failure the workspace is left running, frozen or
        stopped, and the event log says why."""
        async with self.metrics.operation("pause"), self.locked(ws_id):
            ws = self.get(ws_id)
            frozen = ws.state == State.PAUSED.value and ws.sleep == Sleep.FROZEN.value
            step = State.PAUSING if frozen else self._plan(PAUSE, ws)
            if step is None:
                return ws
            self.gpus.check_pause(ws)
            self._transition(ws_id, State(ws.state), step, actor=actor,
                             message="saving a frozen workspace's memory to disk"
                             if frozen else "")
            spec = self.spec_for(ws)
            started = time.monotonic()
            try:
                await self.runtime.pause(spec, checkpoint=CHECKPOINT)
            except DenError as exc:
                await self._sleep_failed(ws_id, spec, exc, actor=actor, what="pause")
                raise
            self._transition(ws_id, step, State.PAUSED, actor=actor,
                             message=f"memory saved in {time.monotonic() - started:.2f} s")
            await self.sync_network(ws_id)
            return self.get(ws_id)

    async def freeze(self, ws_id: str, *, actor: str) -> Workspace:
        """The light sleep tier (server/workspaces/sleep.py): ``running`` -> ``paused``
        frozen in place, CPU freed, memory kept. A runtime that cannot freeze saves the
        memory to disk instead (:meth:`pause`)."""
        # A GPU workspace is never frozen: its GPUs go back to the pool while it sleeps, and
        # a frozen process would still hold them.
        if not isinstance(self.runtime, Freezer) or self.get(ws_id).gpus:
            return await self.pause(ws_id, actor=actor)
        async with self.metrics.operation("freeze"), self.locked(ws_id):
            ws = self.get(ws_id)
            step = self._plan(PAUSE, ws)
            if step is None:
                return ws
            self._transition(ws_id, State.RUNNING, step, actor=actor)
            spec = self.spec_for(ws)
            started = time.monotonic()
            try:
                held = await self.runtime.freeze(spec)
            except DenError as exc:
                await self._sleep_failed(ws_id, spec, exc, actor=actor, what="freeze")
                raise
            self._set_engine(ws_id, {**ws.engine, FROZEN_BYTES: held})
            mib = "" if held is None else f", holding {held / 2**20:.0f} MiB"
            self._transition(ws_id, step, State.PAUSED, actor=actor, sleep=Sleep.FROZEN,
                             message=f"frozen in {time.monotonic() - started:.2f} s{mib}")
            return self.get(ws_id)

    async def _sleep_failed(self, ws_id: str, spec: WorkspaceSpec, exc: DenError, *,
                            actor: str, what: str) -> None:
        """A pause or freeze failed: the workspace is what its container is now."""
        status = ContainerStatus.MISSING
        with contextlib.suppress(DenError):
            status = await self.runtime.status(spec)
        dst = {ContainerStatus.RUNNING: State.RUNNING,
               ContainerStatus.FROZEN: State.PAUSED}.get(status, State.STOPPED)
        self._transition(ws_id, State.PAUSING, dst, actor=actor, sleep=Sleep.FROZEN,
                         message=f"{what} failed: {exc.message}; the workspace is "
                                 f"{'frozen' if dst is State.PAUSED else dst.value}")

    async def resume(self, ws_id: str, *, actor: str) -> Workspace:
        """Restore a paused workspace from its checkpoint; when that fails, start it cold
        from its disk (processes are lost, data is not) and say so in the event log.

        The checkpoint is kept after a restore: gVisor may still read memory from it (deleting
        it at once loses processes, measured). The next pause replaces it, a stop removes it:
        a workspace has at most one."""
        async with self.metrics.operation("resume"), self.locked(ws_id):
            ws = self.get(ws_id)
            step = self._plan(RESUME, ws)
            if step is None:
                return ws
            frozen = ws.sleep == Sleep.FROZEN.value
            self._transition(ws_id, State.PAUSED, step, actor=actor)
            spec = self.spec_for(ws)
            started = time.monotonic()
            thawed = False  # in place: the container kept its address, the firewall its rules
            try:
                if frozen and isinstance(self.runtime, Freezer):
                    await self.runtime.thaw(spec)
                    thawed = True
                    message = f"thawed in {time.monotonic() - started:.3f} s (frozen tier)"
                else:
                    await self.runtime.resume(spec, checkpoint=CHECKPOINT)
                    message = f"restored from memory in {time.monotonic() - started:.2f} s"
            except DenError as exc:
                log.warning("workspace %s: restore failed: %s %s", ws_id, exc.message,
                            exc.detail)
                try:
                    await self.runtime.start(spec)
                except DenError as cold:
                    self._transition(ws_id, step, State.ERROR, actor=actor,
                                     reason=f"restore failed ({exc.message}) and so did a cold "
                                            f"start ({cold.message})")
                    raise
                message = (f"{'thaw' if frozen else 'restore from memory'} failed "
                           f"({exc.message}); started cold from disk: files are kept, running "
                           "processes were not")
            if not thawed:
                await self.sync_network(ws_id)
            self._transition(ws_id, step, State.RUNNING, actor=actor, message=message)
            return self.get(ws_id)

    async def delete(self, ws_id: str, *, actor: str) -> bool:
        """Delete a workspace, its container and its volume. False when a delete of it is
        already in progress (the caller answers 202)."""
        task = self._tasks.get(ws_id)
        if task is not None:  # cancel an unfinished create
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        async with self.metrics.operation("delete"), self.locked(ws_id):
            ws = self.get(ws_id)
            if ws.state == State.DELETING.value:
                return False
            self._transition(ws_id, State(ws.state), State.DELETING, actor=actor)
            await self._finish_delete(ws, actor=actor)
        self._locks.pop(ws_id, None)
        return True

    async def _finish_delete(self, ws: Workspace, *, actor: str) -> None:
        try:
            await self.runtime.destroy(self.spec_for(ws))
        except DenError as exc:
            self._transition(ws.id, State.DELETING, State.ERROR, actor=actor,
                             reason=f"delete failed: {exc.message}; delete again to retry")
            raise
        with self.sessions.begin() as s:
            s.execute(delete(Event).where(Event.workspace_id == ws.id))
            s.execute(delete(Workspace).where(Workspace.id == ws.id))
        self.feed.changed(ws.id)
        self.metrics.forget_workspace(ws.id)
        await self.sync_network(ws.id)
        for hook in self.deleted_hooks:
            hook(ws.id)
        log.info("workspace %s: deleted by %s", ws.id, actor)

    async def ensure_running(self, ws_id: str, *, actor: str) -> Workspace:
        """The workspace, running: a paused one is resumed and a stopped one started (wake
        on access). Concurrent callers share one wake: the later ones wait for it."""
        ws = self.get(ws_id)
        state = State(ws.state)
        if state in (State.RESUMING, State.STARTING, State.PAUSING, State.STOPPING):
            async with self.locked(ws_id):  # wait for the operation in progress
                ws = self.get(ws_id)
                state = State(ws.state)
        if state is State.RUNNING:
            return ws
        if state is State.PAUSED:
            self.note(ws_id, "wake", "resumed on access", actor=actor)
            return await self.resume(ws_id, actor=actor)
        if state is State.STOPPED:
            self.note(ws_id, "wake", "started on access", actor=actor)
            return await self.start(ws_id, actor=actor)
        if state in TRANSITIONAL:
            raise Conflict(f"workspace is {state.value}; try again when it is running")
        raise Conflict(f"workspace is {state.value}: {ws.state_reason or 'start it first'}")

    # --- processes --------------------------------------------------------------------

    def exec_request(self, ws: Workspace, cmd: str | Sequence[str], *, cwd: str | None = None,
                     env: dict[str, str] | None = None, timeout_s: float | None = None,
                     stdin: bytes | None = None, user: str = "dev") -> ExecRequest:
        """Build the request for ``cmd`` (argv list, or a string run by bash)."""
        if isinstance(cmd, str):
            if not cmd.strip():
                raise ValidationFailed("cmd is empty")
            argv: list[str] = ["bash", "-c", cmd]
        else:
            argv = list(cmd)
            if not argv or not argv[0]:
                raise ValidationFailed("cmd is empty")
        if any("\x00" in a for a in argv):
            raise ValidationFailed("cmd contains a NUL byte")
        if cwd is not None:
            limits.check_path(cwd, what="cwd")
        env = limits.validate_env(env or {})
        limits.check_command(argv, {**ws.env, **env})
        timeout = self.settings.exec_default_timeout_s if timeout_s is None else timeout_s
        if not 0 < timeout <= self.settings.exec_max_timeout_s:
            raise ValidationFailed(
                f"timeout_s must be between 0 and {self.settings.exec_max_timeout_s:g}"
            )
        return ExecRequest(
            argv=argv,
            user=user,
            cwd=posixpath.normpath(posixpath.join(self.repo_path(ws), cwd or ".")),
            env=env,
            stdin=stdin,
            timeout_s=timeout,
            max_output_bytes=self.settings.exec_max_output_bytes,
        )

    def shell_request(self, ws: Workspace, command: str | None = None, *, tty: bool,
                      size: tuple[int, int] | None = None,
                      env: dict[str, str] | None = None) -> ExecRequest:
        """A login shell as dev in the repo directory, or ``command`` run by one, with no
        deadline: what SSH sessions and the web terminal run. ``size`` is (columns, rows)."""
        argv = login_shell_argv(command)
        if command is not None and "\x00" in command:
            raise ValidationFailed("the command contains a NUL byte")
        env = limits.validate_env(env or {})
        limits.check_command(argv, {**ws.env, **env})
        return ExecRequest(argv=argv, user="dev", cwd=self.repo_path(ws), env=env, tty=tty,
                           size=size,
                           max_output_bytes=self.settings.exec_max_output_bytes)

    async def exec(self, ws_id: str, req: ExecRequest, *, actor: str) -> ExecResult:
        """Run ``req`` in the workspace (woken first). A long call (not ``req.short``) is
        admitted through :attr:`long_calls`: it waits for a slot, or is refused with 503
        ``overloaded`` when the queue is full."""
        started = time.monotonic()
        try:
            admitted = contextlib.nullcontext() if req.short else self.long_calls.enter()
            async with admitted:
                result = await self._exec(ws_id, req, actor=actor)
        except BaseException as exc:
            self.metrics.exec_failed(time.monotonic() - started, exc, short=req.short)
            raise
        self.metrics.exec_done(time.monotonic() - started, short=req.short,
                               timed_out=result.timed_out)
        return result

    async def _exec(self, ws_id: str, req: ExecRequest, *, actor: str) -> ExecResult:
        ws = await self.ensure_running(ws_id, actor=actor)
        spec = self.spec_for(ws)
        try:  # while it runs, the activity hold keeps the workspace from looking idle
            for attempt in (1, 2):
                try:
                    async with self.activity.hold(ws_id):
                        return await self.runtime.exec(spec, req)
                except EngineConflict as exc:
                    died = await self._check_alive(ws_id, spec, actor=actor)
                    if died and attempt == 1:  # the sandbox died under us: start it, retry
                        await self.ensure_running(ws_id, actor=actor)
                        continue
                    raise Conflict(f"the command could not be started: {exc.message}",
                                   code="exec_failed") from exc
                except DenError:
                    await self._check_alive(ws_id, spec, actor=actor)
                    raise
            raise AssertionError("unreachable")
        finally:
            self.touch(ws_id)

    async def _check_alive(self, ws_id: str, spec: WorkspaceSpec, *, actor: str) -> bool:
        """After a failed exec: record a workspace whose sandbox died (out of memory, most
        often) as stopped, so that the next access starts it again. True when it did."""
        with contextlib.suppress(DenError):
            if (await self.runtime.status(spec)).alive:
                return False
            try:
                self._transition(ws_id, State.RUNNING, State.STOPPED, actor=actor,
                                 message="the workspace's sandbox exited unexpectedly "
                                         "(out of memory?); it starts again on the next access")
            except Conflict:  # the engine's event stream recorded it first
                return self.get(ws_id).state == State.STOPPED.value
            return True
        return False

    async def keepalive(self, ws_id: str, ttl_s: int, *, actor: str) -> Workspace:
        """A lease keeping the workspace awake for ``ttl_s`` seconds (0 ends it); wakes it."""
        if not 0 <= ttl_s <= self.settings.max_keepalive_s:
            raise ValidationFailed(
                f"ttl_s must be between 0 and {self.settings.max_keepalive_s}"
            )
        await self.ensure_running(ws_id, actor=actor)
        now = datetime.now(UTC)
        with self.sessions.begin() as s:
            s.execute(update(Workspace).where(Workspace.id == ws_id).values(
                keepalive_until=now + timedelta(seconds=ttl_s) if ttl_s else None,
                last_activity_at=now))
        return self.get(ws_id)

    async def exec_stream(self, ws_id: str, req: ExecRequest, *, actor: str) -> ExecStream:
        ws = await self.ensure_running(ws_id, actor=actor)
        self.touch(ws_id)
        return await self.runtime.exec_stream(self.spec_for(ws), req)

    async def connect_port(self, ws_id: str, host: str, port: int, *, actor: str
                           ) -> ExecStream | None:
        """A TCP connection to ``host:port`` on the workspace's own loopback (``ssh -L``),
        made by the workspace's agent; None when the workspace has none (the caller relays
        through exec then)."""
        ws = await self.ensure_running(ws_id, actor=actor)
        self.touch(ws_id)
        if not isinstance(self.runtime, PortConnector):
            return None
        return await self.runtime.connect(self.spec_for(ws), host, port)

    # --- the engine's events ----------------------------------------------------------

    async def apply_engine_event(self, event: EngineEvent) -> None:
        """Follow what the engine says happened to a workspace's container (a container
        that died, was OOM-killed, or was started from outside Den), so that the state
        matches the engine within seconds and the event log says why. Ignored: events of
        another container than the workspace's current one, workspaces with an operation of
        Den's own in progress (its pause or stop is what made the container exit; that
        operation settles the state), and anything the engine's current status contradicts
        (events may come late or twice)."""
        ws_id = event.workspace_id
        if event.kind is EngineEventKind.OOM:
            before = self._oom.pop(ws_id, None)
            if len(self._oom) >= OOM_MEMORY:  # bounded: the oldest goes
                self._oom.pop(next(iter(self._oom)))
            self._oom[ws_id] = now = time.monotonic()
            if before is None or now - before >= OOM_MEMORY_S:  # one note a minute at most
                self._note_oom(ws_id)
            return
        if event.kind not in (EngineEventKind.DIE, EngineEventKind.START) or self._busy(ws_id):
            return
        await self.sync_network(ws_id)  # the container's address came or went
        async with self.locked(ws_id):
            with self.sessions() as s:
                ws = s.get(Workspace, ws_id)
            if ws is None:
                return
            spec = self.spec_for(ws)
            if event.container != spec.container_name:
                return
            state = State(ws.state)
            frozen = state is State.PAUSED and ws.sleep == Sleep.FROZEN.value
            if event.kind is EngineEventKind.DIE and (state is State.RUNNING or frozen):
                if (await self.runtime.status(spec)).alive:
                    return  # an older container's death, or restarted since
                oom_at = self._oom.pop(ws_id, None)
                oom = oom_at is not None and time.monotonic() - oom_at < OOM_MEMORY_S
                self._transition(ws_id, state, State.STOPPED, actor="engine",
                                 message=f"the container exited "
                                         f"({describe_exit(event.exit_code, oom=oom)}); "
                                         "it starts again on the next access")
            elif event.kind is EngineEventKind.START and state in (State.STOPPED,
                                                                    State.PAUSED):
                if await self.runtime.status(spec) is not ContainerStatus.RUNNING:
                    return
                if state is State.PAUSED:
                    self._transition(ws_id, state, State.RESUMING, actor="engine")
                    state = State.RESUMING
                self._transition(ws_id, state, State.RUNNING, actor="engine",
                                 message="the container was started outside Den")

    def _note_oom(self, ws_id: str) -> None:
        """The host's OOM killer hit the sandbox. Under gVisor it usually ends one process of
        the workspace and the sandbox lives on (the engine sends no "die"), so the event log
        is the only place that says why that process vanished."""
        with self.sessions() as s:
            ws = s.get(Workspace, ws_id)
        if ws is None:
            return
        self.note(ws_id, "oom", f"the workspace reached its memory limit ({ws.memory_mb} MB "
                  "plus the sandbox's headroom): the host's out-of-memory killer ended a "
                  "process", actor="engine")

    # --- reconcile --------------------------------------------------------------------

    def remove_leftovers(self) -> None:
        """At startup, before anything runs: the build directories and the saved memory of
        snapshots without a row that a previous run left (it stopped while making them)."""
        shutil.rmtree(self._tmp, ignore_errors=True)
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
        objects = await self.runtime.list_objects(self.instance_id)  # before the rows: an
        with self.sessions() as s:  # object made meanwhile then has its row
            rows = list(s.scalars(select(Workspace)))
            snapshots = set(s.scalars(select(Snapshot.id)))
        for obj in objects:
            if obj.role == ROLE_COPY and not self._busy(obj.workspace_id):
                log.warning("reconcile: removing copy helper %s of workspace %s left by a "
                            "restart", obj.name, obj.workspace_id or "?")
                await self.runtime.remove_object(obj)
        for ws in rows:
            if self._busy(ws.id):
                continue
            try:
                async with self.locked(ws.id):
                    with self.sessions() as s:
                        current = s.get(Workspace, ws.id)
                    if current is not None:
                        await self._reconcile_one(current)
            except DenError as exc:
                log.error("reconcile of workspace %s failed: %s %s", ws.id, exc.message,
                          exc.detail)
        with self.sessions() as s:
            volumes = {ws.id: self.spec_for(ws).volume_name
                       for ws in s.scalars(select(Workspace))}
        for obj in objects:
            if obj.role == ROLE_COPY:
                continue
            if obj.snapshot_id and obj.snapshot_id in snapshots:
                continue
            if obj.workspace_id in volumes and not obj.snapshot_id and (
                    obj.kind != "volume" or obj.name == volumes[obj.workspace_id]):
                continue
            if obj.workspace_id and self._busy(obj.workspace_id):
                continue  # a snapshot, fork or restore in progress
            log.warning("reconcile: removing orphan %s %s", obj.kind, obj.name)
            await self.runtime.remove_object(obj)
        if self.network is not None:
            await self.network.sync(self.network_policies)

    def _busy(self, workspace_id: str) -> bool:
        """Whether an operation on the workspace is in progress in this process."""
        lock = self._locks.get(workspace_id)
        return workspace_id in self._tasks or (lock is not None and lock.locked())

    async def _reconcile_one(self, ws: Workspace) -> None:
        spec = self.spec_for(ws)
        state = State(ws.state)
        status = await self.runtime.status(spec)
        actor = "reconcile"
        if state is State.CREATING:
            left = ""
            try:
                await self.runtime.destroy(spec)
            except DenError as exc:  # the row must not stay "creating": say what remains
                left = f"; its engine objects could not all be removed ({exc.message})"
            self._transition(ws.id, state, State.ERROR, actor=actor,
                             reason="Den restarted while this workspace was being created"
                                    f"{left}; delete it and create it again")
        elif state is State.DELETING:
            await self._finish_delete(ws, actor=actor)
        elif state is State.STARTING and RESTORING in ws.engine:
            await self._reconcile_restore(ws)
        elif state is State.PAUSING and status is not ContainerStatus.MISSING:
            await self._reconcile_pause(ws, spec)
        elif state is State.RESUMING and status is not ContainerStatus.MISSING:
            # Its checkpoint is kept (or it started cold); resume falls back to a cold
            # start when it is missing, so "paused" is always safe. A wake from the frozen
            # tier cut short before the thaw: still frozen, and recorded so.
            dst = State.RUNNING if status is ContainerStatus.RUNNING else State.PAUSED
            self._transition(ws.id, state, dst, actor=actor,
                             sleep=Sleep.FROZEN if status is ContainerStatus.FROZEN
                             else Sleep.SAVED,
                             message=f"{state.value} was interrupted by a restart")
        elif (state is State.PAUSED and ws.sleep == Sleep.FROZEN.value
              and status is ContainerStatus.FROZEN and isinstance(self.runtime, Freezer)):
            await self.runtime.freeze(spec)  # idempotent; a thaw cut short left it half-frozen
        elif (state is State.PAUSED and ws.sleep == Sleep.FROZEN.value
              and status is ContainerStatus.STOPPED):
            self._transition(ws.id, state, State.STOPPED, actor=actor,
                             message="the frozen workspace's container exited meanwhile: "
                                     "running processes were lost, files are kept; it starts "
                                     "on the next access")
        elif state is State.RUNNING and status is ContainerStatus.FROZEN:
            if isinstance(self.runtime, Freezer):  # frozen from outside Den: it must answer
                await self.runtime.thaw(spec)
                self.note(ws.id, "reconcile", "found frozen in the engine; thawed")
        elif state is State.PAUSED and status is ContainerStatus.RUNNING:
            self._transition(ws.id, state, State.RESUMING, actor=actor)
            self._transition(ws.id, State.RESUMING, State.RUNNING, actor=actor,
                             message="found running in the engine")
        elif state is State.STARTING and status is not ContainerStatus.MISSING:
            if status is ContainerStatus.RUNNING:
                self._transition(ws.id, state, State.RUNNING, actor=actor)
            else:
                self._transition(ws.id, state, State.STOPPED, actor=actor,
                                 message="start was interrupted by a restart")
        elif state is State.STOPPING and status is not ContainerStatus.MISSING:
            await self.runtime.stop(spec, timeout_s=self.settings.stop_timeout_s)
            self._transition(ws.id, state, State.STOPPED, actor=actor,
                             message="finished a stop interrupted by a restart")
        elif status is ContainerStatus.MISSING and state is not State.ERROR:
            self._transition(ws.id, state, State.ERROR, actor=actor,
                             reason="the workspace's container is gone from the engine; "
                                    "its data volume may remain; delete the workspace")
        elif state is State.RUNNING and status is ContainerStatus.STOPPED:
            self._transition(ws.id, state, State.STOPPED, actor=actor,
                             message="found stopped in the engine")
        elif state is State.STOPPED and status is ContainerStatus.RUNNING:
            self._transition(ws.id, state, State.RUNNING, actor=actor,
                             message="found running in the engine")

    async def _reconcile_restore(self, ws: Workspace) -> None:
        """A restore cut short by a crash: before its commit point (the row still names the
        old volume) the workspace is exactly as it was and the partial copy goes; after it,
        the restore is finished (container recreated on the copy, old volume removed) and the
        workspace is left stopped (the next access starts it)."""
        pending = dict(ws.engine[RESTORING])
        spec = self.spec_for(ws)
        what = f"restore of snapshot {pending.get('snapshot', '?')}"
        was = State(str(pending.get("from") or State.STOPPED.value))
        if spec.volume_name != pending.get("volume"):
            await self.runtime.remove_object(
                EngineObject("volume", str(pending.get("volume")), ws.id))
            self._set_engine(ws.id, _without_restore(ws.engine))
            self._transition(ws.id, State.STARTING, was, actor="reconcile",
                             message=f"{what} was interrupted by a restart before its copy was "
                                     "complete; the partial copy is removed and the workspace "
                                     "is exactly as it was",
                             reason=str(pending.get("reason") or "")
                             if was is State.ERROR else "")
            return
        await self.runtime.replace_container(
            spec, old_volume=str(pending.get("old_volume") or spec.volume_name))
        self._set_engine(ws.id, _without_restore(ws.engine))
        self._transition(ws.id, State.STARTING, State.STOPPED, actor="reconcile",
                         message=f"{what} was interrupted by a restart after its copy was "
                                 "complete; it is finished now (files restored; memory not): "
                                 "the workspace starts on the next access")

    async def _reconcile_pause(self, ws: Workspace, spec: WorkspaceSpec) -> None:
        """A pause cut short by a crash: its checkpoint may still be being written (runsc
        outlives Den). Wait for it, bounded; a complete one makes the workspace paused, an
        incomplete one is removed and the workspace is what its container is."""
        saved = await self.runtime.settle_checkpoint(spec, checkpoint=CHECKPOINT,
                                                     wait_s=CHECKPOINT_SETTLE_S)
        status = await self.runtime.status(spec)
        if status is ContainerStatus.FROZEN:  # a freeze (or a save of a frozen one) cut short
            self._transition(ws.id, State.PAUSING, State.PAUSED, actor="reconcile",
                             sleep=Sleep.FROZEN,
                             message="pause was interrupted by a restart; the workspace is "
                                     "frozen in place, memory and processes kept")
        elif saved and status is not ContainerStatus.RUNNING:
            self._transition(ws.id, State.PAUSING, State.PAUSED, actor="reconcile",
                             message="pause was interrupted by a restart; its checkpoint was "
                                     "complete: memory and processes are saved")
        elif status is ContainerStatus.RUNNING:
            self._transition(ws.id, State.PAUSING, State.RUNNING, actor="reconcile",
                             message="pause was interrupted by a restart before its "
                                     "checkpoint was made; the workspace kept running")
        else:
            self._transition(ws.id, State.PAUSING, State.STOPPED, actor="reconcile",
                             message="pause was interrupted by a restart and its checkpoint "
                                     "was incomplete (removed): running processes were lost, "
                                     "files are kept; it starts on the next access")

    async def shutdown(self) -> None:
        """Cancel unfinished background work; reconcile cleans up at the next start."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t


def _without_restore(engine: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in engine.items() if k != RESTORING}


def describe_exit(code: int | None, *, oom: bool) -> str:
    """Why a container exited, for the event log: "code 137, out of memory"."""
    if code is None:
        return "out of memory" if oom else "exit code unknown"
    if oom:
        return f"code {code}, out of memory"
    if code > 128 and code - 128 in SIGNAL_NAMES:
        return f"code {code}, killed by {SIGNAL_NAMES[code - 128]}"
    return f"code {code}"


SIGNAL_NAMES = {1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 9: "SIGKILL", 11: "SIGSEGV",
                15: "SIGTERM"}


def path_in_workspace(path: str) -> str:
    """Normalise a user path to an absolute one under /workspace; Forbidden when it leaves."""
    limits.check_path(path, what="path")
    joined = posixpath.normpath(posixpath.join(WORKSPACE_ROOT, path or "."))
    if joined != WORKSPACE_ROOT and not joined.startswith(WORKSPACE_ROOT + "/"):
        raise Forbidden(f"path {path!r} is outside /workspace", code="path_outside")
    return joined

