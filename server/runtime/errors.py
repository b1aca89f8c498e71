"""Errors raised by runtime backends, already carrying their HTTP meaning."""

from __future__ import annotations

from server.errors import Conflict, DenError, NotFound, RuntimeUnavailable


class EngineError(DenError):
    """The engine refused or failed an operation on a workspace."""

    status_code = 502
    code = "engine_error"


class EngineUnavailable(RuntimeUnavailable):
    """The engine (dockerd) cannot be reached."""


class ObjectMissing(NotFound):
    """The container or volume of a workspace is gone from the engine."""

    code = "engine_object_missing"


class EngineConflict(Conflict):
    code = "engine_conflict"


class AgentUnavailable(DenError):
    """The workspace's agent is not there or did not answer in time."""

    status_code = 502
    code = "agent_unavailable"


class AgentTimeout(DenError):
    """The workspace's agent stopped answering during a call."""

    status_code = 504
    code = "agent_timeout"
