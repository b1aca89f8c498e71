"""Snapshot routes: take and list a workspace's snapshots, restore and delete one."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from server.api.deps import CurrentUser, Snapshots, Workspaces
from server.api.schemas import SnapshotCreate, SnapshotList, SnapshotOut, WorkspaceOut, errors

router = APIRouter(tags=["snapshots"])


@router.post("/api/v1/workspaces/{ref}/snapshots", status_code=status.HTTP_201_CREATED,
             response_model=SnapshotOut, responses=errors(404, 409, 502, 503))
async def create_snapshot(ref: str, body: SnapshotCreate, user: CurrentUser, svc: Workspaces,
                          snaps: Snapshots) -> SnapshotOut:
    ws = svc.get_for(user, ref)
    snap = await snaps.create(ws.id, name=body.name, memory=body.memory, actor=user.name)
    return SnapshotOut.of(snap)


@router.get("/api/v1/workspaces/{ref}/snapshots", response_model=SnapshotList,
            responses=errors(404))
def list_snapshots(ref: str, user: CurrentUser, svc: Workspaces, snaps: Snapshots
                   ) -> SnapshotList:
    ws = svc.get_for(user, ref)
    return SnapshotList(snapshots=[SnapshotOut.of(s) for s in snaps.list_for(ws)])


@router.get("/api/v1/snapshots", response_model=SnapshotList, responses=errors())
def list_my_snapshots(user: CurrentUser, snaps: Snapshots) -> SnapshotList:
    """The caller's snapshots, those of deleted workspaces included."""
    return SnapshotList(snapshots=[SnapshotOut.of(s) for s in snaps.list_owned(user)])


@router.post("/api/v1/snapshots/{sid}/restore", response_model=WorkspaceOut,
             responses=errors(404, 409, 502, 503))
async def restore_snapshot(sid: str, user: CurrentUser, snaps: Snapshots) -> WorkspaceOut:
    snap = snaps.get_for(user, sid)
    return WorkspaceOut.of(await snaps.restore(snap, actor=user.name), snaps.settings)


@router.delete("/api/v1/snapshots/{sid}", status_code=204,
               responses=errors(404, 409, 502, 503))
async def delete_snapshot(sid: str, user: CurrentUser, snaps: Snapshots) -> Response:
    snap = snaps.get_for(user, sid)
    await snaps.delete(snap.id, actor=user.name)
    return Response(status_code=204)
