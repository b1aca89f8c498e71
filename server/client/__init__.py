"""Den's Python client: ``from server.client import Den``.

``Den(url, token)`` (or ``Den.from_config()``) talks to the HTTP API; ``Workspace`` handles run
commands, move files and run background processes (``ws.processes``); every failure is a
``DenAPIError``.
"""

from .api import (
    Den,
    DenAPIError,
    ExecResult,
    FileEntry,
    Prebuild,
    PullRequest,
    Snapshot,
    Workspace,
)
from .processes import LogChunk, Process, ProcessLogs

__all__ = [
    "Den", "DenAPIError", "ExecResult", "FileEntry", "LogChunk", "Prebuild", "Process",
    "ProcessLogs", "PullRequest", "Snapshot", "Workspace",
]
