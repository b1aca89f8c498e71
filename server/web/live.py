"""What the workspace page refreshes without a reload: its ports table (rendered by the
same template as the page) and its resource use for the chart. Neither wakes a paused or
stopped workspace, nor counts as activity."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.web import csrf
from server.web.deps import WebUser
from server.web.pages import ports_of
from server.workspaces.usage import usage_report

router = APIRouter(include_in_schema=False)


@router.get("/workspaces/{ref}/live.json")
async def workspace_live(request: Request, ref: str, user: WebUser) -> JSONResponse:
    svc = request.app.state.workspaces
    ws = svc.get_for(user, ref)
    templates = request.app.state.templates
    ports_html = templates.get_template("_ports.html").render(
        ws=ws, ports=await ports_of(request, ws), csrf_token=csrf.token(request),
        public_sharing=svc.settings.preview_public_sharing)
    used = await usage_report(svc, ws)
    return JSONResponse({
        "state": ws.state, "ports_html": ports_html,
        "usage": {"cpu_ns": used.cpu_ns, "memory_bytes": used.memory_bytes, "cpus": used.cpus,
                  "memory_limit_bytes": used.memory_limit_bytes,
                  "at": used.at.timestamp()},
    }, headers={"Cache-Control": "no-store"})
