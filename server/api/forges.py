"""Forge routes: link, list and unlink accounts; open a pull request from a workspace."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from fastapi.responses import JSONResponse

from server.api.deps import CurrentUser, Forges, Workspaces
from server.api.schemas import (
    ForgeLink,
    ForgeList,
    ForgeOut,
    PullRequestCreate,
    PullRequestOut,
    RowId,
    errors,
)
from server.forges.pull_requests import PullRequestRequest

router = APIRouter(tags=["forges"])


@router.post("/api/v1/users/me/forges", status_code=status.HTTP_201_CREATED,
             response_model=ForgeOut, responses=errors(429, 502))
async def link_forge(body: ForgeLink, user: CurrentUser, forges: Forges) -> ForgeOut:
    """Check the token with the forge, then store it encrypted; linking the same base URL
    again replaces the token."""
    row = await forges.link(user, kind=body.kind, base_url=body.base_url, token=body.token,
                            api_url=body.api_url, author_name=body.author_name,
                            author_email=body.author_email)
    return ForgeOut.of(row)


@router.get("/api/v1/users/me/forges", response_model=ForgeList, responses=errors())
def list_forges(user: CurrentUser, forges: Forges) -> ForgeList:
    return ForgeList(forges=[ForgeOut.of(r) for r in forges.accounts.list_for(user)])


@router.delete("/api/v1/users/me/forges/{account_id}", status_code=204,
               responses=errors(404))
def unlink_forge(account_id: RowId, user: CurrentUser, forges: Forges) -> Response:
    forges.accounts.delete(user, account_id)
    return Response(status_code=204)


@router.post("/api/v1/workspaces/{ref}/pull-requests", response_model=PullRequestOut,
             status_code=status.HTTP_201_CREATED,
             responses={200: {"model": PullRequestOut,
                              "description": "An open pull request for the branch existed; "
                                             "the branch was updated"},
                        **errors(403, 404, 409, 413, 429, 502, 503, 504)})
async def open_pull_request(ref: str, body: PullRequestCreate, user: CurrentUser,
                            svc: Workspaces, forges: Forges) -> JSONResponse:
    ws = svc.get_for(user, ref)
    result = await forges.open_pull_request(user, ws, PullRequestRequest(
        title=body.title, body=body.body, branch=body.branch, base=body.base,
        commit_message=body.commit_message, draft=body.draft))
    out = PullRequestOut(number=result.number, url=result.url, branch=result.branch,
                         base=result.base, head_sha=result.head_sha, created=result.created,
                         push=result.push, forge=result.forge)
    return JSONResponse(out.model_dump(), status_code=201 if result.created else 200)
