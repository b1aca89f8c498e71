"""Background processes on the microVM backend (server/runtime/base.py's ProcessControl):
the same agent operations as the Docker backend's (``spawn``, ``ps``, ``logs``, ``signal``,
server/agent/ops.py), over the VM's virtio-serial port. A process started here is a child of
the guest's agent (PID 1), so it keeps running across a pause and resume (the guest's memory
is saved and loaded whole) and is inherited by a fork of a memory snapshot; a stop ends it.
Mixed into :class:`~.backend.MicroVmRuntime`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from server.agent import ops as agent_ops
from server.agent.session import AgentSession
from server.runtime.base import ExecRequest, ProcessInfo, StreamChunk, WorkspaceSpec


class _Vm(Protocol):
    """What the mixin uses of the backend."""

    def _env(self, spec: WorkspaceSpec, req: ExecRequest) -> dict[str, str]: ...

    def _answering(self, spec: WorkspaceSpec) -> AbstractAsyncContextManager[None]: ...

    async def _session(self, spec: WorkspaceSpec, *, boot: bool = False) -> AgentSession: ...


class VmProcesses:
    """ProcessControl through the VM's agent. A guest whose agent does not answer is the
    same 504 ``agent_timeout`` as an exec's (backend.py ``_answering``)."""

    async def spawn(self: _Vm, spec: WorkspaceSpec, req: ExecRequest, *, log_bytes: int
                    ) -> int:
        async with self._answering(spec):
            return await agent_ops.spawn(await self._session(spec), req, self._env(spec, req),
                                         log_bytes=log_bytes)

    async def processes(self: _Vm, spec: WorkspaceSpec) -> list[ProcessInfo]:
        async with self._answering(spec):
            return await agent_ops.processes(await self._session(spec))

    async def process_logs(self: _Vm, spec: WorkspaceSpec, pid: int, *, follow: bool
                           ) -> AsyncIterator[StreamChunk]:
        session = await self._session(spec)
        async for chunk in agent_ops.logs(session, pid, follow=follow):
            yield chunk

    async def signal(self: _Vm, spec: WorkspaceSpec, pid: int, signal: str) -> None:
        async with self._answering(spec):
            await agent_ops.signal(await self._session(spec), pid, signal)
