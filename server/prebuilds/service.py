"""Prebuilds: rows in ``prebuilds`` and the work that makes them.

A prebuild is made by an ordinary create of a workspace of the owner's (named
``prebuild-<hex>``, with the devcontainer.json and its onCreate/postCreate/postStart commands
as any create), paused, snapshotted with its memory through the snapshot service (so it counts
toward the owner's snapshot limit), and deleted: what remains is the snapshot and the row. A
create of the same owner, repository and branch then forks from the snapshot (the workspace
service's ``PrebuildFinder`` seam), brings the clone up to the branch's head and runs only
postStartCommand (``server/prebuilds/update.py``), or takes the fork of it made ahead
(``server/prebuilds/ahead.py``). This module changes no workspace state itself: it calls the
workspace service, the only writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import secrets
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select, update

from server.db.models import Prebuild, Snapshot, User, Workspace
from server.errors import Conflict, DenError, NotFound, ValidationFailed
from server.git import clone as git_clone
from server.outbound import git_pin
from server.prebuilds import matching
from server.prebuilds.ahead import ForksAhead
from server.prebuilds.matching import BUILDING, FAILED, READY
from server.prebuilds.update import bring_up_to_date
from server.runtime.base import WorkspaceSpec
from server.snapshots.service import SnapshotService
from server.tasks import cancel_and_wait
from server.workspaces import limits
from server.workspaces.prebuild_seam import PrebuildUse
from server.workspaces.service import CreateRequest, WorkspaceService
from server.workspaces.states import State

log = logging.getLogger(__name__)

ACTOR = "prebuild"
REASON_MAX = 8192  # characters of a failure's reason kept (the log's tail is in it)


def new_prebuild_id() -> str:
    return "pb" + secrets.token_hex(6)


class PrebuildService:
    def __init__(self, workspaces: WorkspaceService, snapshots: SnapshotService) -> None:
        self.workspaces = workspaces
        self.snapshots = snapshots
        self.sessions = workspaces.sessions
        self.settings = workspaces.settings
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._deleting: set[str] = set()  # prebuilds a create must not pick any more
        self.ahead = ForksAhead(self)  # a fork of each ready one, made ahead

    def deleting(self, prebuild_id: str) -> bool:
        """Whether the prebuild is being deleted (a create must not use it any more)."""
        return prebuild_id in self._deleting

    def fork_ready(self, prebuild_id: str) -> bool:
        """Whether a fork of the prebuild made ahead waits for the owner's next create."""
        return self.ahead.waiting(prebuild_id) is not None

    # --- reading ----------------------------------------------------------------------

    def list_for(self, user: User) -> list[Prebuild]:
        """The user's prebuilds, oldest first; every user's for an admin."""
        with self.sessions() as s:
            q = select(Prebuild).order_by(Prebuild.created_at)
            if not user.is_admin:
                q = q.where(Prebuild.owner_id == user.id)
            return list(s.scalars(q))

    def _owned(self, owner_id: int) -> list[Prebuild]:
        with self.sessions() as s:
            return list(s.scalars(select(Prebuild).where(Prebuild.owner_id == owner_id)
                                  .order_by(Prebuild.created_at)))

    def get(self, prebuild_id: str) -> Prebuild:
        with self.sessions() as s:
            row = s.get(Prebuild, prebuild_id)
        if row is None:
            raise NotFound(f"no prebuild {prebuild_id!r}")
        return row

    def get_for(self, user: User, prebuild_id: str) -> Prebuild:
        """The prebuild as ``user`` may see it; another user's is a 404."""
        with self.sessions() as s:
            row = s.get(Prebuild, prebuild_id)
        if row is None or (row.owner_id != user.id and not user.is_admin):
            raise NotFound(f"no prebuild {prebuild_id!r}")
        return row

    # --- making one -------------------------------------------------------------------

    async def create(self, user: User, repo_url: str, branch: str | None) -> Prebuild:
        """Start a prebuild of ``repo_url`` at ``branch`` (None: its default branch), or
        answer the one of them being made already."""
        st = self.settings
        source = git_clone.validate_repo_url(repo_url, allowed_schemes=st.allowed_git_schemes,
                                             local_roots=st.local_repo_roots)
        await asyncio.to_thread(git_pin, source.url, source.kind, self.workspaces.outbound)
        if branch is not None and (branch.startswith("-") or not branch.strip()
                                   or any(c in branch for c in "\0\n ")):
            raise ValidationFailed(f"invalid branch name {branch!r}")
        url = source.url if source.kind != "file" else repo_url.strip()
        # The snapshot it ends in counts toward the owner's limit: refuse now, not at the end.
        with self.workspaces.quotas.snapshot_slot(user.id):
            pass
        with self.sessions.begin() as s:
            rows = list(s.scalars(select(Prebuild).where(Prebuild.owner_id == user.id)
                                  .order_by(Prebuild.created_at)))
            if (current := matching.building(rows, repo_url=url, branch=branch)) is not None:
                return current
            row = Prebuild(id=new_prebuild_id(), owner_id=user.id, repo_url=url,
                           branch=branch or "", state=BUILDING, reason="", commit="",
                           env={}, devcontainer={})
            s.add(row)
        log.info("prebuild %s: of %s (%s) for %s", row.id, url, branch or "default branch",
                 user.name)
        task = asyncio.create_task(self._build(row.id), name=f"prebuild-{row.id}")
        self._tasks[row.id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(row.id, None))
        return self.get(row.id)

    async def wait(self, prebuild_id: str) -> Prebuild:
        """The prebuild once the build in progress (if any) has ended."""
        if (task := self._tasks.get(prebuild_id)) is not None:
            await asyncio.wait({task})
        return self.get(prebuild_id)

    async def _build(self, prebuild_id: str) -> None:
        pb = self.get(prebuild_id)
        svc = self.workspaces
        with self.sessions() as s:
            owner = s.get(User, pb.owner_id)
        ws_id: str | None = None
        failure: str | None = None
        try:
            if owner is None:
                raise NotFound("the prebuild's owner is gone")
            ws = await svc.create(owner, CreateRequest(
                name=f"prebuild-{prebuild_id[2:]}", repo_url=pb.repo_url,
                branch=pb.branch or None, keep_alive=True, prebuild=False,
                for_prebuild=prebuild_id))
            ws_id = ws.id
            self._set(prebuild_id, workspace_id=ws_id)
            ws = await svc.built(ws_id)
            if ws.state != State.RUNNING.value:
                raise ValidationFailed(ws.state_reason or f"its workspace is {ws.state}")
            commit = await self._commit(ws)
            await svc.pause(ws_id, actor=ACTOR)  # the snapshot then keeps it paused
            snap = await self.snapshots.create(ws_id, name=_snapshot_name(prebuild_id),
                                               memory=True, actor=ACTOR)
            self._set(prebuild_id, state=READY, commit=commit, snapshot_id=snap.id,
                      env=dict(ws.env), devcontainer=dict(ws.devcontainer),
                      finished_at=datetime.now(UTC))
            log.info("prebuild %s: ready (commit %s, snapshot %s)", prebuild_id, commit, snap.id)
        except asyncio.CancelledError:  # the server stops: recover() finishes it next start
            ws_id = None
            raise
        except Exception as exc:
            reason = (exc.message if isinstance(exc, DenError)
                      else "internal error while making the prebuild")
            log.warning("prebuild %s: failed: %s", prebuild_id, reason,
                        exc_info=None if isinstance(exc, DenError) else exc)
            failure = _shorten(reason)
        finally:
            if ws_id is not None:  # the snapshot is what is kept; the workspace goes
                with contextlib.suppress(Exception):
                    await svc.delete(ws_id, actor=ACTOR)
                self._set(prebuild_id, workspace_id=None)
        if failure is not None:  # said once its build workspace is gone, not before
            self._set(prebuild_id, state=FAILED, reason=failure, finished_at=datetime.now(UTC))
        await self._retain(self.get(prebuild_id))
        if self.get(prebuild_id).state == READY:
            self.ahead.replenish(prebuild_id)

    async def _commit(self, ws: Workspace) -> str:
        """The commit the workspace's clone has checked out ("" when it cannot tell)."""
        svc = self.workspaces
        req = svc.exec_request(ws, ["git", "rev-parse", "HEAD"], timeout_s=30)
        result = await svc.exec(ws.id, req, actor=ACTOR)
        commit = result.stdout.decode(errors="replace").strip()  # the sandbox's word
        return commit if result.exit_code == 0 and matching.is_commit(commit) else ""

    def _set(self, prebuild_id: str, **values: Any) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Prebuild).where(Prebuild.id == prebuild_id).values(**values))

    async def _retain(self, pb: Prebuild) -> None:
        rows = self._owned(pb.owner_id)
        for old in matching.expired(rows, repo_url=pb.repo_url, branch=pb.branch,
                                    keep=self.settings.prebuilds_keep):
            with contextlib.suppress(DenError):
                await self.delete(self.get(old), actor=f"{ACTOR} (retention)")

    # --- using one --------------------------------------------------------------------

    async def find(self, user: User, fields: Mapping[str, Any], req: CreateRequest
                   ) -> PrebuildUse | None:
        """The workspace service's seam: the user's own newest ready prebuild of the
        repository and branch, with what the fork's row takes from it."""
        if matching.usable(fields, default_image=self.settings.default_image,
                           devcontainer=req.devcontainer) is not None:
            return None
        rows = self._owned(user.id)
        with self.sessions() as s:
            snaps = {sid: s.get(Snapshot, sid) for sid in {r.snapshot_id for r in rows} if sid}
        found = {sid for sid, snap in snaps.items() if snap is not None}
        pb = matching.pick(rows, repo_url=fields["repo_url"], branch=req.branch,
                           snapshots=found)
        if pb is None:
            return None
        return self.use_of(pb, fields)

    def use_of(self, pb: Prebuild, fields: Mapping[str, Any], *, ahead: bool = False
               ) -> PrebuildUse | None:
        """How a create of these ``fields`` uses ``pb``: it takes the fork made ahead when
        one waits and fits, else forks (then fetches and runs postStartCommand). ``ahead``:
        for the fork made ahead itself (neither: they run when a create takes it)."""
        if pb.id in self._deleting or pb.snapshot_id is None:
            return None
        with self.sessions() as s:
            snap = s.get(Snapshot, pb.snapshot_id)
        if snap is None:
            return None
        disk_gb = min(max(int(fields["disk_gb"]), -(-snap.size_bytes // 1024**3)),
                      self.settings.max_disk_gb)
        use = PrebuildUse(
            snapshot=snap,
            fields={"image": snap.image, "repo_branch": snap.repo_branch,
                    "repo_dir": snap.repo_dir, "disk_gb": disk_gb,
                    "env": limits.validate_env({**pb.env, **fields["env"]}),
                    "devcontainer": dict(pb.devcontainer)},
            message_prefix=f"create from prebuild {pb.id} (commit {pb.commit[:12] or '?'}) of",
            then=_nothing if ahead else functools.partial(self.after_fork, pb),
        )
        if ahead:
            return use
        return dataclasses.replace(use, claim=functools.partial(self.ahead.claim, pb, use))

    async def after_fork(self, pb: Prebuild, ws_id: str, spec: WorkspaceSpec, *,
                         beside: Awaitable[None] | None = None) -> None:
        """In the fork, before it is ``running``: newer commits (and ``beside`` at the same
        time: a fork made ahead takes its host name), postStartCommand; and a new prebuild
        in the background when this one is out of date."""
        svc = self.workspaces
        head, _ = await asyncio.gather(
            bring_up_to_date(svc, svc.get(ws_id), spec, prebuild=pb),
            beside if beside is not None else asyncio.sleep(0))
        ws = svc.get(ws_id)
        if svc.devcontainers is not None and ws.devcontainer.get("post_start"):
            try:
                await svc.devcontainers.started(
                    svc.runtime, spec, ws.devcontainer,
                    note=lambda kind, message: svc.note(ws_id, kind, message))
            except DenError as exc:
                svc.note(ws_id, "devcontainer", exc.message)
        if head and pb.commit and head != pb.commit:  # unknown commits: nothing to compare
            with self.sessions() as s:
                owner = s.get(User, pb.owner_id)
            if owner is not None:
                with contextlib.suppress(DenError):
                    new = await self.create(owner, pb.repo_url, pb.branch or None)
                    svc.note(ws_id, "prebuild", f"prebuild {pb.id} is out of date; prebuild "
                                                f"{new.id} of the branch's head is being made")

    # --- deleting ---------------------------------------------------------------------

    async def delete(self, pb: Prebuild, *, actor: str) -> None:
        """Remove the prebuild and its snapshot. Workspaces forked from it keep running (a
        fork has its own container and volume); one being forked from it now is a 409."""
        if pb.state == BUILDING:
            raise Conflict("the prebuild is being made; delete it once it is ready or failed")
        self._deleting.add(pb.id)
        try:
            snap = None
            if pb.snapshot_id is not None:
                with self.sessions() as s:
                    snap = s.get(Snapshot, pb.snapshot_id)
                    forking = snap is not None and s.scalar(
                        select(Workspace.id).where(Workspace.image == snap.image,
                                                   Workspace.prebuild_id.is_(None),
                                                   Workspace.state == State.CREATING.value))
                if forking:
                    raise Conflict(f"workspace {forking} is being created from this prebuild; "
                                   "delete it once that workspace is running")
            await self.ahead.remove(pb.id)  # no create takes its fork from here on
            if snap is not None:
                await self.snapshots.delete(snap.id, actor=actor)
            with self.sessions.begin() as s:
                s.execute(delete(Prebuild).where(Prebuild.id == pb.id))
            log.info("prebuild %s deleted by %s", pb.id, actor)
        finally:
            self._deleting.discard(pb.id)

    # --- server start and stop --------------------------------------------------------

    async def recover(self) -> None:
        """At startup: a prebuild a stopped server left ``building`` failed, and its
        workspace goes."""
        with self.sessions() as s:
            left = list(s.scalars(select(Prebuild).where(Prebuild.state == BUILDING)))
        for pb in left:
            if pb.id in self._tasks:
                continue
            self._set(pb.id, state=FAILED, workspace_id=None, snapshot_id=None,
                      finished_at=datetime.now(UTC),
                      reason="the server stopped while the prebuild was being made; "
                             "make it again")
            if pb.workspace_id is not None:
                with contextlib.suppress(DenError):
                    await self.workspaces.delete(pb.workspace_id, actor=ACTOR)
            with self.sessions() as s:  # taken just before the stop, the row not yet ready
                taken = list(s.scalars(select(Snapshot.id).where(
                    Snapshot.owner_id == pb.owner_id, Snapshot.name == _snapshot_name(pb.id))))
            for sid in taken:
                with contextlib.suppress(DenError):
                    await self.snapshots.delete(sid, actor=ACTOR)
        await self.ahead.recover()

    async def shutdown(self) -> None:
        await self.ahead.shutdown()
        await cancel_and_wait(self._tasks.values())


async def _nothing(_ws_id: str, _spec: WorkspaceSpec) -> None:
    """After the boot of a fork made ahead: nothing yet (a create that takes it runs the
    update and postStartCommand)."""


def _snapshot_name(prebuild_id: str) -> str:
    return f"prebuild {prebuild_id}"


def _shorten(reason: str) -> str:
    """At most REASON_MAX characters: what failed (the head) and the log's last lines."""
    if len(reason) <= REASON_MAX:
        return reason
    return reason[:1024] + "\n…\n" + reason[-(REASON_MAX - 1027):]
