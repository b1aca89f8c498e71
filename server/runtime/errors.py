"""Errors raised by runtime backends, already carrying their HTTP meaning.

The engine's messages name host paths (``/var/lib/docker/overlay2/...``, the data
directory, runsc's state): the errors of this module show users the message with every
absolute path replaced by ``…`` (issue 11, finding 8); the whole text stays in ``detail``,
for the operator's log.
"""

from __future__ import annotations

import re

from server.errors import Conflict, DenError, NotFound, RuntimeUnavailable

# An absolute path of two or more parts (a lone "/x" is left alone: "/workspace" is said).
_HOST_PATH = re.compile(r"(?<![\w.:/-])/(?:[\w.@+=:-]+/)+[\w.@+=-]*")


def without_host_paths(text: str) -> str:
    return _HOST_PATH.sub("…", text)


class _Scrubbed(DenError):
    def __init__(self, message: str, *, code: str | None = None, detail: str = "") -> None:
        super().__init__(without_host_paths(message), code=code, detail=detail or message)


class EngineError(_Scrubbed):
    """The engine refused or failed an operation on a workspace."""

    status_code = 502
    code = "engine_error"


class EngineUnavailable(_Scrubbed, RuntimeUnavailable):
    """The engine (dockerd) cannot be reached."""


class ObjectMissing(_Scrubbed, NotFound):
    """The container or volume of a workspace is gone from the engine."""

    code = "engine_object_missing"


class EngineConflict(_Scrubbed, Conflict):
    code = "engine_conflict"


class AgentUnavailable(DenError):
    """The workspace's agent is not there or did not answer in time."""

    status_code = 502
    code = "agent_unavailable"


class AgentTimeout(DenError):
    """The workspace's agent stopped answering during a call."""

    status_code = 504
    code = "agent_timeout"
