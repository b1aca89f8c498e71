"""What the modules that do one thing for the workspace service (restore.py, reconcile.py,
networking.py, engine_events.py) share: the service they work for, and what of it they use."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.workspaces.service import WorkspaceService


class ServicePart:
    """A part of :class:`WorkspaceService`: it decides through the service and writes only
    through its ledger."""

    def __init__(self, svc: WorkspaceService) -> None:
        self.svc = svc
        self.ledger = svc.ledger
        self.runtime = svc.runtime
        self.sessions = svc.sessions
        self.settings = svc.settings
