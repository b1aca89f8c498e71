"""Relaying a running process to a WebSocket: shared by the streaming exec, the terminal and
the output of background processes.

Client to server: binary frames are raw input; text frames are JSON ``{"type": "stdin",
"data": str}``, ``{"type": "close_stdin"}``, ``{"type": "signal", "signal": "INT"}`` (one of
``SIGNALS``, to the process's group) or ``{"type": "resize", "cols": int, "rows":
int}`` (anything else is ignored). Server to client: ``{"type": "stdout"|"stderr", "data":
str}`` (UTF-8 decoded incrementally, so a character split across reads arrives whole), or,
where the client asked for ``binary``, binary frames whose first byte says the stream (1
stdout, 2 stderr) and whose rest is the output's bytes: no decoding, no JSON escaping.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect

from server.agent.ops import StreamEnded
from server.errors import DenError
from server.quotas.service import Slot
from server.runtime.base import SIGNALS, ExecStream, StreamChunk

ENDINGS = ("paused", "stopped")  # sent as {"type": "paused"} and {"type": "stopped"}
BINARY_STREAMS = {"stdout": b"\x01", "stderr": b"\x02"}  # the first byte of a binary frame


@dataclass
class Opened:
    """A process ``serve`` relays: its workspace, input to write and a message to send
    before relaying."""

    workspace_id: str
    stream: ExecStream
    stdin: str | None = None
    greeting: dict[str, Any] | None = None
    slot: Slot | None = None  # the user's stream or terminal, released when it ends
    binary: bool = False  # output as binary frames (BINARY_STREAMS), not JSON messages


async def serve(websocket: WebSocket, start: Callable[[], Awaitable[Opened]], *,
                kind: str = "exec_stream") -> None:
    """Accept the socket, ``start`` the process (authorization, validation and waking are
    ``start``'s), relay it while it keeps the workspace awake, and end with ``{"type":
    "exit", "exit_code": int}``, or ``{"type": "paused", "reason"}`` (or ``stopped``) when the
    workspace went to sleep under it. A DenError, before or during, ends it with ``{"type":
    "error", "error": {"code", "message"}}`` and close code 4000 + its HTTP status. The
    process is killed whenever the socket ends first. While it relays, it counts as an open
    session of ``kind`` in the metrics."""
    await websocket.accept()
    opened: Opened | None = None
    try:
        opened = await start()
        if opened.greeting is not None:
            await websocket.send_json(opened.greeting)
        activity = websocket.app.state.workspaces.activity
        with websocket.app.state.metrics.session_open(kind):
            async with activity.hold(opened.workspace_id):
                code = await relay(websocket, opened.stream, stdin=opened.stdin,
                                   binary=opened.binary)
        await websocket.send_json({"type": "exit", "exit_code": code})
        await websocket.close()
    except WebSocketDisconnect:
        pass
    except StreamEnded as exc:  # the workspace paused or stopped under the stream
        with contextlib.suppress(Exception):
            await websocket.send_json({"type": exc.reason if exc.reason in ENDINGS else "ended",
                                       "reason": exc.reason})
            await websocket.close(code=4000 + exc.status_code)
    except DenError as exc:
        await send_error(websocket, exc)
    finally:
        if opened is not None:
            if opened.slot is not None:
                opened.slot.release()
            await opened.stream.kill()


async def send_error(websocket: WebSocket, exc: DenError) -> None:
    """End the socket with ``{"type": "error", ...}`` and close code 4000 + HTTP status."""
    with contextlib.suppress(Exception):
        await websocket.send_json(
            {"type": "error", "error": {"code": exc.code, "message": exc.message}})
        await websocket.close(code=4000 + exc.status_code)


async def relay_output(websocket: WebSocket, chunks: AsyncGenerator[StreamChunk, None]
                       ) -> bool:
    """Send ``chunks`` as stdout/stderr messages until they end (True) or the client goes
    away (False; ``chunks`` is then closed, not drained). Input from the client is ignored."""
    async def send() -> None:
        decoders = {n: codecs.getincrementaldecoder("utf-8")("replace")
                    for n in ("stdout", "stderr")}
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                text = decoders[chunk.stream].decode(chunk.data)
                if text:
                    await websocket.send_json({"type": chunk.stream, "data": text})
        for name, decoder in decoders.items():  # a character cut off at the very end
            if text := decoder.decode(b"", final=True):
                await websocket.send_json({"type": name, "data": text})

    async def until_disconnect() -> None:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    sending = asyncio.create_task(send())
    watching = asyncio.create_task(until_disconnect())
    try:
        await asyncio.wait({sending, watching}, return_when=asyncio.FIRST_COMPLETED)
        if sending.done():
            sending.result()  # its error, if any
            return True
        return False
    finally:
        for task in (sending, watching):
            task.cancel()
        for task in (sending, watching):
            with contextlib.suppress(BaseException):
                await task


async def relay(websocket: WebSocket, stream: ExecStream, *, stdin: str | None = None,
                binary: bool = False) -> int:
    """Copy the stream's output to the socket and the socket's input to the stream until the
    process exits; returns its exit code. The client going away kills the process."""
    if stdin is not None:
        await stream.write(stdin.encode())
    pump = asyncio.create_task(pump_input(websocket, stream))
    try:
        if binary:
            async for chunk in stream.output():
                await websocket.send_bytes(BINARY_STREAMS[chunk.stream] + chunk.data)
            return await stream.wait()
        decoders = {n: codecs.getincrementaldecoder("utf-8")("replace")
                    for n in ("stdout", "stderr")}
        async for chunk in stream.output():
            text = decoders[chunk.stream].decode(chunk.data)
            if text:
                await websocket.send_json({"type": chunk.stream, "data": text})
        return await stream.wait()
    finally:
        pump.cancel()
        with contextlib.suppress(BaseException):
            await pump


async def pump_input(websocket: WebSocket, stream: ExecStream) -> None:
    """Feed the client's messages to the process until the client disconnects."""
    while True:
        msg: Any = await websocket.receive()
        if msg["type"] == "websocket.disconnect":
            await stream.kill()
            return
        if msg.get("bytes") is not None:
            await stream.write(msg["bytes"])
            continue
        try:
            data = json.loads(msg.get("text") or "{}")
        except (ValueError, RecursionError):  # not JSON, or nested too deeply
            continue
        if not isinstance(data, dict):
            continue
        if data.get("type") == "stdin":
            # A lone surrogate ("\ud800" is valid JSON) is no character: sent as "?".
            await stream.write(str(data.get("data", "")).encode(errors="replace"))
        elif data.get("type") == "close_stdin":
            await stream.close_stdin()
        elif data.get("type") == "signal" and data.get("signal") in SIGNALS:
            await stream.signal(str(data["signal"]))
        elif data.get("type") == "resize":
            size = term_size(data)
            if size is not None:
                await stream.resize(*size)


def term_size(data: dict[str, Any]) -> tuple[int, int] | None:
    """(cols, rows) of a resize message; None when they are not sane numbers."""
    cols, rows = data.get("cols"), data.get("rows")
    if isinstance(cols, int) and isinstance(rows, int) and 0 < cols <= 1000 and 0 < rows <= 1000:
        return cols, rows
    return None
