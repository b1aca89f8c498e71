"""The bytes of a preview: an ASGI request or WebSocket relayed over one TCP connection into
the workspace (the agent's ``connect``).

The browser side is parsed by the ASGI server (uvicorn's bounded HTTP parser); the app side
by h11 (HTTP/1.1) and by websockets' sans-I/O client protocol (WebSocket). ASGI does not hand
over the client's socket, so after a 101 the relay is per WebSocket message rather than raw
bytes: text and binary messages, close codes and the negotiated subprotocol pass through;
pings are answered on each side; extensions (permessage-deflate) are not negotiated with the
app. Nothing is buffered whole: request and response bodies move in the chunks they arrive
in, each ``send`` waits for the browser's socket (ASGI flow control) and each ``write`` for
the agent's window, so a slow reader slows the other side instead of growing memory.
Connections to the app are HTTP/1.1 keep-alive: one that ends a response cleanly idle goes
back to :mod:`server.preview.pool` for the next request to the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import h11
from starlette.types import Receive, Scope, Send
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidURI
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response as WSResponse
from websockets.protocol import State as WSState
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from server.errors import DenError
from server.preview.headers import Headers
from server.runtime.base import ExecStream, StreamChunk

log = logging.getLogger(__name__)


MAX_HEAD_BYTES = 64 * 1024  # the app's response head
MAX_WS_MESSAGE = 16 * 1024 * 1024  # one WebSocket message, either way


class UpstreamTimeout(Exception):
    """The app sent nothing for the idle timeout."""


class Upstream:
    """Reads of an :class:`ExecStream` connection with an idle timeout (None: none). It may
    be parked between requests (:class:`~server.preview.pool.UpstreamPool`): a read then
    waits on it, so that the app closing it or sending anything unasked is seen at once."""

    def __init__(self, stream: ExecStream, *, idle_timeout_s: float | None) -> None:
        self.stream = stream
        self._chunks: AsyncIterator[StreamChunk] = aiter(stream.output())
        self._idle = idle_timeout_s
        self.errors = bytearray()  # stderr of an exec relay: why it failed, bounded
        self.reused = False  # it served a request before this one
        self._next: asyncio.Task[StreamChunk] | None = None  # the read waiting while parked
        self._expiry: asyncio.TimerHandle | None = None

    async def _pull(self) -> StreamChunk:
        return await anext(self._chunks)

    async def _chunk(self) -> StreamChunk:
        if self._next is None:
            return await self._pull()
        task, self._next = self._next, None
        return await task

    async def read(self) -> bytes:
        """The next bytes from the app; b"" once it closed its side."""
        while True:
            try:
                if self._idle is None:
                    chunk = await self._chunk()
                else:  # a timeout, not wait_for: no task per chunk
                    async with asyncio.timeout(self._idle):
                        chunk = await self._chunk()
            except StopAsyncIteration:
                return b""
            except TimeoutError:
                raise UpstreamTimeout() from None
            if chunk.stream == "stderr":
                self.errors += chunk.data[: 4096 - len(self.errors)]
            elif chunk.data:
                return chunk.data

    async def write(self, data: bytes) -> None:
        if data:
            await self.stream.write(data)

    def park(self, *, on_activity: Callable[[Upstream], None], idle_s: float) -> None:
        """Wait idle: ``on_activity(self)`` when the app says anything (or closes), or after
        ``idle_s``."""
        self._next = asyncio.ensure_future(self._pull())
        self._next.add_done_callback(lambda _: on_activity(self))
        self._expiry = asyncio.get_running_loop().call_later(idle_s, on_activity, self)

    def unpark(self) -> bool:
        """Back in use; False when it may not be (the app spoke or closed while parked)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._next is None or self._next.done():
            return False
        self.reused = True
        return True

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self._next is not None:
            self._next.cancel()
            with contextlib.suppress(BaseException):
                await self._next
        with contextlib.suppress(Exception):
            await self.stream.kill()


def wants_html(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"accept":
            return b"text/html" in value
    return False


async def error_response(send: Send, scope: Scope, status: int, code: str, message: str,
                         *, headers: Headers | None = None) -> None:
    """Den's own answer on a preview URL: a small page for a browser, JSON otherwise."""
    if wants_html(scope):
        body = (f"<!doctype html><meta charset=utf-8><title>{status} {html.escape(code)}"
                f"</title><h1>{status}</h1><p>{html.escape(message)}</p>"
                f"<p><small>Den preview</small></p>").encode()
        ctype = b"text/html; charset=utf-8"
    else:
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        ctype = b"application/json"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


# --- HTTP -----------------------------------------------------------------------------------


async def _request_body(receive: Receive, conn: h11.Connection, up: Upstream,
                        done: asyncio.Event, *, sending: bool) -> None:
    """The browser's body to the app as it arrives (``sending``: there is one); then wait
    for the browser to go away (``done``: it did, and the response should end)."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            done.set()
            await up.close()
            return
        if not sending:
            continue
        body = msg.get("body", b"")
        if body:
            await up.write(conn.send(h11.Data(data=body)) or b"")
        if not msg.get("more_body", False):
            await up.write(conn.send(h11.EndOfMessage()) or b"")
            sending = False


class StaleUpstream(Exception):
    """A reused connection turned out closed before the app answered anything, for a request
    without a body: it may go again on a fresh connection."""


def has_body(headers: Headers) -> bool:
    for name, value in headers:
        low = name.lower()
        if low == b"transfer-encoding" or (low == b"content-length" and value.strip() != b"0"):
            return True
    return False


async def http(scope: Scope, receive: Receive, send: Send, up: Upstream, *, target: bytes,
               head: Headers, body: bool, chunked: bool,
               rewrite: Callable[[Headers], Headers], port: int) -> bool:
    """Relay one HTTP request to the app and its response back, streaming both bodies.
    True when ``up`` is left idle and reusable (both sides done, nothing left over); else
    it has been closed. StaleUpstream (``up`` closed, nothing sent to the browser) when a
    reused connection was found closed and the request may be sent again."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    if chunked:
        head = [*head, (b"transfer-encoding", b"chunked")]
    gone = asyncio.Event()
    started = False
    answered = False  # any byte from the app
    keep = False
    pump: asyncio.Task[None] | None = None
    try:
        data = conn.send(h11.Request(method=scope["method"], target=target, headers=head)) or b""
        if not body:  # the whole request in one write; the pump only watches the browser
            data += conn.send(h11.EndOfMessage()) or b""
        await up.write(data)
        pump = asyncio.create_task(_request_body(receive, conn, up, gone, sending=body))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await up.read()
                answered = answered or bool(data)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue: the browser's server already answered its own
            if isinstance(event, h11.Response):
                await send({"type": "http.response.start", "status": event.status_code,
                            "headers": rewrite(list(event.headers))})
                started = True
                length = raw_length(scope["method"], event)
                if length is not None:  # a large body: raw, and the connection is not kept
                    await _raw_body(send, conn, up, length)
                    return False
            elif isinstance(event, h11.Data):
                await send({"type": "http.response.body", "body": bytes(event.data),
                            "more_body": True})
            elif isinstance(event, h11.EndOfMessage):
                reusable = (conn.our_state is h11.DONE and conn.their_state is h11.DONE
                            and conn.trailing_data == (b"", False) and not gone.is_set())
                await send({"type": "http.response.body", "body": b""})
                keep = reusable
                return keep
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("the app closed the connection", 502)
    except (h11.RemoteProtocolError, h11.LocalProtocolError, UpstreamTimeout, DenError) as exc:
        keep = False
        if gone.is_set():
            return False
        if up.reused and not answered and not body and not isinstance(exc, UpstreamTimeout):
            raise StaleUpstream() from exc
        if started:  # too late for a status: end the response short, the browser sees it
            log.info("preview: port %d: response cut short: %s", port,
                     exc.__class__.__name__)
            raise CutShort() from exc
        if isinstance(exc, UpstreamTimeout):
            await error_response(send, scope, 504, "preview_timeout",
                                 f"the app on port {port} did not answer in time")
        else:
            why = up.errors.decode(errors="replace").strip() or str(exc)
            await error_response(send, scope, 502, "bad_gateway",
                                 f"the app on port {port} did not answer with HTTP: {why}")
        return False
    finally:
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
        if not keep:
            await up.close()


RAW_BODY = 1 << 20  # a response body this large skips h11 (its per-byte copies)


def raw_length(method: str, response: h11.Response) -> int | None:
    """The body's length when it is large enough to relay raw (Content-Length only)."""
    if method == "HEAD" or response.status_code in (204, 304) or response.status_code < 200:
        return None
    lengths = [v for k, v in response.headers if k == b"content-length"]
    if len(lengths) != 1 or any(k == b"transfer-encoding" for k, _ in response.headers):
        return None
    try:
        n = int(lengths[0])
    except ValueError:
        return None
    return n if n >= RAW_BODY else None


async def _raw_body(send: Send, conn: h11.Connection, up: Upstream, length: int) -> None:
    """Relay exactly ``length`` bytes of body: what h11 holds already, then what the app
    sends, as it comes (anything past the body is dropped with the connection)."""
    left = length
    while left:
        event = conn.next_event()
        if not isinstance(event, h11.Data):
            break
        left -= len(event.data)
        await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
    while left > 0:
        data = await up.read()
        if not data:
            raise h11.RemoteProtocolError("the app closed the connection", 502)
        if len(data) > left:
            data = data[:left]
        left -= len(data)
        await send({"type": "http.response.body", "body": data, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


class CutShort(Exception):
    """The app's response ended early: the ASGI server closes the browser's connection."""


# --- WebSocket ------------------------------------------------------------------------------


async def websocket(scope: Scope, receive: Receive, send: Send, up: Upstream, *, target: str,
                    host: str, head: Headers, port: int) -> None:
    """Relay a WebSocket: the handshake to the app first; accepted for the browser only when
    the app accepted it, with the subprotocol the app chose."""
    try:
        try:
            uri = parse_uri(f"ws://{host}{target}")
        except InvalidURI:
            await send({"type": "websocket.close", "code": 1008})
            return
        subprotocols = [Subprotocol(p) for p in scope.get("subprotocols") or []]
        proto = ClientProtocol(uri, subprotocols=subprotocols or None,
                               max_size=MAX_WS_MESSAGE)
        request = proto.connect()
        skip = {b"host", b"sec-websocket-key", b"sec-websocket-version",
                b"sec-websocket-protocol", b"sec-websocket-extensions"}
        for key, value in head:
            if key not in skip:
                request.headers[key.decode("latin-1")] = value.decode("latin-1")
        proto.send_request(request)
        await up.write(b"".join(proto.data_to_send()))
        response = await _handshake(proto, up)
        if response is None or proto.state is not WSState.OPEN:
            log.info("preview: port %d refused the WebSocket: %s", port, proto.handshake_exc)
            await send({"type": "websocket.close", "code": 1011})
            return
        await send({"type": "websocket.accept",
                    "subprotocol": response.headers.get("Sec-WebSocket-Protocol")})
        to_app = asyncio.create_task(_browser_to_app(receive, proto, up))
        try:
            await _app_to_browser(send, proto, up)
        finally:
            to_app.cancel()
            with contextlib.suppress(BaseException):
                await to_app
    except UpstreamTimeout:
        with contextlib.suppress(Exception):
            await send({"type": "websocket.close", "code": 1011})
    finally:
        await up.close()


async def _handshake(proto: ClientProtocol, up: Upstream) -> WSResponse | None:
    while True:
        data = await up.read()
        if data:
            proto.receive_data(data)
        else:
            proto.receive_eof()
        for event in proto.events_received():
            if isinstance(event, WSResponse):
                return event
        if not data or proto.handshake_exc is not None:
            return None


async def _browser_to_app(receive: Receive, proto: ClientProtocol, up: Upstream) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            if proto.state is WSState.OPEN:
                proto.send_close(_sendable(msg.get("code")))
                await up.write(b"".join(proto.data_to_send()))
            return
        if msg["type"] != "websocket.receive" or proto.state is not WSState.OPEN:
            continue
        if msg.get("text") is not None:
            proto.send_text(msg["text"].encode())
        elif msg.get("bytes") is not None:
            proto.send_binary(msg["bytes"])
        await up.write(b"".join(proto.data_to_send()))


def _sendable(code: Any) -> int:
    """A close code that may be sent on the wire (1005, 1006 and 1015 only say what
    happened; the browser going away is 1001)."""
    if not isinstance(code, int) or code in (1004, 1005, 1006, 1015) \
            or not (1000 <= code <= 1014 or 3000 <= code <= 4999):
        return 1001
    return code


async def _app_to_browser(send: Send, proto: ClientProtocol, up: Upstream) -> None:
    parts: list[bytes] = []
    opcode: Opcode | None = None
    size = 0
    while True:
        data = await up.read()
        if data:
            proto.receive_data(data)
        else:
            proto.receive_eof()
        for frame in proto.events_received():
            if not isinstance(frame, Frame):
                continue
            if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                opcode, parts, size = frame.opcode, [], 0
            if frame.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT) and opcode is not None:
                size += len(frame.data)
                if size > MAX_WS_MESSAGE:
                    await send({"type": "websocket.close", "code": 1009})
                    return
                parts.append(bytes(frame.data))
                if frame.fin:
                    payload = b"".join(parts)
                    if opcode is Opcode.TEXT:
                        try:
                            await send({"type": "websocket.send", "text": payload.decode()})
                        except UnicodeDecodeError:
                            await send({"type": "websocket.close", "code": 1007})
                            return
                    else:
                        await send({"type": "websocket.send", "bytes": payload})
                    opcode, parts, size = None, [], 0
            elif frame.opcode is Opcode.CLOSE:
                close = Close.parse(frame.data) if frame.data else None
                code = close.code if close is not None and close.code not in (1005, 1006) \
                    else 1000
                await up.write(b"".join(proto.data_to_send()))
                await send({"type": "websocket.close", "code": code,
                            "reason": close.reason if close is not None else ""})
                return
        await up.write(b"".join(proto.data_to_send()))  # pongs
        if not data:
            await send({"type": "websocket.close", "code": 1011})
            return
