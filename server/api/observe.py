"""The HTTP seam of observability: a request id for every request and WebSocket (taken from
a sane ``X-Request-ID`` or made here, sent back in the response's ``X-Request-ID``), the
latency histogram by route template and status class, and one access log line per request.

A pure ASGI middleware (not ``BaseHTTPMiddleware``), so streamed bodies and WebSockets pass
through untouched.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.logs import request_id, workspace_id
from server.metrics import Metrics

access_log = logging.getLogger("den.access")

HEADER = b"x-request-id"
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
UNMATCHED = "unmatched"  # the route label of a request no route matched (no raw paths)


def request_id_from(scope: Scope) -> str:
    """The client's ``X-Request-ID`` when it is 1-64 safe characters, else a new one."""
    for key, value in scope.get("headers") or ():
        if key == HEADER:
            text = bytes(value).decode("latin-1")
            if REQUEST_ID_RE.fullmatch(text):
                return text
            break
    return secrets.token_hex(8)


def route_of(scope: Scope) -> str:
    """The template of the route that served the request (``/api/v1/workspaces/{ref}``)."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


class Observe:
    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        rid = request_id_from(scope)
        # Not reset on the way out: the server runs each request in a task of its own, and the
        # handler of unexpected errors (outside this middleware) logs with the same ids.
        request_id.set(rid)
        workspace_id.set("")
        if scope["type"] == "websocket":
            await self.app(scope, receive, _with_header(send, "websocket.accept", rid))
        else:
            await self._http(scope, receive, send, rid)

    async def _http(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        started = time.monotonic()
        status = 500  # when the app raises before it answers

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, _with_header(sending, "http.response.start", rid))
        finally:
            seconds = time.monotonic() - started
            method = str(scope.get("method", "?"))
            self.metrics.http_request(method, route_of(scope), status, seconds)
            access_log.info("%s %s %d %.1f ms", method, scope.get("path", ""), status,
                            seconds * 1000)


def _with_header(send: Send, on: str, rid: str) -> Send:
    """``send`` adding ``X-Request-ID`` to the message of type ``on``."""
    async def sending(message: Message) -> None:
        if message["type"] == on:
            headers: list[Any] = list(message.get("headers") or [])
            headers.append((HEADER, rid.encode()))
            message = {**message, "headers": headers}
        await send(message)

    return sending
