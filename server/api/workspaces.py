"""Workspace routes: create, list, read, lifecycle, delete, events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from server.api.deps import CurrentUser, Prebuilds, Snapshots, Workspaces
from server.api.schemas import (
    EventList,
    EventOut,
    KeepaliveIn,
    WorkspaceCreate,
    WorkspaceList,
    WorkspaceOut,
    WorkspacePatch,
    errors,
)
from server.errors import ValidationFailed
from server.workspaces import listing
from server.workspaces.service import CreateRequest

router = APIRouter(prefix="/api/v1/workspaces", tags=["workspaces"])
LIFECYCLE = errors(404, 409, 502, 503)


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=WorkspaceOut,
             responses=errors(404, 409, 429, 503))
async def create_workspace(body: WorkspaceCreate, user: CurrentUser, svc: Workspaces,
                           snaps: Snapshots, prebuilds: Prebuilds) -> WorkspaceOut:
    if (body.repo is None) == (body.from_snapshot is None):
        raise ValidationFailed("give either repo or from_snapshot")
    if body.from_snapshot is not None:
        if body.network is not None:
            raise ValidationFailed("a fork gets its origin's network policy; change it "
                                   "afterwards with PATCH /api/v1/workspaces/{id}")
        snap = snaps.get_for(user, body.from_snapshot)
        name = body.name or f"{snap.name}-fork"
        return WorkspaceOut.of(await snaps.fork(user, snap, name=name), svc.settings)
    assert body.repo is not None
    req = CreateRequest(
        name=body.name, repo_url=body.repo.url, branch=body.repo.branch, image=body.image,
        runtime=body.runtime, cpus=body.resources.cpus, memory_mb=body.resources.memory_mb,
        disk_gb=body.resources.disk_gb, gpus=body.resources.gpus,
        gpu_model=body.resources.gpu_model, env=body.env,
        idle_timeout_s=body.idle_timeout_s, stop_after_s=body.stop_after_s,
        keep_alive=body.keep_alive,
        network_mode=body.network.mode if body.network is not None else None,
        network_allow=tuple(body.network.allow) if body.network is not None else (),
        devcontainer=body.devcontainer, prebuild=body.prebuild,
    )
    return WorkspaceOut.of(await svc.create(user, req, prebuilds=prebuilds), svc.settings)


@router.get("", response_model=WorkspaceList, responses=errors(422))
def list_workspaces(
    user: CurrentUser, svc: Workspaces,
    limit: Annotated[int | None, Query(ge=1, le=listing.MAX_PAGE, description=(
        "At most this many, in creation order, and `next` to ask for the rest; without it, "
        "all of them in one answer"))] = None,
    after: Annotated[str | None, Query(max_length=512, description=(
        "The `next` of the page before (only with `limit`)"))] = None,
) -> WorkspaceList:
    if limit is None:
        if after is not None:
            raise ValidationFailed("after: only with limit (the page size)")
        rows, cursor = svc.list_for(user), None
    else:
        rows, cursor = svc.list_page_for(user, limit=limit, after=after)
    return WorkspaceList(workspaces=[WorkspaceOut.of(w, svc.settings) for w in rows],
                         next=cursor)


@router.get("/{ref}", response_model=WorkspaceOut, responses=errors(404))
def get_workspace(ref: str, user: CurrentUser, svc: Workspaces) -> WorkspaceOut:
    return WorkspaceOut.of(svc.get_for(user, ref), svc.settings)


@router.patch("/{ref}", response_model=WorkspaceOut, responses=errors(403, 404))
async def update_workspace(ref: str, body: WorkspacePatch, user: CurrentUser, svc: Workspaces
                           ) -> WorkspaceOut:
    """Change settings of a workspace; a network policy applies at once, without a restart."""
    ws = svc.get_for(user, ref)
    if body.network is not None:
        ws = await svc.networks.set(ws.id, body.network.mode, body.network.allow,
                                   actor=user.name)
    return WorkspaceOut.of(ws, svc.settings)


@router.post("/{ref}/start", response_model=WorkspaceOut, responses=LIFECYCLE)
async def start_workspace(ref: str, user: CurrentUser, svc: Workspaces) -> WorkspaceOut:
    ws = svc.get_for(user, ref)
    return WorkspaceOut.of(await svc.start(ws.id, actor=user.name), svc.settings)


@router.post("/{ref}/stop", response_model=WorkspaceOut, responses=LIFECYCLE)
async def stop_workspace(ref: str, user: CurrentUser, svc: Workspaces) -> WorkspaceOut:
    ws = svc.get_for(user, ref)
    return WorkspaceOut.of(await svc.stop(ws.id, actor=user.name), svc.settings)


@router.post("/{ref}/pause", response_model=WorkspaceOut, responses=LIFECYCLE)
async def pause_workspace(ref: str, user: CurrentUser, svc: Workspaces) -> WorkspaceOut:
    ws = svc.get_for(user, ref)
    return WorkspaceOut.of(await svc.pause(ws.id, actor=user.name), svc.settings)


@router.post("/{ref}/resume", response_model=WorkspaceOut, responses=LIFECYCLE)
async def resume_workspace(ref: str, user: CurrentUser, svc: Workspaces) -> WorkspaceOut:
    ws = svc.get_for(user, ref)
    return WorkspaceOut.of(await svc.resume(ws.id, actor=user.name), svc.settings)


@router.post("/{ref}/keepalive", response_model=WorkspaceOut, responses=LIFECYCLE)
async def keepalive(ref: str, body: KeepaliveIn, user: CurrentUser, svc: Workspaces
                    ) -> WorkspaceOut:
    ws = svc.get_for(user, ref)
    return WorkspaceOut.of(await svc.keepalive(ws.id, body.ttl_s, actor=user.name),
                           svc.settings)


@router.delete("/{ref}", status_code=status.HTTP_204_NO_CONTENT,
               responses={202: {"description": "A delete of it is already in progress"},
                          **LIFECYCLE})
async def delete_workspace(ref: str, user: CurrentUser, svc: Workspaces, snaps: Snapshots,
                           snapshots: bool = False) -> Response:
    ws = svc.get_for(user, ref)
    if snapshots:
        await snaps.delete_all_of(ws.id, actor=user.name)
    done = await svc.delete(ws.id, actor=user.name)
    return Response(status_code=204 if done else 202)


@router.get("/{ref}/events", response_model=EventList, responses=errors(404))
def workspace_events(ref: str, user: CurrentUser, svc: Workspaces) -> EventList:
    ws = svc.get_for(user, ref)
    return EventList(events=[EventOut.of(e) for e in svc.events(ws.id)])
