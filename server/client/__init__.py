"""Den's Python client: ``from server.client import Den``.

``Den(url, token)`` (or ``Den.from_config()``) talks to the HTTP API; ``Workspace`` handles run
commands and move files; every failure is a ``DenAPIError``.
"""

from .api import Den, DenAPIError, ExecResult, FileEntry, PullRequest, Snapshot, Workspace

__all__ = [
    "Den", "DenAPIError", "ExecResult", "FileEntry", "PullRequest", "Snapshot", "Workspace",
]
