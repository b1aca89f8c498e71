"""Authenticate before reading a body, and bound every body (issue 11, finding 4).

FastAPI reads and parses a route's JSON body before it runs the route's dependencies, so the
bearer check in :func:`server.api.deps.current_user` alone let an unauthenticated client make
the server read and parse a body of any size. This pure ASGI middleware runs first:

- An ``/api/`` request must carry a valid bearer token before a byte of its body is read
  (401 otherwise). The user it finds is left in the request's state, where ``current_user``
  takes it: the decision is still ``user_from_header``'s, made once per request.
- Every request body has a cap (:func:`body_limit`): ``DEN_MAX_BODY_BYTES`` by default,
  ``DEN_FILE_MAX_BYTES`` for a file upload (which streams). A declared Content-Length above
  the cap is answered 413 at once; a chunked body is counted as the route reads it and
  refused with 413 as soon as it passes the cap.

A refusal sent while the client still has a body to send says ``Connection: close``, so the
server drops the connection instead of reading (and discarding) the rest.
"""

from __future__ import annotations

import re

import anyio
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.deps import user_from_header
from server.config import Settings
from server.errors import DenError

FILE_UPLOAD = re.compile(r"/api/v1/workspaces/[^/]+/files/?")


def body_limit(method: str, path: str, settings: Settings) -> int:
    """The largest body, in bytes, that ``method path`` may carry."""
    if method == "PUT" and FILE_UPLOAD.fullmatch(path):
        return settings.file_max_bytes
    return settings.max_body_bytes


class BodyTooLarge(HTTPException):
    """A body counted past its cap while the route read it (rendered as 413 ``too_large``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this route's limit of "
                              f"{limit} bytes", headers={"Connection": "close"})


def counted(receive: Receive, limit: int) -> Receive:
    """``receive`` that raises :class:`BodyTooLarge` once the body passes ``limit`` bytes."""
    seen = 0

    async def receiving() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return receiving


class BodyGuard:
    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        pending = chunked or (declared is not None and declared.strip() not in ("", "0"))
        if scope["path"].startswith("/api/"):
            state = scope["app"].state
            try:
                user = await anyio.to_thread.run_sync(user_from_header, state,
                                                      headers.get("authorization"))
            except DenError as exc:
                await _refuse(scope, send, exc.status_code, exc.code, exc.message,
                              close=pending)
                return
            scope.setdefault("state", {})["user"] = user
        limit = body_limit(scope["method"], scope["path"], self.settings)
        if declared is not None:
            if not declared.strip().isdigit():
                await _refuse(scope, send, 400, "bad_request", "invalid Content-Length",
                              close=True)
                return
            if int(declared) > limit:
                await _refuse(scope, send, 413, "too_large",
                              f"the request body is larger than this route's limit of "
                              f"{limit} bytes", close=True)
                return
        await self.app(scope, counted(receive, limit), send)


async def _refuse(scope: Scope, send: Send, status: int, code: str, message: str, *,
                  close: bool) -> None:
    response = JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                            headers={"Connection": "close"} if close else None)
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:  # a refusal never reads the body
    return {"type": "http.disconnect"}
