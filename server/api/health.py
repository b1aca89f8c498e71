"""Liveness and Prometheus metrics."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy import select

from server.db.models import Workspace

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request) -> str:
    with request.app.state.sessions() as s:
        states = Counter(s.scalars(select(Workspace.state)))
    lines = [
        "# HELP den_workspaces Workspaces by state.",
        "# TYPE den_workspaces gauge",
    ]
    lines += [f'den_workspaces{{state="{st}"}} {n}' for st, n in sorted(states.items())]
    return "\n".join(lines) + "\n"
