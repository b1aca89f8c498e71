"""Background processes: start, list, read and follow output, signal."""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Response, WebSocket, WebSocketDisconnect
from pydantic import Field, TypeAdapter, ValidationError

from server.api.deps import CurrentUser, Processes, Workspaces, websocket_user
from server.api.schemas import (
    LogChunkOut,
    ProcessList,
    ProcessLogsOut,
    ProcessOut,
    SignalIn,
    SpawnIn,
    errors,
)
from server.api.streams import relay_output, send_error
from server.errors import DenError, ValidationFailed
from server.runtime.base import StreamChunk
from server.runtime.errors import AgentUnavailable
from server.workspaces.processes import PID_MAX

router = APIRouter(prefix="/api/v1/workspaces/{ref}/processes", tags=["processes"],
                   responses=errors(404, 409, 501, 502, 503, 504))

Pid = Annotated[int, Path(ge=1, le=PID_MAX, description="A pid from the process list")]
_PID = TypeAdapter(Annotated[int, Field(ge=1, le=PID_MAX)])
Stream = Literal["stdout", "stderr"]
_STREAMS: tuple[Stream, ...] = ("stdout", "stderr")


@router.post("", status_code=201, response_model=ProcessOut)
async def spawn_process(ref: str, body: SpawnIn, user: CurrentUser, svc: Workspaces,
                        procs: Processes) -> ProcessOut:
    ws = svc.get_for(user, ref)
    req = procs.spawn_request(ws, body.cmd, cwd=body.cwd, env=body.env)
    pid = await procs.spawn(ws.id, req, log_bytes=body.log_bytes, actor=user.name)
    return ProcessOut.started(pid, req)


@router.get("", response_model=ProcessList)
async def list_processes(ref: str, user: CurrentUser, svc: Workspaces, procs: Processes
                         ) -> ProcessList:
    ws = svc.get_for(user, ref)
    infos = await procs.processes(ws.id, actor=user.name)
    return ProcessList(processes=[ProcessOut.of(info) for info in infos])


@router.get("/{pid}/logs", response_model=ProcessLogsOut)
async def read_logs(ref: str, pid: Pid, user: CurrentUser, svc: Workspaces, procs: Processes
                    ) -> ProcessLogsOut:
    ws = svc.get_for(user, ref)
    info = await procs.process(ws.id, pid, actor=user.name)  # first: exited means complete
    chunks = [c async for c in procs.process_logs(ws.id, pid, follow=False, actor=user.name)]
    return ProcessLogsOut(pid=pid, running=info.running, exit_code=info.exit_code,
                          signal=info.signal, chunks=decode_chunks(chunks))


@router.post("/{pid}/signal", status_code=204)
async def signal_process(ref: str, pid: Pid, body: SignalIn, user: CurrentUser,
                         svc: Workspaces, procs: Processes) -> Response:
    ws = svc.get_for(user, ref)
    await procs.signal(ws.id, pid, body.signal, actor=user.name)
    return Response(status_code=204)


@router.websocket("/{pid}/logs")
async def follow_logs(websocket: WebSocket, ref: str, pid: str) -> None:
    """Protocol: the server sends the output kept so far and then new output as
    ``{"type": "stdout"|"stderr", "data": str}``, and ``{"type": "exit", "exit_code",
    "signal"}`` once the process has exited; errors as in :func:`server.api.streams.serve`.
    Closing the socket stops following (the process runs on)."""
    await websocket.accept()
    try:
        user = websocket_user(websocket)
        try:
            number = _PID.validate_python(pid, strict=False)
        except ValidationError as exc:
            raise ValidationFailed(f"pid must be a number between 1 and {PID_MAX}") from exc
        svc = websocket.app.state.workspaces
        procs = websocket.app.state.processes
        ws = svc.get_for(user, ref)
        await procs.process(ws.id, number, actor=user.name)  # 404 before following
        chunks = procs.process_logs(ws.id, number, follow=True, actor=user.name)
        with websocket.app.state.metrics.session_open("process_logs"):
            if not await relay_output(websocket, chunks):
                return  # the client left
        # Without waking it: a workspace paused meanwhile ends the stream and stays paused.
        info = await procs.process(ws.id, number, actor=user.name, wake=False)
        if info.running:
            raise AgentUnavailable(f"the agent stopped sending the output of process {number}")
        await websocket.send_json({"type": "exit", "exit_code": info.exit_code,
                                   "signal": info.signal})
        await websocket.close()
    except WebSocketDisconnect:
        pass
    except DenError as exc:
        await send_error(websocket, exc)


def decode_chunks(chunks: Iterable[StreamChunk]) -> list[LogChunkOut]:
    """Output as text (UTF-8, invalid bytes replaced, a character split across chunks kept
    whole), neighbouring chunks of the same stream joined."""
    decoders = {n: codecs.getincrementaldecoder("utf-8")("replace") for n in _STREAMS}
    out: list[LogChunkOut] = []

    def add(stream: Stream, text: str) -> None:
        if not text:
            return
        if out and out[-1].stream == stream:
            out[-1].data += text
        else:
            out.append(LogChunkOut(stream=stream, data=text))

    for chunk in chunks:
        stream: Stream = "stderr" if chunk.stream == "stderr" else "stdout"
        add(stream, decoders[stream].decode(chunk.data))
    for name in _STREAMS:  # a character cut off at the very end
        add(name, decoders[name].decode(b"", final=True))
    return out
