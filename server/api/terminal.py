"""``WS /api/v1/workspaces/{ref}/terminal``: the web terminal's interactive shell.

The shell is a tmux session of ``dev`` (``den-web-<session>``) in the repo directory, run
through the workspace's own tmux server (started at boot by den-init, so it survives the
socket, reconnects and even a pause). A WebSocket is one attached tmux client: when it drops,
only the client ends; the next connection re-attaches and tmux repaints the screen. Images
without tmux get a plain login shell, which ends with its connection.
"""

from __future__ import annotations

import re
import shlex

from fastapi import APIRouter, WebSocket

from server.api.deps import user_from_header
from server.api.streams import Opened, serve
from server.db.models import User
from server.errors import Forbidden, Unauthorized, ValidationFailed
from server.web import csrf, sessions
from server.workspaces.states import State

router = APIRouter(prefix="/api/v1/workspaces/{ref}", tags=["terminal"])

SESSION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def tmux_command(session: str) -> str:
    """The shell command that attaches to (or makes) the tmux session ``den-web-<session>``."""
    name = shlex.quote(f"den-web-{session}")
    return (f"if command -v tmux >/dev/null; then exec tmux new-session -A -s {name}; "
            "elif command -v bash >/dev/null; then exec bash -l; else exec sh -l; fi")


def terminal_user(websocket: WebSocket) -> User:
    """A bearer token, or the browser session cookie from one of Den's own pages (the Origin
    check: a cookie alone would let any site open a shell as its visitor)."""
    if websocket.headers.get("authorization"):
        return user_from_header(websocket.app.state, websocket.headers.get("authorization"))
    user = sessions.user_of(websocket, websocket.app.state.sessions)
    if user is None:
        raise Unauthorized("sign in first (session cookie or bearer token)")
    if not csrf.same_origin(websocket, websocket.app.state.settings.public_url, required=True):
        raise Forbidden("cross-site WebSocket refused (Origin is not this server)",
                        code="bad_origin")
    return user


@router.websocket("/terminal")
async def terminal(websocket: WebSocket, ref: str, cols: int = 80, rows: int = 24,
                   session: str = "main") -> None:
    """Query: ``cols``, ``rows`` (initial size), ``session`` (which shell, default ``main``).
    Messages as in :mod:`server.api.streams`; the server first sends ``{"type": "status",
    "state": ..., "message": ...}`` while a paused or stopped workspace wakes, and ends with
    ``{"type": "exit", "exit_code": int}`` when the shell (or its tmux client) ends, or
    ``{"type": "error", "error": {...}}`` and close code 4000 + HTTP status."""
    async def start() -> Opened:
        user = terminal_user(websocket)
        svc = websocket.app.state.workspaces
        ws = svc.get_for(user, ref)
        if SESSION_RE.fullmatch(session) is None:
            raise ValidationFailed("session must be 1-32 lowercase letters, digits or '-'")
        size = (min(max(cols, 2), 1000), min(max(rows, 2), 1000))
        if ws.state != State.RUNNING.value:
            await websocket.send_json({"type": "status", "state": ws.state,
                                       "message": f"waking the workspace ({ws.state})"})
        req = svc.shell_request(ws, tmux_command(session), tty=True, size=size)
        slot = svc.quotas.take(user, "terminals")
        try:
            stream = await svc.exec_stream(ws.id, req, actor=user.name)
        except BaseException:
            slot.release()
            raise
        return Opened(ws.id, stream, greeting={"type": "status", "state": "running",
                                               "message": "connected"}, slot=slot)

    await serve(websocket, start, kind="terminal")
