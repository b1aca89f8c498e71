"""A workspace's resource use against its limits (docs/api.md#usage)."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter

from server.api.deps import CurrentUser, Workspaces
from server.api.schemas import UsageOut, errors
from server.workspaces.usage import usage_report

router = APIRouter(prefix="/api/v1/workspaces", tags=["workspaces"])


@router.get("/{ref}/usage", response_model=UsageOut, responses=errors(404))
async def workspace_usage(ref: str, user: CurrentUser, svc: Workspaces) -> UsageOut:
    ws = svc.get_for(user, ref)
    return UsageOut(**dataclasses.asdict(await usage_report(svc, ws)))
