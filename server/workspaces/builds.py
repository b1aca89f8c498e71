"""Creates and forks running in the background, and a delete that comes while one runs.

A delete cancels the workspace's build, but the engine call the build was awaiting runs on in
its thread (server/runtime/inflight.py): a fork's copy helper went on copying into the new
volume for 48 s after the delete, whose volume removal then failed ("volume is in use"), and
the workspace went to ``error`` with its volume left behind. So each build runs with a
:class:`~server.runtime.inflight.Calls` of its own, and :meth:`Builds.stop` waits for the
calls its cancellation left running before the delete touches the engine: it removes the
workspace's copy helpers (Den's own containers, labelled with the workspace and role
``copy``) so that a copy ends at once, and waits at most :data:`SETTLE_S`. Whatever such a
call made before it ended is the workspace's and goes with the delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from server.errors import Conflict, DenError
from server.runtime import inflight
from server.runtime.base import ROLE_COPY
from server.tasks import cancel_and_wait
from server.workspaces.part import ServicePart
from server.workspaces.states import State

if TYPE_CHECKING:
    from server.workspaces.service import WorkspaceService

log = logging.getLogger(__name__)

SETTLE_S = 60.0  # how long a delete waits for the engine calls of a cancelled build
SWEEP_S = 1.0  # how often it removes copy helpers meanwhile (a call may start one late)


class Builds(ServicePart):
    """The workspace service's builds in the background (``svc._tasks``) and their calls."""

    def __init__(self, svc: WorkspaceService) -> None:
        super().__init__(svc)
        self._calls: dict[str, inflight.Calls] = {}

    def spawn(self, ws_id: str, work: Coroutine[Any, Any, None]) -> None:
        """Run a workspace's build in the background, its engine calls tracked."""
        calls = inflight.Calls()
        task = asyncio.create_task(work, name=f"build-{ws_id}",
                                   context=inflight.tracking(calls))
        self.svc._tasks[ws_id] = task
        self._calls[ws_id] = calls

        def ended(_task: asyncio.Task[None]) -> None:
            self.svc._tasks.pop(ws_id, None)
            if not calls.pending and self._calls.get(ws_id) is calls:
                del self._calls[ws_id]

        task.add_done_callback(ended)

    def pending(self, ws_id: str) -> bool:
        """Whether engine calls of the workspace's cancelled build still run."""
        calls = self._calls.get(ws_id)
        return calls is not None and calls.pending > 0

    async def stop(self, ws_id: str, *, actor: str) -> None:
        """End the workspace's build, if one runs, before a delete: cancel it, then wait for
        the engine calls it left running (their copy helpers removed). Conflict when they
        still run after :data:`SETTLE_S`; the workspace is then in ``error`` and a delete
        again finishes it."""
        task = self.svc._tasks.get(ws_id)
        if task is not None:
            await cancel_and_wait([task])
        calls = self._calls.get(ws_id)
        if calls is None:
            return
        deadline = time.monotonic() + SETTLE_S
        while calls.pending:
            await self._remove_copy_helpers(ws_id)
            left = deadline - time.monotonic()
            if left <= 0:
                why = (f"deleted while being created, but an engine step of its create has "
                       f"not ended after {SETTLE_S:g} s; delete it again")
                with contextlib.suppress(Conflict):
                    self.ledger.transition(ws_id, State.CREATING, State.ERROR, actor=actor,
                                           reason=why)
                raise Conflict(f"the workspace's create was stopped, but an engine step of "
                               f"it has not ended after {SETTLE_S:g} s; delete it again in "
                               "a minute", code="delete_pending")
            await calls.settled(min(SWEEP_S, left))
        if self._calls.get(ws_id) is calls:
            del self._calls[ws_id]

    async def _remove_copy_helpers(self, ws_id: str) -> None:
        """Den's copy helpers working for the workspace: removed, their copies end."""
        try:
            objects = await self.runtime.list_objects(self.svc.instance_id)
        except DenError as exc:
            log.info("workspace %s: copy helpers not listed: %s", ws_id, exc.message)
            return
        for obj in objects:
            if obj.kind == "container" and obj.role == ROLE_COPY and obj.workspace_id == ws_id:
                log.info("workspace %s: removing copy helper %s (deleted while creating)",
                         ws_id, obj.name)
                with contextlib.suppress(DenError):
                    await self.runtime.remove_object(obj)
