"""Log lines that say which request and which workspace they belong to.

Two context variables (the request id, set by :mod:`server.api.observe` for each HTTP request
and WebSocket; the workspace id, bound by the workspace service when a call resolves or acts
on a workspace) are copied onto every record by :class:`ContextFilter`, which sits on the
handlers so that library loggers' records carry them too. ``DEN_LOG_FORMAT=json`` writes one
JSON object per line for log shippers.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

request_id: ContextVar[str] = ContextVar("den_request_id", default="")
workspace_id: ContextVar[str] = ContextVar("den_workspace_id", default="")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [req=%(request_id)s ws=%(workspace_id)s]: " \
              "%(message)s"


def bind_workspace(ws_id: str) -> None:
    """Later log lines of this task (or thread) carry ``ws_id``."""
    workspace_id.set(ws_id)


class ContextFilter(logging.Filter):
    """Adds ``request_id`` and ``workspace_id`` to every record ("-" when there is none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = request_id.get() or "-"
        if not getattr(record, "workspace_id", None):
            record.workspace_id = workspace_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request_id, workspace_id
    (null when there is none), and the traceback as ``exc`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "workspace_id"):
            value = getattr(record, key, None)
            out[key] = None if value in (None, "", "-") else value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def handler(fmt: str, stream: Any = None) -> logging.Handler:
    """A stream handler with the context filter and the ``text`` or ``json`` formatter."""
    h = logging.StreamHandler(stream if stream is not None else sys.stderr)
    h.addFilter(ContextFilter())
    h.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    return h


def configure(*, level: str, fmt: str) -> None:
    """Route every logger (uvicorn's included) through one handler on the root logger."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler(fmt))
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
