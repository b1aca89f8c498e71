"""Health (what works: the engine, the database, the SSH gateway) and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from server.api.deps import MetricsReader
from server.api.schemas import errors
from server.metrics import CONTENT_TYPE
from server.runtime.base import features

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])

DATABASE_TIMEOUT_S = 5.0


class EngineHealthOut(BaseModel):
    ok: bool = Field(description="The engine answers and reconcile has run since it did.")
    reconciled: bool = Field(description="Reconcile has run since the engine last answered.")
    error: str = Field(description="Why not ok; empty when ok.")
    checked_at: datetime | None = Field(description="When the engine was last checked.")
    backend: str = Field("", description="The workspace backend (`DEN_BACKEND`), e.g. `docker`.")
    accelerator: str = Field(
        "", description="How the microvm backend runs its guests: `kvm` (hardware "
        "virtualization) or `tcg` (software emulation, several times slower), decided when the "
        "engine is first checked; empty for other backends.")
    features: list[str] = Field(
        default_factory=list,
        description="What this backend can do besides create, start, stop and exec: "
        "`checkpoints` (pause with memory, memory snapshots), `disk_snapshots` (snapshots, "
        "forks, restores), `freezer` (the frozen sleep tier), `agent`, `processes`, "
        "`port_connect`, `managed_network`, `engine_events`.")


class PartHealthOut(BaseModel):
    ok: bool
    error: str = Field(description="Why not ok; empty when ok.")


class SSHHealthOut(PartHealthOut):
    enabled: bool = Field(description="False when the gateway is turned off (ssh_port 0).")


class HealthOut(BaseModel):
    status: str = Field(description='"ok"; "degraded" (only the SSH gateway is down: 200); '
                                    '"unavailable" (the engine or the database: 503)')
    engine: EngineHealthOut
    database: PartHealthOut
    ssh: SSHHealthOut


def _ping(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        s.execute(text("SELECT 1"))


async def _database(sessions: sessionmaker[Session]) -> PartHealthOut:
    try:
        await asyncio.wait_for(asyncio.to_thread(_ping, sessions), timeout=DATABASE_TIMEOUT_S)
    except TimeoutError:
        return PartHealthOut(ok=False, error=f"no answer within {DATABASE_TIMEOUT_S:g} s")
    except (SQLAlchemyError, OSError) as exc:  # the detail may name hosts: log only
        log.error("healthz: the database did not answer: %s", exc)
        return PartHealthOut(ok=False, error="the database did not answer (see the log)")
    return PartHealthOut(ok=True, error="")


@router.get("/healthz", response_model=HealthOut,
            responses={503: {"model": HealthOut,
                             "description": "The engine or the database does not work"}})
async def healthz(request: Request) -> JSONResponse:
    state = request.app.state
    engine = state.engine.health()
    gateway = state.ssh_gateway
    enabled = state.settings.ssh_port > 0
    serving = gateway is not None and gateway.serving
    body = HealthOut(
        status="ok",
        engine=EngineHealthOut(
            ok=engine.ok, reconciled=engine.reconciled, error=engine.error,
            checked_at=None if engine.checked_at is None
            else datetime.fromtimestamp(engine.checked_at, UTC),
            backend=state.workspaces.runtime.name,
            accelerator=str(getattr(state.workspaces.runtime, "accelerator", "")),
            features=features(state.workspaces.runtime)),
        database=await _database(state.sessions),
        ssh=SSHHealthOut(ok=serving or not enabled, enabled=enabled,
                         error="" if serving or not enabled else "the gateway is not listening"),
    )
    if not (body.engine.ok and body.database.ok):
        body.status = "unavailable"
    elif not body.ssh.ok:
        body.status = "degraded"
    return JSONResponse(body.model_dump(mode="json"),
                        status_code=503 if body.status == "unavailable" else 200)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE: {}}}, **errors(403)})
def metrics(request: Request, _: MetricsReader) -> Response:
    """Prometheus text format; needs the metrics token or an admin's API token."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE)
