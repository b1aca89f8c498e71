"""Following the engine: what the engine says happened to a workspace's container (it died,
the OOM killer hit it, someone started it outside Den) becomes, through the ledger, the
workspace's state and an event saying why, within seconds (the supervisor feeds the events:
server/workspaces/supervisor.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from server.db.models import Workspace
from server.errors import DenError
from server.runtime.base import ContainerStatus, EngineEvent, EngineEventKind, names
from server.tasks import cancel_and_wait
from server.workspaces.part import ServicePart
from server.workspaces.states import Sleep, State

if TYPE_CHECKING:
    from server.workspaces.service import WorkspaceService

OOM_MEMORY = 1024  # workspaces whose "oom" event waits for its "die"
OOM_MEMORY_S = 60.0  # an "oom" this old no longer explains a "die"

log = logging.getLogger(__name__)


class EngineFollower(ServicePart):
    """Applies engine events to the workspaces of :class:`WorkspaceService`."""

    def __init__(self, svc: WorkspaceService) -> None:
        super().__init__(svc)
        self._oom: dict[str, float] = {}  # workspace -> when the engine last said "oom"
        # workspace -> its latest "die" or "start" that came during an operation of Den's
        # own, and the task that applies it once the operation has ended (one per workspace)
        self._deferred: dict[str, EngineEvent] = {}
        self._waiters: dict[str, asyncio.Task[None]] = {}

    async def apply(self, event: EngineEvent) -> None:
        """Follow what the engine says happened to a workspace's container (a container
        that died, was OOM-killed, or was started from outside Den), so that the state
        matches the engine within seconds and the event log says why. Ignored: events of
        another container than the workspace's current one, and anything the engine's
        current status contradicts (events may come late or twice). An event that comes
        while Den's own operation on the workspace runs waits for it to end, then is checked
        against what it left (a pause or stop that made the container exit has settled the
        state by then: nothing to change; a container that died just after a create's
        transition, while the build was still cleaning up, was missed until the next
        reconcile when such events were dropped)."""
        ws_id = event.workspace_id
        if event.kind is EngineEventKind.OOM:
            before = self._oom.pop(ws_id, None)
            if len(self._oom) >= OOM_MEMORY:  # bounded: the oldest goes
                self._oom.pop(next(iter(self._oom)))
            self._oom[ws_id] = now = time.monotonic()
            if before is None or now - before >= OOM_MEMORY_S:  # one note a minute at most
                self._note_oom(ws_id)
            return
        if event.kind is EngineEventKind.NOTE:
            with self.sessions() as s:
                if s.get(Workspace, ws_id) is None:
                    return
            self.ledger.note(ws_id, "engine", event.detail, actor="engine")
            return
        if event.kind not in (EngineEventKind.DIE, EngineEventKind.START):
            return
        if self.svc.busy(ws_id):
            self._defer(event)
            return
        await self.svc.networks.sync(ws_id)  # the container's address came or went
        await self._follow(event)

    async def _follow(self, event: EngineEvent) -> bool:
        """The state ``event`` and the engine's current status call for; whether it changed."""
        ws_id = event.workspace_id
        async with self.svc.locked(ws_id):
            with self.sessions() as s:
                ws = s.get(Workspace, ws_id)
            if ws is None:
                return False
            spec = self.svc.spec_for(ws)
            if event.container not in names(spec.handle):
                return False
            state = State(ws.state)
            frozen = state is State.PAUSED and ws.sleep == Sleep.FROZEN.value
            if event.kind is EngineEventKind.DIE and (state is State.RUNNING or frozen):
                if (await self.runtime.status(spec)).alive:
                    return False  # an older container's death, or restarted since
                oom_at = self._oom.pop(ws_id, None)
                oom = oom_at is not None and time.monotonic() - oom_at < OOM_MEMORY_S
                why = event.detail or \
                    f"the container exited ({describe_exit(event.exit_code, oom=oom)})"
                self.ledger.transition(ws_id, state, State.STOPPED, actor="engine",
                                       message=f"{why}; it starts again on the next access")
                return True
            if event.kind is EngineEventKind.START and state in (State.STOPPED, State.PAUSED):
                if await self.runtime.status(spec) is not ContainerStatus.RUNNING:
                    return False
                if state is State.PAUSED:
                    self.ledger.transition(ws_id, state, State.RESUMING, actor="engine")
                    state = State.RESUMING
                self.ledger.transition(ws_id, state, State.RUNNING, actor="engine",
                                       message="the container was started outside Den")
                return True
            return False

    def _defer(self, event: EngineEvent) -> None:
        """Apply ``event`` once no operation of Den's runs on its workspace. Only the latest
        event of a workspace is kept (it is checked against the engine's status then, which
        is what counts), so this holds at most one event and one task per workspace."""
        ws_id = event.workspace_id
        self._deferred[ws_id] = event
        if ws_id not in self._waiters:
            self._waiters[ws_id] = asyncio.get_running_loop().create_task(
                self._when_idle(ws_id), name=f"engine-event-{ws_id}")

    async def _when_idle(self, ws_id: str) -> None:
        try:
            await self.svc.idle(ws_id)
        finally:
            del self._waiters[ws_id]
        event = self._deferred.pop(ws_id, None)
        if event is None:
            return
        if self.svc.busy(ws_id):  # another operation began meanwhile
            self._defer(event)
            return
        try:
            # Den's own operation synced the firewall as it ended (every start, stop, pause
            # and resume does): a sync here only when the event changed the state (one per
            # pause otherwise, ~6 iptables processes each, for nothing)
            if await self._follow(event):
                await self.svc.networks.sync(ws_id)
        except DenError as exc:
            log.info("engine event %s of workspace %s not applied: %s", event.kind, ws_id,
                     exc.message)

    def waiting(self) -> int:
        """How many workspaces have an event waiting for an operation to end."""
        return len(self._deferred)

    async def settled(self) -> None:
        """Wait until no event waits (tests; the service's shutdown cancels them instead)."""
        while self._waiters:
            await asyncio.wait(set(self._waiters.values()))

    async def close(self) -> None:
        """Drop the waiting events (a restart reconciles with the engine anyway)."""
        await cancel_and_wait(self._waiters.values())
        self._deferred.clear()

    def _note_oom(self, ws_id: str) -> None:
        """The host's OOM killer hit the sandbox. Under gVisor it usually ends one process of
        the workspace and the sandbox lives on (the engine sends no "die"), so the event log
        is the only place that says why that process vanished."""
        with self.sessions() as s:
            ws = s.get(Workspace, ws_id)
        if ws is None:
            return
        self.ledger.note(ws_id, "oom", f"the workspace reached its memory limit ({ws.memory_mb} MB "
                         "plus the sandbox's headroom): the host's out-of-memory killer ended a "
                         "process", actor="engine")



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
