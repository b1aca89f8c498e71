"""Liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.api.deps import MetricsReader
from server.metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE: {}}}})
def metrics(request: Request, _: MetricsReader) -> Response:
    """Prometheus text format; needs the metrics token or an admin's API token."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE)
