"""Running commands: one-shot exec, and streaming exec over a WebSocket."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, WebSocket
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from server.api.deps import CurrentUser, Workspaces, websocket_user
from server.api.exec_body import exec_response, spooled
from server.api.schemas import ExecIn, ExecOut, ExecStreamIn, errors
from server.api.streams import Opened, serve
from server.errors import ValidationFailed

router = APIRouter(prefix="/api/v1/workspaces/{ref}", tags=["exec"])


@router.post("/exec", response_model=ExecOut, responses=errors(404, 409, 429, 502, 503, 504))
async def exec_command(ref: str, body: ExecIn, user: CurrentUser, svc: Workspaces
                       ) -> StreamingResponse:
    ws = svc.get_for(user, ref)
    stdin = body.stdin.encode() if body.stdin is not None else None
    req = spooled(svc.exec_request(ws, body.cmd, cwd=body.cwd, env=body.env,
                                   timeout_s=body.timeout_s, stdin=stdin),
                  svc.settings.data_dir)
    with svc.quotas.take(user, "execs"):  # before the server's gate: one user cannot fill it
        r = await svc.exec(ws.id, req, actor=user.name, current=ws)
    return exec_response(r)  # the ExecOut document, encoded as it is sent


@router.websocket("/exec/stream")
async def exec_stream(websocket: WebSocket, ref: str) -> None:
    """Protocol: the client sends the exec request as its first JSON message, then the
    messages of :mod:`server.api.streams` (stdin, close_stdin, resize with ``tty``). The
    server sends stdout/stderr messages (binary frames with ``"binary": true``) and finally
    ``{"type": "exit", "exit_code": int}``, or ``{"type": "error", "error": {...}}``."""
    async def start() -> Opened:
        user = websocket_user(websocket)
        svc = websocket.app.state.workspaces
        ws = svc.get_for(user, ref)
        try:
            body = ExecStreamIn.model_validate(await websocket.receive_json())
        except (ValidationError, ValueError, RecursionError, KeyError) as exc:
            raise ValidationFailed(f"the first message must be an exec request: {exc}") from exc
        req = svc.exec_request(ws, body.cmd, cwd=body.cwd, env=body.env,
                               timeout_s=body.timeout_s)
        if body.tty:
            req = dataclasses.replace(req, tty=True, size=(body.cols, body.rows))
        slot = svc.quotas.take(user, "streams")
        try:
            stream = await svc.exec_stream(ws.id, req, actor=user.name)
        except BaseException:
            slot.release()
            raise
        return Opened(ws.id, stream, stdin=body.stdin, slot=slot, binary=body.binary)

    await serve(websocket, start)
