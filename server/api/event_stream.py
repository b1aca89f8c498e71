"""``WS /api/v1/workspaces/{ref}/events/stream``: a workspace's event log, live (state
changes, clone, a devcontainer's build output and lifecycle commands, ...).

The server sends ``{"type": "event", "event": {...}}`` (the objects of ``GET .../events``)
for the events after ``after`` (an event id; 0, the default, starts with the last 500), then
each new one as it is recorded; ``{"type": "error", "error": {...}}`` and close code 4000 +
HTTP status when the workspace is not the caller's; ``{"type": "deleted"}`` when the
workspace is deleted. Messages from the client are ignored. Authentication as for the
terminal (a bearer token, or the session cookie of Den's own pages).
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from server.api.schemas import EventOut
from server.api.streams import send_error
from server.api.terminal import terminal_user
from server.errors import DenError, NotFound

router = APIRouter(prefix="/api/v1/workspaces/{ref}", tags=["workspaces"])

BATCH = 500  # events read at once


@router.websocket("/events/stream")
async def event_stream(websocket: WebSocket, ref: str, after: int = 0) -> None:
    await websocket.accept()
    svc = websocket.app.state.workspaces
    try:
        ws = svc.get_for(terminal_user(websocket), ref)
    except DenError as exc:
        await send_error(websocket, exc)
        return
    closed = asyncio.create_task(_until_closed(websocket))
    try:
        with svc.feed.listen(ws.id) as recorded:
            last = max(after, 0)
            while not closed.done():
                recorded.clear()
                for event in svc.events(ws.id, limit=BATCH, after=last):
                    await websocket.send_json({"type": "event",
                                               "event": EventOut.of(event).model_dump(
                                                   mode="json")})
                    last = event.id
                try:
                    svc.get(ws.id)
                except NotFound:
                    await websocket.send_json({"type": "deleted"})
                    await websocket.close()
                    return
                waiting = asyncio.create_task(recorded.wait())
                await asyncio.wait({waiting, closed}, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
    except WebSocketDisconnect:
        pass
    finally:
        closed.cancel()
        with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
            await closed


async def _until_closed(websocket: WebSocket) -> None:
    """Read (and drop) what the client sends until it goes."""
    while True:
        msg = await websocket.receive()
        if msg["type"] == "websocket.disconnect":
            return
