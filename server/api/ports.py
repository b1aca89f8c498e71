"""Preview ports: the listening ports of a workspace with their URLs, share levels and
signed share links (docs/preview.md)."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request, Response

from server.api.deps import CurrentUser, Workspaces
from server.api.schemas import (
    PortList,
    PortOut,
    PortShareIn,
    ShareLinkIn,
    ShareLinkInfo,
    ShareLinkList,
    ShareLinkOut,
    errors,
)
from server.db.models import Workspace
from server.errors import NotFound
from server.preview import urls
from server.preview.access import SHARE_PARAM
from server.preview.service import PreviewService, Share

router = APIRouter(prefix="/api/v1/workspaces", tags=["ports"])


def preview_service(request: Request) -> PreviewService:
    return request.app.state.previews  # type: ignore[no-any-return]


Previews = Annotated[PreviewService, Depends(preview_service)]


def _port(text: str) -> int:
    port = urls.valid_port(text)
    if port is None:
        raise NotFound(f"no port {text!r}: ports are 1-65535")
    return port


def _urls(request: Request, previews: PreviewService, ws: Workspace, port: int
          ) -> tuple[str | None, str]:
    return previews.urls_of(ws, port, base_url=str(request.base_url))


def _out(request: Request, previews: PreviewService, ws: Workspace, port: int, share: Share,
         listening: bool | None, label: str = "") -> PortOut:
    url, path_url = _urls(request, previews, ws, port)
    return PortOut(port=port, listening=listening, share=previews.effective(share).value,
                   url=url, path_url=path_url, label=label)


@router.get("/{ref}/ports", response_model=PortList, responses=errors(404, 409, 502, 503))
async def list_ports(ref: str, request: Request, user: CurrentUser, svc: Workspaces,
                     previews: Previews) -> PortList:
    ws = svc.get_for(user, ref)
    found = await previews.ports(ws)
    return PortList(ports=[_out(request, previews, ws, p.port, p.share, p.listening, p.label)
                           for p in found])


@router.put("/{ref}/ports/{port}", response_model=PortOut, responses=errors(403, 404))
def set_port_share(ref: str, port: str, body: PortShareIn, request: Request,
                   user: CurrentUser, svc: Workspaces, previews: Previews) -> PortOut:
    ws = svc.get_for(user, ref)
    number = _port(port)
    share = previews.set_share(ws, number, body.share, actor=user.name)
    return _out(request, previews, ws, number, share, None, previews.label_of(ws.id, number))


@router.post("/{ref}/ports/{port}/links", response_model=ShareLinkOut, status_code=201,
             responses=errors(403, 404))
def make_share_link(ref: str, port: str, body: ShareLinkIn, request: Request,
                    user: CurrentUser, svc: Workspaces, previews: Previews) -> ShareLinkOut:
    ws = svc.get_for(user, ref)
    number = _port(port)
    token, link = previews.share_link(ws, number, body.ttl_s, actor=user.name)
    url, path_url = _urls(request, previews, ws, number)
    query = "?" + urlencode({SHARE_PARAM: token})
    return ShareLinkOut(id=link.id, url=url + query if url else None,
                        path_url=path_url + query, expires_at=link.expires_at)


@router.get("/{ref}/ports/{port}/links", response_model=ShareLinkList, responses=errors(404))
def list_share_links(ref: str, port: str, user: CurrentUser, svc: Workspaces,
                     previews: Previews) -> ShareLinkList:
    ws = svc.get_for(user, ref)
    return ShareLinkList(links=[
        ShareLinkInfo(id=r.id, port=r.port, created_by=r.created_by, created_at=r.created_at,
                      expires_at=r.expires_at) for r in previews.links(ws, _port(port))])


@router.delete("/{ref}/ports/{port}/links/{link_id}", status_code=204, responses=errors(404))
def revoke_share_link(ref: str, port: str, link_id: str, user: CurrentUser, svc: Workspaces,
                      previews: Previews) -> Response:
    ws = svc.get_for(user, ref)
    previews.revoke_link(ws, _port(port), link_id, actor=user.name)
    return Response(status_code=204)
