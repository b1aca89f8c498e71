"""The workspace service: what the API, SSH and the web do to workspaces (create, start, stop,
pause, resume, delete, exec) and the only caller of the runtime's lifecycle methods.

It decides; the ledger (server/workspaces/ledger.py) writes: every state change is a
:meth:`~server.workspaces.ledger.Ledger.transition`. The rest of the package does one thing
each, for the service: validation.py checks create requests, restore.py forks and restores
from snapshots, networking.py keeps the host's firewall in step with network policies,
reconcile.py settles rows and engine objects after a crash or an engine outage, and
engine_events.py follows what the engine says happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import posixpath
import shutil
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Select, delete, select
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
from server.network.guard import NetworkGuard
from server.outbound import OutboundPolicy, git_pin
from server.pool import fit as pool_fit
from server.pool.claim import PendingClaim
from server.pool.warm import Pooled, WarmPool
from server.quotas.service import Quotas
from server.runtime import inflight
from server.runtime.base import (
    AgentChannel,
    Checkpoints,
    ContainerStatus,
    EngineEvent,
    ExecRequest,
    ExecResult,
    ExecStream,
    Freezer,
    ManagedNetwork,
    PortConnector,
    Runtime,
    WorkspaceSpec,
    labels_for,
)
from server.runtime.errors import EngineConflict, ObjectMissing
from server.tasks import cancel_and_wait
from server.workspaces import hooks, limits, listing, memory_guard, naming, validation
from server.workspaces.activity import Activity
from server.workspaces.admission import Gate
from server.workspaces.builds import Builds
from server.workspaces.engine_events import EngineFollower
from server.workspaces.feed import EventFeed
from server.workspaces.handles import CHECKPOINT, FROZEN_BYTES, backend_handle
from server.workspaces.hooks import WorkspaceHooks
from server.workspaces.ledger import Ledger
from server.workspaces.networking import WorkspaceNetworks
from server.workspaces.prebuild_seam import PrebuildFinder
from server.workspaces.reconcile import Reconciler
from server.workspaces.restore import Restores
from server.workspaces.states import (
    PAUSE,
    RESUME,
    START,
    STOP,
    TRANSITIONAL,
    Operation,
    Sleep,
    State,
    plan,
)

log = logging.getLogger(__name__)

WORKSPACE_ROOT = "/workspace"


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
    prebuild: bool = True  # fork from the owner's prebuild of the repo and branch, if ready
    for_prebuild: str | None = None  # the prebuild this workspace is made for: not listed


# bash when the image has it, else sh: any image works (one sh more per session, ~20 ms).
_LOGIN_SHELL = ('if command -v bash >/dev/null 2>&1; then exec bash -l "$@"; '
                'else exec sh -l "$@"; fi')


def login_shell_argv(command: str | None) -> list[str]:
    """A login shell, or one running ``command``."""
    extra = [] if command is None else ["-c", command]
    return ["/bin/sh", "-c", _LOGIN_SHELL, "den-shell", *extra]


def check_name_free(s: Session, owner_id: int, name: str, *, besides: str | None = None
                    ) -> None:
    """Refuse (409 ``name_taken``) a name the owner already gives a workspace other than
    ``besides``; called inside the transaction that writes the name."""
    query = select(Workspace.id).where(Workspace.owner_id == owner_id, Workspace.name == name)
    if besides is not None:
        query = query.where(Workspace.id != besides)
    if s.scalar(query) is not None:
        raise Conflict(f"you already have a workspace named {name!r}", code="name_taken")


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
        pool: WarmPool | None = None,
    ) -> None:
        self.settings = settings
        # Sandboxes booted ahead of demand (server/pool/); None: every create boots its own.
        self.pool = pool
        self.quotas = quotas if quotas is not None else Quotas(settings=settings,
                                                               sessions=sessions)
        # Builds workspaces from devcontainer.json (None: a runtime that builds no images;
        # a repository with one is then refused).
        self.devcontainers = devcontainers
        self.gpus = gpus if gpus is not None else GpuPool()  # allocated by the ledger
        # Enforces network policies on the host (None: workspaces on the engine's default
        # bridge, no policy enforced).
        self.network = network
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
        self._removals: set[asyncio.Task[None]] = set()  # work directories going (_remove_later)
        self._tmp = settings.data_dir / "tmp"
        self.activity = Activity()
        self.feed = EventFeed()  # wakes the readers of the events WebSocket
        self.ledger = Ledger(sessions=sessions, gpus=self.gpus, feed=self.feed)
        self.networks = WorkspaceNetworks(self)
        self.restores = Restores(self)
        self.builds = Builds(self)  # creates and forks in the background (self._tasks)
        self.reconciler = Reconciler(self)
        self.engine_events = EngineFollower(self)
        # Ends the biggest process of a workspace past its memory_mb (None: the backend has
        # no memory cgroups to watch): server/workspaces/memory_guard.py.
        self.memory_guard = memory_guard.attach(self)
        # What other services do at points of a workspace's life (the forges: a clone's
        # credentials, Den's git hooks, clean-up after a delete): server/workspaces/hooks.py.
        self.hooks: list[WorkspaceHooks] = []
        if isinstance(runtime, AgentChannel):
            runtime.on_fallback(self._agent_fallback)

    # --- reading ----------------------------------------------------------------------

    @staticmethod
    def _listed(user: User) -> Select[Workspace]:
        """The workspaces ``user`` sees listed (all for an admin; never a prebuild's)."""
        q = select(Workspace).where(Workspace.prebuild_id.is_(None))
        return q if user.is_admin else q.where(Workspace.owner_id == user.id)

    def list_for(self, user: User) -> list[Workspace]:
        with self.sessions() as s:
            return list(s.scalars(self._listed(user).order_by(Workspace.created_at)))

    def list_page_for(self, user: User, *, limit: int, after: str | None
                      ) -> tuple[list[Workspace], str | None]:
        """One page of :meth:`list_for` (server/workspaces/listing.py) and the next cursor."""
        cursor = listing.decode(after) if after is not None else None
        with self.sessions() as s:
            rows = list(s.scalars(listing.page_query(self._listed(user), limit=limit,
                                                     after=cursor)))
        return listing.split(rows, limit)

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
            handle=backend_handle(ws.engine or {}) or self.runtime.new_handle(ws.id),
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
            network=self.networks.policy(ws).mode,
        )

    def sandbox_name(self, ws: Workspace) -> str:
        """The name the backend's network knows the workspace by (network policies are
        keyed by it); its id where the backend manages no network."""
        if isinstance(self.runtime, ManagedNetwork):
            return self.runtime.sandbox_name(self.spec_for(ws))
        return ws.id

    def repo_path(self, ws: Workspace) -> str:
        return f"{WORKSPACE_ROOT}/{ws.repo_dir}"

    # --- state ------------------------------------------------------------------------

    def locked(self, workspace_id: str) -> asyncio.Lock:
        """The workspace's operation lock: lifecycle operations hold it, and so does work
        that must not overlap one but changes no state (a snapshot)."""
        bind_workspace(workspace_id)
        return self._locks.setdefault(workspace_id, asyncio.Lock())

    def busy(self, workspace_id: str) -> bool:
        """Whether an operation on the workspace is in progress in this process."""
        lock = self._locks.get(workspace_id)
        return (workspace_id in self._tasks or (lock is not None and lock.locked())
                or self.builds.pending(workspace_id))

    async def idle(self, workspace_id: str) -> None:
        """Wait until no operation on the workspace is in progress in this process."""
        while self.busy(workspace_id):
            task = self._tasks.get(workspace_id)
            lock = self._locks.get(workspace_id)
            if task is not None:
                await asyncio.wait({task})
            elif lock is not None and lock.locked():
                async with lock:
                    pass
            else:  # a cancelled build's engine calls, which end on their own
                await asyncio.sleep(0.1)

    def note(self, workspace_id: str, kind: str, message: str, *, actor: str = "system") -> None:
        """Record an event that is not a state change (the ledger's)."""
        self.ledger.note(workspace_id, kind, message, actor=actor)

    def touch(self, workspace_id: str, *, force: bool = False) -> None:
        """Mark activity on a workspace (the ledger's, debounced; ``force``: not coalesced)."""
        self.ledger.touch(workspace_id, force=force)

    @property
    def can_checkpoint(self) -> bool:
        """Whether the backend can save a workspace's memory (pause, memory snapshots);
        without it idling stops a workspace instead."""
        return isinstance(self.runtime, Checkpoints)

    def add_hooks(self, hooks: WorkspaceHooks) -> None:
        self.hooks.append(hooks)

    def _agent_fallback(self, workspace_id: str, reason: str) -> None:
        try:
            self.note(workspace_id, "agent", f"the workspace's agent did not answer: {reason}")
        except SQLAlchemyError:  # the workspace is gone meanwhile; the server log has it
            log.info("workspace %s: no event for the agent's fallback", workspace_id)

    # --- create -----------------------------------------------------------------------

    async def create(self, user: User, req: CreateRequest, *,
                     prebuilds: PrebuildFinder | None = None) -> Workspace:
        """Validate, insert the row in ``creating`` and start building in the background
        (or forking from a prebuild that ``prebuilds`` finds)."""
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
        runtime = validation.runtime_name(self.settings, req.runtime)
        image = await validation.image(self.settings, self.runtime, req.image)
        cpus, memory_mb, disk_gb = validation.resources(
            self.settings, self.gpus, cpus=req.cpus, memory_mb=req.memory_mb,
            disk_gb=req.disk_gb, gpu_count=req.gpus, gpu_model=req.gpu_model)
        validation.fits(self.runtime, cpus=cpus, memory_mb=memory_mb)
        env = limits.validate_env(req.env)
        network = self.networks.validate(req.network_mode, req.network_allow)
        validation.timers(idle_timeout_s=req.idle_timeout_s, stop_after_s=req.stop_after_s)
        fields: dict[str, Any] = dict(
            repo_url=source.url if source.kind != "file" else req.repo_url.strip(),
            repo_branch=req.branch, repo_dir=naming.repo_basename(source.url), image=image,
            runtime=runtime, cpus=cpus, memory_mb=memory_mb, disk_gb=disk_gb, gpus=req.gpus,
            gpu_model=req.gpu_model,
            env=env, idle_timeout_s=req.idle_timeout_s, stop_after_s=req.stop_after_s,
            keep_alive=req.keep_alive, network=network.to_json(), prebuild_id=req.for_prebuild,
        )
        if prebuilds is not None and req.prebuild and (
                use := await prebuilds.find(user, fields, req)) is not None:
            if use.claim is not None and (
                    claimed := use.claim(user, name, {**fields, **use.fields})) is not None:
                self._spawn(*claimed)  # a fork made ahead (server/prebuilds/ahead.py)
                return self.get(claimed[0])
            row = self._insert(user, name, message_prefix=use.message_prefix,
                               **{**fields, **use.fields})
            self._forward(row.id, row.devcontainer)
            self._spawn(row.id, self.restores.build_fork(row.id, use.snapshot, then=use.then))
            return self.get(row.id)
        pooled = self.pool.take(pool_fit.request_key(
            image=image, runtime=runtime, cpus=cpus, memory_mb=memory_mb, disk_gb=disk_gb,
            pids_limit=self.settings.default_pids, gpus=req.gpus, env=env,
        )) if self.pool is not None else None
        try:
            row = self._insert(user, name, message_prefix="create from", pooled=pooled,
                               **fields)
        except BaseException:
            if pooled is not None and self.pool is not None:
                self.pool.give_back(pooled)
            raise
        self._spawn(row.id, self._build(row.id, source, req.branch,
                                        devcontainer=req.devcontainer, pooled=pooled))
        return self.get(row.id)

    def _insert(self, user: User, name: str, *, message_prefix: str,
                pooled: Pooled | None = None, **fields: Any) -> Workspace:
        """Insert a workspace row in ``creating`` (limits and name checked, event recorded);
        with ``pooled``, under the id and handle of the pooled sandbox it takes."""
        ws_id = pooled.workspace_id if pooled is not None else naming.new_workspace_id()

        def check(s: Session) -> None:
            self.quotas.check_workspace(s, user, cpus=fields["cpus"],
                                        memory_mb=fields["memory_mb"], disk_gb=fields["disk_gb"])
            check_name_free(s, user.id, name)

        row = Workspace(
            id=ws_id, owner_id=user.id, name=name, pids_limit=self.settings.default_pids,
            engine=(dict(pooled.spec.handle) if pooled is not None
                    else self.runtime.new_handle(ws_id)),
            **fields,
        )
        self.ledger.insert(row, check=check, actor=user.name,
                           message=f"{message_prefix} {row.repo_url}")
        log.info("workspace %s: creating %r for %s (%s %s)", ws_id, name, user.name,
                 message_prefix, row.repo_url)
        return row

    def _spawn(self, ws_id: str, work: Coroutine[Any, Any, None]) -> None:
        """Run a workspace's build in the background; delete stops it (Builds.stop)."""
        self.builds.spawn(ws_id, work)

    async def built(self, ws_id: str) -> Workspace:
        """The workspace once its create or fork in the background has ended (either way)."""
        if (task := self._tasks.get(ws_id)) is not None:
            await asyncio.wait({task})
        return self.get(ws_id)

    async def create_fork(self, user: User, name: str, snap: Snapshot) -> Workspace:
        """A new, independent workspace from a snapshot: its disk (container filesystem and
        /workspace) is a copy of the snapshot's."""
        if (problem := naming.validate_name(name)) is not None:
            raise ValidationFailed(problem)
        # The policy of now, not of when the snapshot was taken (a runc snapshot after the
        # operator turned runc off must not run unsandboxed).
        runtime = validation.runtime_name(self.settings, snap.runtime)
        self.restores.disks()  # 409 before anything is written when forks are impossible
        row = self._insert(
            user, name, message_prefix=f"fork of snapshot {snap.id} ({snap.name}) of",
            repo_url=snap.repo_url, repo_branch=snap.repo_branch, repo_dir=snap.repo_dir,
            image=snap.image, runtime=runtime, cpus=self.settings.default_cpus,
            memory_mb=self.settings.default_memory_mb, disk_gb=self._forked_disk_gb(snap),
            gpus=0, env=limits.validate_env(dict(snap.devcontainer.get("env") or {})),
            network=self.networks.forked(snap).to_json(), devcontainer=dict(snap.devcontainer),
        )
        self._forward(row.id, row.devcontainer)
        self._spawn(row.id, self.restores.build_fork(row.id, snap))
        return self.get(row.id)

    def _forked_disk_gb(self, snap: Snapshot) -> int:
        """The origin's disk while it exists (else the default), and room for the snapshot."""
        base = self.settings.default_disk_gb
        if snap.workspace_id is not None:
            with self.sessions() as s:
                origin = s.get(Workspace, snap.workspace_id)
                base = origin.disk_gb if origin is not None else base
        return min(max(base, -(-snap.size_bytes // 1024**3)), self.settings.max_disk_gb)

    async def creation_failed(self, ws_id: str, spec: WorkspaceSpec, exc: Exception) -> None:
        """Remove what a failed create or fork made; the row goes to ``error`` with why."""
        reason = exc.message if isinstance(exc, DenError) else "internal error while creating"
        if not isinstance(exc, DenError):
            log.error("workspace %s: create failed", ws_id, exc_info=exc)
        else:
            log.warning("workspace %s: create failed: %s %s", ws_id, reason, exc.detail)
        with contextlib.suppress(Exception):
            await self.runtime.destroy(spec)
        with contextlib.suppress(Conflict):
            self.ledger.transition(ws_id, State.CREATING, State.ERROR, actor="system",
                                   reason=reason)

    async def _build(self, ws_id: str, source: git_clone.RepoSource, branch: str | None, *,
                     devcontainer: bool = True, pooled: Pooled | None = None) -> None:
        """Clone, create the engine objects, start: ``creating`` -> ``running`` or ``error``."""
        ws = self.get(ws_id)
        spec = self.spec_for(ws)
        work = self._tmp / ws_id
        claim = (PendingClaim(self.pool, pooled, hostname=ws.name,
                              then=lambda: self.networks.sync(ws_id))
                 if pooled is not None and self.pool is not None else None)
        try:
            async with self.metrics.operation("create"), self.locked(ws_id):
                work.mkdir(parents=True, exist_ok=True)
                repo = work / "repo"
                tar = work / "seed.tar"
                # Through inflight: a delete meanwhile stops the clone and waits for it.
                head = await inflight.to_thread(
                    git_clone.clone, source, branch=branch, dest=repo,
                    timeout_s=self.settings.clone_timeout_s,
                    max_bytes=self.settings.clone_max_mb * 1024 * 1024,
                    known_hosts=self.settings.data_dir / "ssh_known_hosts",
                    extra_env=hooks.clone_env(self.hooks, ws),
                    outbound=self.outbound,
                )
                for hook in self.hooks:
                    await inflight.to_thread(hook.prepare_clone, ws, repo, head)
                await inflight.to_thread(
                    git_clone.pack_for_workspace, repo, arcname=ws.repo_dir, out=tar
                )
                if head and not ws.repo_branch:
                    self.ledger.change(ws_id, {"repo_branch": head})
                self.note(ws_id, "clone", f"cloned {ws.repo_url} ({head or 'detached'})")
                faults.point("create.clone")
                setup = await self._devcontainer(ws, repo, work) if devcontainer else None
                spec = self.spec_for(self.get(ws_id)) if setup else spec
                seed = functools.partial(self.runtime.seed, spec, tar)
                if not await self._claimed(ws_id, claim, fits=setup is None, seed=seed):
                    await self.runtime.create(spec)
                    await self.runtime.start(spec)
                    await self.networks.sync(ws_id)
                    await seed()
                if setup is not None and self.devcontainers is not None:
                    await self.devcontainers.created(self.runtime, spec, setup,
                                                     note=self._noter(ws_id))
                self.ledger.transition(ws_id, State.CREATING, State.RUNNING, actor="system",
                                       message=f"running under {ws.runtime}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if claim is not None:
                await claim.abandon()
            await self.creation_failed(ws_id, spec, exc)
        finally:
            if claim is not None:
                await claim.abandon()
            self._remove_later(work)

    def _remove_later(self, path: Path) -> None:
        """Remove a build's work directory in a thread, not in the build: on the loop the
        clone's files took 15-20 ms (the new workspace's first requests waited behind them),
        and a build that was still removing them after ``running`` kept the workspace busy,
        so a container that died meanwhile was skipped by reconcile. Whatever is left at a
        restart goes with ``<data_dir>/tmp``."""
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(shutil.rmtree, path, ignore_errors=True), name=f"rm-{path.name}")
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def _claimed(self, ws_id: str, claim: PendingClaim | None, *, fits: bool,
                       seed: Callable[[], Awaitable[None]]) -> bool:
        """Whether the workspace took the pooled sandbox taken for it (server/pool/), seeded
        by ``seed`` by then; one that does not fit after all (a devcontainer.json) or could
        not be claimed is removed, and the caller makes a fresh one under the same names."""
        if claim is None:
            return False
        took, problem = await claim.settle(fits=fits, seed=seed)
        if took or problem is not None:
            self.note(ws_id, "pool", "took a sandbox from the warm pool" if took else
                      f"the warm pool's sandbox could not be taken ({problem}); booting a "
                      "new one")
        return took

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
        stored = {**made.stored,
                  "ports": devc_ports.to_json(devc_ports.rows(made.config, public_allowed=True))}
        self._forward(ws.id, stored, values={
            "image": made.image, "env": limits.validate_env(dict(made.env)),
            "devcontainer": stored})
        return made

    def _forward(self, ws_id: str, stored: Mapping[str, Any], *,
                 values: Mapping[str, Any] | None = None) -> None:
        """The forwarded ports a row's ``devcontainer`` keeps, into its preview ports (at
        create, with the row's ``values``; in a fork of it or of its prebuild)."""
        forwarded = devc_ports.from_json(stored.get("ports"),
                                         public_allowed=self.settings.preview_public_sharing)
        if not forwarded and not values:
            return
        self.ledger.change(
            ws_id, values or {}, also=lambda s: devc_ports.write(s, ws_id, forwarded),
            event=("devcontainer", f"forwarded ports: {devc_ports.describe(forwarded)}")
            if forwarded else None)

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
            self.ledger.transition(ws_id, src, step, actor=actor)
            spec = self.spec_for(ws)
            try:
                if await self.runtime.status(spec) is ContainerStatus.MISSING:
                    raise ObjectMissing("the workspace's container is gone from the engine")
                await self.runtime.start(spec)
            except DenError as exc:
                self.ledger.transition(ws_id, step, State.ERROR, actor=actor,
                                       reason=f"start failed: {exc.message}")
                raise
            await self.networks.sync(ws_id)
            self.ledger.transition(ws_id, step, State.RUNNING, actor=actor)
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
            self.ledger.transition(ws_id, was, step, actor=actor)
            try:
                await self.runtime.stop(self.spec_for(ws), timeout_s=self.settings.stop_timeout_s)
                # Stop drops the memory (of a pause, or kept since the last resume).
                if isinstance(self.runtime, Checkpoints):
                    await self.runtime.delete_checkpoint(self.spec_for(ws),
                                                         checkpoint=CHECKPOINT)
            except DenError as exc:
                self.ledger.transition(ws_id, step, State.ERROR, actor=actor,
                                       reason=f"stop failed: {exc.message}")
                raise
            self.ledger.transition(ws_id, step, State.STOPPED, actor=actor)
            await self.networks.sync(ws_id)
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
            if not isinstance(self.runtime, Checkpoints):
                raise Conflict("this server's backend cannot save a workspace's memory; stop "
                               "it instead: files are kept", code="pause_unsupported")
            self.ledger.transition(ws_id, State(ws.state), step, actor=actor,
                                   message="saving a frozen workspace's memory to disk"
                                   if frozen else "")
            spec = self.spec_for(ws)
            started = time.monotonic()
            try:
                await self.runtime.pause(spec, checkpoint=CHECKPOINT)
            except DenError as exc:
                await self._sleep_failed(ws_id, spec, exc, actor=actor, what="pause")
                raise
            self.ledger.transition(ws_id, step, State.PAUSED, actor=actor,
                                   message=f"memory saved in {time.monotonic() - started:.2f} s")
            await self.networks.sync(ws_id)
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
            self.ledger.transition(ws_id, State.RUNNING, step, actor=actor)
            spec = self.spec_for(ws)
            started = time.monotonic()
            try:
                held = await self.runtime.freeze(spec)
            except DenError as exc:
                await self._sleep_failed(ws_id, spec, exc, actor=actor, what="freeze")
                raise
            self.ledger.set_engine(ws_id, {**ws.engine, FROZEN_BYTES: held})
            mib = "" if held is None else f", holding {held / 2**20:.0f} MiB"
            self.ledger.transition(ws_id, step, State.PAUSED, actor=actor, sleep=Sleep.FROZEN,
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
        self.ledger.transition(ws_id, State.PAUSING, dst, actor=actor, sleep=Sleep.FROZEN,
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
            self.ledger.transition(ws_id, State.PAUSED, step, actor=actor)
            spec = self.spec_for(ws)
            started = time.monotonic()
            thawed = False  # in place: the container kept its address, the firewall its rules
            try:
                if frozen and isinstance(self.runtime, Freezer):
                    await self.runtime.thaw(spec)
                    thawed = True
                    message = f"thawed in {time.monotonic() - started:.3f} s (frozen tier)"
                elif isinstance(self.runtime, Checkpoints):
                    await self.runtime.resume(spec, checkpoint=CHECKPOINT)
                    message = f"restored from memory in {time.monotonic() - started:.2f} s"
                else:
                    raise ObjectMissing("this server's backend keeps no memory")
            except DenError as exc:
                log.warning("workspace %s: restore failed: %s %s", ws_id, exc.message,
                            exc.detail)
                try:
                    await self.runtime.start(spec)
                except DenError as cold:
                    self.ledger.transition(ws_id, step, State.ERROR, actor=actor,
                                           reason=f"restore failed ({exc.message}) and so did "
                                                  f"a cold start ({cold.message})")
                    raise
                message = (f"{'thaw' if frozen else 'restore from memory'} failed "
                           f"({exc.message}); started cold from disk: files are kept, running "
                           "processes were not")
            if not thawed:
                await self.networks.sync(ws_id)
            self.ledger.transition(ws_id, step, State.RUNNING, actor=actor, message=message)
            return self.get(ws_id)

    async def delete(self, ws_id: str, *, actor: str) -> bool:
        """Delete a workspace, its container and its volume. False when a delete of it is
        already in progress (the caller answers 202)."""
        await self.builds.stop(ws_id, actor=actor)  # an unfinished create, its engine calls
        async with self.metrics.operation("delete"), self.locked(ws_id):
            ws = self.get(ws_id)
            if ws.state == State.DELETING.value:
                return False
            self.ledger.transition(ws_id, State(ws.state), State.DELETING, actor=actor)
            await self.finish_delete(ws, actor=actor)
        self._locks.pop(ws_id, None)
        return True

    async def finish_delete(self, ws: Workspace, *, actor: str) -> None:
        try:
            await self.runtime.destroy(self.spec_for(ws))
        except DenError as exc:
            self.ledger.transition(ws.id, State.DELETING, State.ERROR, actor=actor,
                                   reason=f"delete failed: {exc.message}; delete again to retry")
            raise
        with self.sessions.begin() as s:
            s.execute(delete(Event).where(Event.workspace_id == ws.id))
            s.execute(delete(Workspace).where(Workspace.id == ws.id))
        self.feed.changed(ws.id)
        self.metrics.forget_workspace(ws.id)
        await self.networks.sync(ws.id)
        for hook in self.hooks:
            hook.deleted(ws.id)
        log.info("workspace %s: deleted by %s", ws.id, actor)

    async def ensure_running(self, ws_id: str, *, actor: str,
                             current: Workspace | None = None) -> Workspace:
        """The workspace, running: a paused one is resumed and a stopped one started (wake
        on access). Concurrent callers share one wake: the later ones wait for it.
        ``current``: its row as the caller has just read it (saves reading it again)."""
        ws = current if current is not None and current.id == ws_id else self.get(ws_id)
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

    async def exec(self, ws_id: str, req: ExecRequest, *, actor: str,
                   current: Workspace | None = None) -> ExecResult:
        """Run ``req`` in the workspace (woken first). A long call (not ``req.short``) is
        admitted through :attr:`long_calls`: it waits for a slot, or is refused with 503
        ``overloaded`` when the queue is full. ``current``: as :meth:`ensure_running`'s."""
        started = time.monotonic()
        if not req.short and self.long_calls.full:
            current = None  # it waits for a slot: the row is read after the wait
        try:
            admitted = contextlib.nullcontext() if req.short else self.long_calls.enter()
            async with admitted:
                result = await self._exec(ws_id, req, actor=actor, current=current)
        except BaseException as exc:
            self.metrics.exec_failed(time.monotonic() - started, exc, short=req.short)
            raise
        self.metrics.exec_done(time.monotonic() - started, short=req.short,
                               timed_out=result.timed_out)
        return result

    async def _exec(self, ws_id: str, req: ExecRequest, *, actor: str,
                    current: Workspace | None = None) -> ExecResult:
        ws = await self.ensure_running(ws_id, actor=actor, current=current)
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
                self.ledger.transition(ws_id, State.RUNNING, State.STOPPED, actor=actor,
                                       message="the workspace's sandbox exited unexpectedly "
                                               "(out of memory?); it starts again on the next "
                                               "access")
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
        self.ledger.change(ws_id, {
            "keepalive_until": now + timedelta(seconds=ttl_s) if ttl_s else None,
            "last_activity_at": now})
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

    # --- reconcile and the engine's events (server/workspaces/reconcile.py, engine_events.py)

    def remove_leftovers(self) -> None:
        """At startup, before anything runs: what a previous run left half-made."""
        self.reconciler.remove_leftovers()

    async def reconcile(self) -> None:
        """Bring the database and the engine into agreement (Reconciler.reconcile)."""
        await self.reconciler.reconcile()
        await memory_guard.resync(self, self.memory_guard)

    async def apply_engine_event(self, event: EngineEvent) -> None:
        """Follow what the engine says happened to a workspace (EngineFollower.apply)."""
        await self.engine_events.apply(event)

    async def shutdown(self) -> None:
        """Cancel unfinished background work; reconcile cleans up at the next start."""
        await self.engine_events.close()
        if self._removals:  # a work directory's removal: quick, and nothing to cancel
            await asyncio.wait(set(self._removals))
        if self.memory_guard is not None:
            await self.memory_guard.close()
        await cancel_and_wait(self._tasks.values())


def path_in_workspace(path: str) -> str:
    """Normalise a user path to an absolute one under /workspace; Forbidden when it leaves."""
    limits.check_path(path, what="path")
    joined = posixpath.normpath(posixpath.join(WORKSPACE_ROOT, path or "."))
    if joined != WORKSPACE_ROOT and not joined.startswith(WORKSPACE_ROOT + "/"):
        raise Forbidden(f"path {path!r} is outside /workspace", code="path_outside")
    return joined

