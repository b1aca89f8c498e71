"""What a workspace uses now against its limits, for the API and the dashboard's chart.

Read only while the workspace runs: asking never wakes a paused or stopped workspace and does
not count as activity (a dashboard left open must not keep it awake).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from server.db.models import Workspace
from server.errors import DenError
from server.workspaces.service import WorkspaceService
from server.workspaces.states import State

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UsageReport:
    state: str
    cpu_ns: int | None  # CPU time used so far (differences of two readings give the rate)
    memory_bytes: int | None  # memory held now
    cpus: float  # the limits
    memory_limit_bytes: int
    at: datetime


async def usage_report(svc: WorkspaceService, ws: Workspace) -> UsageReport:
    cpu_ns = memory = None
    if State(ws.state) is State.RUNNING:
        try:
            used = await svc.runtime.usage(svc.spec_for(ws))
        except DenError as exc:
            log.info("workspace %s: usage not read: %s", ws.id, exc.message)
            used = None
        if used is not None:
            cpu_ns, memory = used.cpu_ns, used.memory_bytes
    return UsageReport(state=ws.state, cpu_ns=cpu_ns, memory_bytes=memory, cpus=ws.cpus,
                       memory_limit_bytes=ws.memory_mb * 1024 * 1024, at=datetime.now(UTC))
