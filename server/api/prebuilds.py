"""Prebuild routes: make, list, read and delete the caller's prebuilds."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from server.api.deps import CurrentUser, Prebuilds
from server.api.schemas import PrebuildCreate, PrebuildList, PrebuildOut, errors

router = APIRouter(prefix="/api/v1/prebuilds", tags=["prebuilds"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=PrebuildOut,
             responses=errors(403, 409, 429, 503))
async def create_prebuild(body: PrebuildCreate, user: CurrentUser, pbs: Prebuilds
                          ) -> PrebuildOut:
    """Start a prebuild (or answer the one of the same repository and branch in progress)."""
    return PrebuildOut.of(await pbs.create(user, body.repo, body.branch))


@router.get("", response_model=PrebuildList, responses=errors())
def list_prebuilds(user: CurrentUser, pbs: Prebuilds) -> PrebuildList:
    return PrebuildList(prebuilds=[PrebuildOut.of(p, fork_ready=pbs.fork_ready(p.id))
                                   for p in pbs.list_for(user)])


@router.get("/{pid}", response_model=PrebuildOut, responses=errors(404))
def get_prebuild(pid: str, user: CurrentUser, pbs: Prebuilds) -> PrebuildOut:
    pb = pbs.get_for(user, pid)
    return PrebuildOut.of(pb, fork_ready=pbs.fork_ready(pb.id))


@router.delete("/{pid}", status_code=204, responses=errors(404, 409, 502, 503))
async def delete_prebuild(pid: str, user: CurrentUser, pbs: Prebuilds) -> Response:
    """Delete the prebuild and its snapshot; workspaces forked from it keep running."""
    await pbs.delete(pbs.get_for(user, pid), actor=user.name)
    return Response(status_code=204)
