"""``den serve``: the app under uvicorn, with a stop that cannot hang.

A stop (SIGTERM, Ctrl-C) gives calls in flight ``shutdown_grace_s`` to finish; then uvicorn
cancels them and logs it ("Cancel N running task(s), timeout graceful shutdown exceeded"), and
the lifespan's shutdown runs (the SSH gateway, the reaper, background work). Without that
bound one wedged call kept the server "Waiting for background tasks to complete" until a
service manager's SIGKILL. A task's cancellation cannot end a blocking engine call in a thread,
so the first signal also arms a watchdog: ``SHUTDOWN_MARGIN_S`` after the grace period the
process exits whatever still waits, and says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.app import create_app
from server.config import Settings
from server.db.session import prepare_data_dir
from server.http_head import BoundedHeadProtocol
from server.logs import configure as configure_logging
from server.runtime.base import Runtime

log = logging.getLogger("den")

SHUTDOWN_MARGIN_S = 5.0


class BoundedServer(uvicorn.Server):
    """uvicorn's server, whose stop ends at most ``SHUTDOWN_MARGIN_S`` after the grace."""

    def __init__(self, config: uvicorn.Config, *, grace_s: int) -> None:
        super().__init__(config)
        self.grace_s = grace_s
        self._watchdog: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._watchdog is None:
            log.warning("stopping on signal %d: calls in flight have %g s to finish, then they "
                        "are cut", sig, self.grace_s)
            self._watchdog = threading.Timer(self.grace_s + SHUTDOWN_MARGIN_S, _give_up,
                                             args=(self.grace_s + SHUTDOWN_MARGIN_S,))
            self._watchdog.daemon = True
            self._watchdog.start()
        super().handle_exit(sig, frame)


class CutOnStop:
    """ASGI middleware: a call that the stop cancels before it answered gets a 503 JSON error
    saying so (uvicorn would answer a bare 500 and log a traceback). Only the stop cancels a
    request's task from outside: a client that goes away is told through ``receive``."""

    def __init__(self, app: ASGIApp, *, grace_s: float) -> None:
        self.app = app
        self.grace_s = grace_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except asyncio.CancelledError:
            if started:
                raise
            log.warning("%s %s cut: the server is stopping", scope.get("method"),
                        scope.get("path"))
            body = json.dumps({"error": {
                "code": "shutting_down",
                "message": f"the server is stopping; this call was cut after the "
                           f"{self.grace_s:g} s grace period (its effect may be partial)"}},
            ).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})


def _give_up(after_s: float) -> None:
    busy = [t.name for t in threading.enumerate()
            if t.is_alive() and not t.daemon and t is not threading.main_thread()]
    log.error("still stopping %g s after the signal (%d thread(s) busy: %s); exiting now",
              after_s, len(busy), ", ".join(busy[:8]) or "none")
    logging.shutdown()
    os._exit(1)


def serve(settings: Settings, *, runtime: Runtime | None = None) -> int:
    """Run the server until SIGTERM or Ctrl-C. ``runtime`` is for tests (the fake engine);
    users get the Docker engine."""
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    prepare_data_dir(settings.data_dir)
    app = create_app(settings, runtime=runtime)
    print(f"den: serving on http://{settings.host}:{settings.port} "
          f"(data in {settings.data_dir})", file=sys.stderr, flush=True)
    grace_s = max(0, settings.shutdown_grace_s)
    # Den's handler formats every line (log_config=None); its middleware writes the access
    # log, where the request id is known.
    config = uvicorn.Config(CutOnStop(app, grace_s=grace_s), host=settings.host,
                            port=settings.port, log_config=None, access_log=False,
                            http=BoundedHeadProtocol,
                            log_level=settings.log_level.lower(),
                            ws_max_size=settings.max_body_bytes,
                            timeout_graceful_shutdown=grace_s)
    BoundedServer(config, grace_s=grace_s).run()
    return 0
