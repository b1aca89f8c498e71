"""One fork of each ready prebuild, made ahead and frozen, for the owner's next create.

A fork of a prebuild costs its disk copy and its memory restore (1.5-4 s on this shared
machine, docs/benchmarks.md); a create should not wait for either. So once a prebuild is
``ready``, a fork of it is made in the background, exactly as a create would fork it, and
frozen (the cgroup freezer of the frozen sleep tier: no CPU, memory kept). It is a workspace
row of the prebuild's owner, hidden like the prebuild's build workspace (``prebuild_id``
set, named ``prebuild-<hex>-next``), ``keep_alive`` (the reaper leaves it frozen), and it
counts toward the owner's limits.

The owner's next create that would fork from the prebuild with the same resources
*claims* it instead: in one ledger transaction (:meth:`Ledger.claim`) the row takes the
request's name, environment, network policy and idle settings, stops being hidden and goes
``paused`` -> ``creating``. Then, under the workspace's lock: the request's network policy
is put in force while it is still frozen, it is thawed, given its own host name (``Rehost``),
brought up to the branch's head (beside the host name) and runs postStartCommand (what the
prebuild's ``then`` does), and is ``running``. A replacement fork is made afterwards.

Races and crashes. Two creates racing for one fork: the ledger's compare-and-set lets one
win; the other forks as usual. A claim racing the prebuild's delete: the delete marks the
prebuild as going before it lists its forks, and a claim checks that mark and commits with
no ``await`` in between, so a fork is either claimed (the delete no longer sees it) or
deleted (never claimed). A ``kill -9`` leaves the row hidden and ``paused`` (not claimed) or
claimed and ``creating`` (reconcile removes its sandbox and records ``error``), never both;
:meth:`ForksAhead.recover` at startup removes hidden forks that are not frozen and waiting
(cut short while being made) and makes the missing ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Coroutine, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from server.db.models import Prebuild, User, Workspace
from server.errors import Conflict, DenError
from server.prebuilds.matching import READY
from server.runtime.base import Checkpoints, Freezer, Rehost, WorkspaceSpec
from server.tasks import cancel_and_wait
from server.workspaces.prebuild_seam import PrebuildUse
from server.workspaces.service import CreateRequest, check_name_free
from server.workspaces.states import Sleep, State

if TYPE_CHECKING:
    from server.prebuilds.service import PrebuildService

log = logging.getLogger(__name__)

ACTOR = "prebuild"
# What a fork made ahead must have as the create asks, or the create forks as usual.
MATCHED = ("repo_url", "repo_branch", "repo_dir", "image", "runtime", "cpus", "memory_mb",
           "disk_gb", "gpus", "devcontainer")
# What a claim writes from the create's fields (besides its name and creation time).
CLAIMED = ("env", "network", "idle_timeout_s", "stop_after_s", "keep_alive", "gpu_model")


def fork_name(prebuild_id: str) -> str:
    """The hidden fork's name (a workspace name; the owner never sees it listed)."""
    return f"prebuild-{prebuild_id.removeprefix('pb')}-next"


def fits(row: Workspace, fields: Mapping[str, Any]) -> str | None:
    """Why a create with these row fields cannot take the fork ``row``, or None."""
    for key in MATCHED:
        if getattr(row, key) != fields.get(key):
            return f"its {key} differs"
    return None


def claim_values(name: str, fields: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The fields a claim writes into the fork's row."""
    return {"name": name, "created_at": now, **{k: fields[k] for k in CLAIMED if k in fields}}


class ForksAhead:
    """The forks made ahead of the prebuilds of :class:`PrebuildService`."""

    def __init__(self, prebuilds: PrebuildService) -> None:
        self.prebuilds = prebuilds
        self.svc = prebuilds.workspaces
        self._making: dict[str, asyncio.Task[None]] = {}
        # One fork made at a time (each copies a snapshot and restores its memory): at a
        # start with many prebuilds they queue instead of loading the host all at once.
        self._one_at_a_time = asyncio.Semaphore(1)

    @property
    def enabled(self) -> bool:
        rt = self.svc.runtime
        return (self.svc.settings.prebuild_fork_ahead and isinstance(rt, Freezer)
                and isinstance(rt, Checkpoints))

    # --- reading ----------------------------------------------------------------------

    def forks(self, prebuild_id: str) -> list[Workspace]:
        """The prebuild's forks made ahead, in any state (at most one, but a crash)."""
        with self.svc.sessions() as s:
            return list(s.scalars(select(Workspace).where(
                Workspace.prebuild_id == prebuild_id,
                Workspace.name == fork_name(prebuild_id))))

    def waiting(self, prebuild_id: str) -> Workspace | None:
        """The prebuild's fork that is frozen and waiting for a create, if any."""
        for ws in self.forks(prebuild_id):
            if ws.state == State.PAUSED.value and ws.sleep == Sleep.FROZEN.value:
                return ws
        return None

    # --- making one -------------------------------------------------------------------

    def replenish(self, prebuild_id: str) -> None:
        """Make the prebuild's fork in the background, unless there is one or one is being
        made (or the backend cannot freeze memory)."""
        if not self.enabled or prebuild_id in self._making:
            return
        task = asyncio.create_task(self._make(prebuild_id), name=f"fork-ahead-{prebuild_id}")
        self._making[prebuild_id] = task
        task.add_done_callback(lambda _t: self._making.pop(prebuild_id, None))

    async def _make(self, prebuild_id: str) -> None:
        async with self._one_at_a_time:
            await self._make_one(prebuild_id)

    async def _make_one(self, prebuild_id: str) -> None:
        pbs, svc = self.prebuilds, self.svc
        ws_id: str | None = None
        try:
            pb = pbs.get(prebuild_id)
            if pb.state != READY or pbs.deleting(prebuild_id) or self.forks(prebuild_id):
                return
            with svc.sessions() as s:
                owner = s.get(User, pb.owner_id)
            if owner is None:
                return
            ws = await svc.create(owner, CreateRequest(
                name=fork_name(prebuild_id), repo_url=pb.repo_url, branch=pb.branch or None,
                keep_alive=True, for_prebuild=prebuild_id), prebuilds=_Only(pbs, pb))
            ws_id = ws.id
            ws = await svc.built(ws_id)
            if ws.state != State.RUNNING.value:
                raise Conflict(ws.state_reason or f"it is {ws.state}")
            if pbs.deleting(prebuild_id):
                raise Conflict("the prebuild is being deleted")
            ws = await svc.freeze(ws_id, actor=ACTOR)
            if ws.state != State.PAUSED.value or ws.sleep != Sleep.FROZEN.value:
                raise Conflict(f"it is {ws.state} ({ws.sleep}), not frozen")
            log.info("prebuild %s: fork %s made ahead", prebuild_id, ws_id)
            ws_id = None  # kept
        except DenError as exc:  # a limit reached, the prebuild deleted meanwhile
            log.info("prebuild %s: no fork made ahead: %s", prebuild_id, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("prebuild %s: making a fork ahead failed", prebuild_id)
        finally:
            if ws_id is not None:
                with contextlib.suppress(Exception):
                    await svc.delete(ws_id, actor=ACTOR)

    # --- taking one -------------------------------------------------------------------

    def claim(self, pb: Prebuild, use: PrebuildUse, user: User, name: str,
              fields: Mapping[str, Any]) -> tuple[str, Coroutine[Any, Any, None]] | None:
        """Take the prebuild's waiting fork for this create (the seam's ``claim``): its id
        and the work that brings it up; None when there is none that fits. Synchronous from
        the deleting check to the ledger's commit (see the module doc)."""
        if not self.enabled or self.prebuilds.deleting(pb.id) or pb.owner_id != user.id:
            return None
        row = self.waiting(pb.id)
        if row is None or fits(row, fields) is not None:
            return None

        taken = self.svc.ledger.claim(
            row.id, made_for=pb.id, values=claim_values(name, fields, datetime.now(UTC)),
            check=functools.partial(check_name_free, owner_id=user.id, name=name,
                                    besides=row.id), actor=user.name,
            message=f"{use.message_prefix} {fields['repo_url']}: took the fork made ahead "
                    f"of it ({row.name})")
        if not taken:
            return None
        return row.id, self._wake(row.id, was=row.name, pb=pb)

    async def _wake(self, ws_id: str, *, was: str, pb: Prebuild) -> None:
        svc = self.svc
        spec = svc.spec_for(svc.get(ws_id))
        try:
            async with svc.metrics.operation("fork"), svc.locked(ws_id):
                started = time.monotonic()
                await svc.networks.sync(ws_id)  # the request's policy, before it runs again
                assert isinstance(svc.runtime, Freezer)
                await svc.runtime.thaw(spec)
                thawed = time.monotonic() - started
                # the host clone that checks the branch's head beside the new host name;
                # postStartCommand after both (it may read either)
                await self.prebuilds.after_fork(pb, ws_id, spec,
                                                beside=self._rehost(spec, was=was))
                svc.ledger.transition(
                    ws_id, State.CREATING, State.RUNNING, actor="system",
                    message=f"running from the fork of prebuild {pb.id} made ahead (with its "
                            f"memory and processes; thawed in {thawed:.3f} s)")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await svc.creation_failed(ws_id, spec, exc)
        finally:
            self.replenish(pb.id)

    async def _rehost(self, spec: WorkspaceSpec, *, was: str) -> None:
        """The workspace's own host name (the fork was named ``was``); a failure leaves it
        running under the old one, and the event log says so."""
        if not isinstance(self.svc.runtime, Rehost):
            return
        try:
            await self.svc.runtime.set_hostname(spec, spec.hostname, was=was)
        except DenError as exc:
            self.svc.note(spec.workspace_id, "prebuild",
                          f"the host name is still {was!r}: {exc.message}")

    # --- removing, server start and stop ---------------------------------------------

    async def remove(self, prebuild_id: str) -> None:
        """Delete the prebuild's forks made ahead (the prebuild goes; the caller has marked
        it as deleting, so no create takes one from here on). A fork being made is let
        finish first, not cancelled: a cancelled fork leaves its disk copy running in a
        thread, which could make engine objects after the delete removed the others."""
        if (task := self._making.get(prebuild_id)) is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(task)
        for ws in self.forks(prebuild_id):
            await self.svc.delete(ws.id, actor=ACTOR)

    async def recover(self) -> None:
        """At startup, after reconcile: a fork cut short while being made (``error``, or
        not frozen) goes, and every ready prebuild gets its fork again."""
        with self.svc.sessions() as s:
            ready = list(s.scalars(select(Prebuild.id).where(Prebuild.state == READY)))
        for pid in ready:
            for ws in self.forks(pid):
                if not (ws.state == State.PAUSED.value and ws.sleep == Sleep.FROZEN.value):
                    log.info("prebuild %s: removing fork %s left %s", pid, ws.id, ws.state)
                    with contextlib.suppress(DenError):
                        await self.svc.delete(ws.id, actor=ACTOR)
            self.replenish(pid)

    async def shutdown(self) -> None:
        await cancel_and_wait(self._making.values())


class _Only:
    """A PrebuildFinder that answers one prebuild, for the fork made ahead of it (no update
    and no postStartCommand: they run when a create claims it)."""

    def __init__(self, prebuilds: PrebuildService, pb: Prebuild) -> None:
        self.prebuilds = prebuilds
        self.pb = pb

    async def find(self, user: User, fields: Mapping[str, Any], req: CreateRequest
                   ) -> PrebuildUse | None:
        use = self.prebuilds.use_of(self.pb, fields, ahead=True)
        if use is None:  # deleted meanwhile: no fork, and never a build from scratch
            raise Conflict(f"prebuild {self.pb.id} is being deleted")
        return use
