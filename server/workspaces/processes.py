"""Background processes: commands started through the workspace's agent that outlive the
request that started them.

A spawned process is a child of the agent inside the workspace (docs/agent.md), so it keeps
running, same pid and memory, across pause and resume; a stop ends it. Its output goes to a
ring buffer in the agent that :meth:`ProcessService.process_logs` reads. Backends whose
workspaces run no agent lack :class:`~server.runtime.base.ProcessControl`: every call then
answers 501 ``no_agent`` before the workspace is woken.

Like exec, every call wakes a paused or stopped workspace. Starting, signalling and
following a process count as activity; listing and reading logs do not (a monitor polling
them does not keep a workspace awake).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shlex
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

from server.db.models import Workspace
from server.errors import Conflict, DenError, NotFound, ValidationFailed
from server.runtime.base import (
    SIGNALS,
    ExecRequest,
    ProcessControl,
    ProcessInfo,
    StreamChunk,
    WorkspaceSpec,
)
from server.workspaces.service import WorkspaceService
from server.workspaces.states import State

LOG_BYTES_DEFAULT = 1024 * 1024  # the agent's own default ring size
LOG_BYTES_MIN = 1024
LOG_BYTES_MAX = 16 * 1024 * 1024
PID_MAX = 2**31 - 1
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_SHELLS = (("bash", "-c"), ("sh", "-c"), ("bash", "-lc"))


class NoAgent(DenError):
    """The workspace's runtime backend has no agent, so no background processes."""

    status_code = 501
    code = "no_agent"


def command_word(argv: Sequence[str]) -> str:
    """What names a command in the event log: ``argv[0]``, or for ``bash -c STRING`` the
    first word of STRING after any ``NAME=value`` assignments. Never an environment value."""
    words: list[str] = list(argv[:1])
    if tuple(argv[:2]) in _SHELLS and len(argv) > 2:
        try:
            words = shlex.split(argv[2])
        except ValueError:
            words = argv[2].split()
        words = [w for w in words if not _ASSIGNMENT.match(w)]
    word = words[0].partition("=")[0] if words else ""
    return word[:80] or "?"


class ProcessService:
    """Background processes of a workspace, through the workspace service and its runtime."""

    def __init__(self, workspaces: WorkspaceService) -> None:
        self.workspaces = workspaces

    def _control(self) -> ProcessControl:
        runtime = self.workspaces.runtime
        if not isinstance(runtime, ProcessControl):
            backend = self.workspaces.settings.backend
            raise NoAgent(f"this server's backend ({backend}) does not support background "
                          "processes; run the command in a terminal or with exec instead")
        return runtime

    async def _running(self, ws_id: str, actor: str, *, wake: bool = True
                       ) -> tuple[ProcessControl, WorkspaceSpec]:
        control = self._control()
        if wake:
            ws = await self.workspaces.ensure_running(ws_id, actor=actor)
        else:
            ws = self.workspaces.get(ws_id)
            if ws.state != State.RUNNING:
                raise Conflict(f"workspace is {ws.state}, not running")
        return control, self.workspaces.spec_for(ws)

    def spawn_request(self, ws: Workspace, cmd: str | Sequence[str], *, cwd: str | None = None,
                      env: dict[str, str] | None = None) -> ExecRequest:
        """The request for ``cmd``, validated as an exec's, with no stdin and no deadline."""
        req = self.workspaces.exec_request(ws, cmd, cwd=cwd, env=env)
        return dataclasses.replace(req, timeout_s=None, stdin=None)

    async def spawn(self, ws_id: str, req: ExecRequest, *, log_bytes: int = LOG_BYTES_DEFAULT,
                    actor: str) -> int:
        """Start ``req`` in the background; its pid."""
        if not LOG_BYTES_MIN <= log_bytes <= LOG_BYTES_MAX:
            raise ValidationFailed(
                f"log_bytes must be between {LOG_BYTES_MIN} and {LOG_BYTES_MAX}")
        control, spec = await self._running(ws_id, actor)
        try:
            pid = await control.spawn(spec, req, log_bytes=log_bytes)
        finally:
            self.workspaces.touch(ws_id)
        self.workspaces.note(ws_id, "process",
                             f"process {pid} ({command_word(req.argv)}) started", actor=actor)
        return pid

    async def processes(self, ws_id: str, *, actor: str, wake: bool = True
                        ) -> list[ProcessInfo]:
        """The processes the agent remembers: running ones and the last exited ones. With
        ``wake=False`` a workspace that is not running is a Conflict instead."""
        control, spec = await self._running(ws_id, actor, wake=wake)
        return await control.processes(spec)

    async def process(self, ws_id: str, pid: int, *, actor: str, wake: bool = True
                      ) -> ProcessInfo:
        """One of :meth:`processes`; NotFound when the agent does not know ``pid``."""
        _check_pid(pid)
        return _find(await self.processes(ws_id, actor=actor, wake=wake), pid)

    async def process_logs(self, ws_id: str, pid: int, *, follow: bool, actor: str
                           ) -> AsyncGenerator[StreamChunk, None]:
        """The output kept by the agent, then, with ``follow``, new output until the process
        exits; while following, the workspace counts as busy. Close it (``aclose``) to stop
        following early: that closes the runtime's stream too."""
        _check_pid(pid)
        control, spec = await self._running(ws_id, actor)
        if not follow:
            async with _closing(control.process_logs(spec, pid, follow=False)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        try:
            async with (self.workspaces.activity.hold(ws_id),
                        _closing(control.process_logs(spec, pid, follow=True)) as chunks):
                async for chunk in chunks:
                    yield chunk
        finally:
            self.workspaces.touch(ws_id)

    async def signal(self, ws_id: str, pid: int, signal: str, *, actor: str) -> None:
        """Send ``signal`` (one of SIGNALS) to the process's group."""
        if signal not in SIGNALS:
            raise ValidationFailed(f"signal must be one of {', '.join(SIGNALS)}")
        _check_pid(pid)
        control, spec = await self._running(ws_id, actor)
        info = _find(await control.processes(spec), pid)  # a 404 first, and its name
        try:
            await control.signal(spec, pid, signal)
        finally:
            self.workspaces.touch(ws_id)
        self.workspaces.note(ws_id, "process",
                             f"process {pid} ({command_word(info.argv)}) sent {signal}",
                             actor=actor)


@contextlib.asynccontextmanager
async def _closing(chunks: AsyncIterator[StreamChunk]
                   ) -> AsyncIterator[AsyncIterator[StreamChunk]]:
    """``chunks``, closed on the way out when it is a generator (the runtime's channel
    ends at once instead of when the garbage collector gets to it)."""
    try:
        yield chunks
    finally:
        if isinstance(chunks, AsyncGenerator):
            await chunks.aclose()


def _find(infos: list[ProcessInfo], pid: int) -> ProcessInfo:
    for info in infos:
        if info.pid == pid:
            return info
    raise NotFound(f"no process {pid} started through Den in this workspace")


def _check_pid(pid: int) -> None:
    if not 1 <= pid <= PID_MAX:
        raise ValidationFailed(f"pid must be between 1 and {PID_MAX}")
