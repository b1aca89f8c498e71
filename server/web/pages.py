"""The dashboard: workspaces (live state, create, lifecycle, snapshots, forks, events), the
terminal page, API tokens and SSH keys. Pages act through the same services as the HTTP API, as the
signed-in user, so the same authorization applies (another user's workspace is a 404)."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from server.api.terminal import SESSION_RE
from server.auth import tokens
from server.db.models import User, Workspace
from server.errors import DenError, NotFound, ValidationFailed
from server.preview.urls import valid_port
from server.ssh.proof import NAMESPACE
from server.web.deps import CSRF, WebUser
from server.web.render import ago, flash, page
from server.workspaces.service import CreateRequest, WorkspaceService
from server.workspaces.states import TRANSITIONAL, State

router = APIRouter(include_in_schema=False)

LIFECYCLE = ("start", "stop", "pause", "resume", "delete")
CONFIRM = {  # actions that ask first: what they do, in words
    "stop": "Stop {name}? Its processes end; its disk is kept and it can be started again.",
    "delete": "Delete {name}? Its container and its disk are removed for good.",
    "restore": "Roll {name} back to snapshot {snap}? Its current files are replaced.",
    "delete-snapshot": "Delete snapshot {snap} of {name}?",
}


def _svc(request: Request) -> WorkspaceService:
    return request.app.state.workspaces  # type: ignore[no-any-return]


def _back(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _state(ws: Workspace) -> dict[str, Any]:
    return {"id": ws.id, "name": ws.name, "owner": ws.owner.name, "state": ws.state,
            "state_reason": ws.state_reason, "busy": State(ws.state) in TRANSITIONAL,
            "last_activity": ago(ws.last_activity_at),
            "last_activity_at": ws.last_activity_at.isoformat()}


# --- workspaces --------------------------------------------------------------------------


@router.get("/workspaces")
def dashboard(request: Request, user: WebUser) -> Response:
    settings = request.app.state.settings
    failed = request.session.pop("create_form", None) or {}  # the last create's error, once
    svc = _svc(request)
    gpus = None
    if user.is_admin and svc.gpus.gpus:  # who holds which GPU: admins only
        with svc.sessions() as s:
            gpus = svc.gpus.holders(s)
    return page(request, "dashboard.html", user=user, workspaces=svc.list_for(user),
                form=failed.get("form", {}), error=failed.get("error", ""), defaults=settings,
                gpus=gpus)


@router.get("/workspaces/state.json")
def dashboard_state(request: Request, user: WebUser) -> JSONResponse:
    return JSONResponse({"workspaces": [_state(w) for w in _svc(request).list_for(user)]},
                        headers={"Cache-Control": "no-store"})


def _number(value: str, kind: type[int] | type[float], label: str) -> Any:
    if not value.strip():
        return None
    try:
        return kind(value)
    except ValueError:
        raise ValidationFailed(f"{label} must be a number") from None


@router.post("/workspaces", dependencies=[CSRF])
async def create(request: Request, user: WebUser,
                 repo_url: Annotated[str, Form()] = "", branch: Annotated[str, Form()] = "",
                 name: Annotated[str, Form()] = "", image: Annotated[str, Form()] = "",
                 cpus: Annotated[str, Form()] = "", memory_mb: Annotated[str, Form()] = "",
                 disk_gb: Annotated[str, Form()] = "") -> Response:
    svc = _svc(request)
    form = {"repo_url": repo_url, "branch": branch, "name": name, "image": image,
            "cpus": cpus, "memory_mb": memory_mb, "disk_gb": disk_gb}
    try:
        if not repo_url.strip():
            raise ValidationFailed("give the URL of a Git repository")
        ws = await svc.create(user, CreateRequest(
            name=name.strip() or None, repo_url=repo_url.strip(),
            branch=branch.strip() or None, image=image.strip() or None,
            cpus=_number(cpus, float, "CPUs"), memory_mb=_number(memory_mb, int, "Memory"),
            disk_gb=_number(disk_gb, int, "Disk"),
        ))
    except DenError as exc:  # redirect-after-post: a reload shows the error, not a re-send
        request.session["create_form"] = {"form": form, "error": exc.message}
        return _back("/workspaces#new")
    flash(request, f"Creating {ws.name}: cloning {ws.repo_url}.", while_creating=ws.id)
    return _back("/workspaces")


async def ports_of(request: Request, ws: Workspace) -> list[dict[str, Any]]:
    """The workspace's ports for its page: number, listening, share level and link."""
    previews = request.app.state.previews
    try:
        found = await previews.ports(ws)
    except DenError:  # the page still shows; the ports are what the database knows
        found = []
    rows = []
    for p in found:
        url, path_url = previews.urls_of(ws, p.port, base_url=str(request.base_url))
        rows.append({"port": p.port, "listening": p.listening,
                     "share": previews.effective(p.share).value, "url": url or path_url})
    return rows


@router.get("/workspaces/{ref}")
async def workspace_page(request: Request, ref: str, user: WebUser) -> Response:
    svc = _svc(request)
    ws = svc.get_for(user, ref)
    return page(request, "workspace.html", user=user, ws=ws,
                snapshots=request.app.state.snapshots.list_for(ws),
                ports=await ports_of(request, ws),
                public_sharing=svc.settings.preview_public_sharing,
                ssh_on=svc.settings.ssh_port > 0,
                events=list(reversed(svc.events(ws.id, limit=100))))


@router.post("/workspaces/{ref}/ports", dependencies=[CSRF])
def share_port(request: Request, ref: str, user: WebUser, port: Annotated[str, Form()] = "",
               share: Annotated[str, Form()] = "") -> Response:
    ws = _svc(request).get_for(user, ref)
    number = valid_port(port.strip())
    try:
        if number is None:
            raise ValidationFailed(f"{port!r} is not a port (1-65535)")
        level = request.app.state.previews.set_share(ws, number, share, actor=user.name)
        flash(request, f"Port {number} of {ws.name} is {level.value}.")
    except DenError as exc:
        flash(request, f"Could not share port {port} of {ws.name}: {exc.message}", "error")
    return _back(f"/workspaces/{ws.id}")


@router.get("/workspaces/{ref}/state.json")
def workspace_state(request: Request, ref: str, user: WebUser) -> JSONResponse:
    svc = _svc(request)
    ws = svc.get_for(user, ref)
    events = [{"at": e.at.isoformat(timespec="seconds"), "kind": e.kind, "actor": e.actor,
               "from_state": e.from_state, "to_state": e.to_state, "message": e.message}
              for e in reversed(svc.events(ws.id, limit=100))]
    return JSONResponse({**_state(ws), "events": events}, headers={"Cache-Control": "no-store"})


@router.get("/workspaces/{ref}/confirm/{action}")
def confirm(request: Request, ref: str, action: str, user: WebUser) -> Response:
    ws = _svc(request).get_for(user, ref)
    if action not in ("stop", "delete"):
        raise NotFound(f"no action {action!r}")
    return page(request, "confirm.html", user=user, ws=ws, action=action,
                question=CONFIRM[action].format(name=ws.name, snap=""),
                post_to=f"/workspaces/{ws.id}/{action}", back=f"/workspaces/{ws.id}",
                with_snapshots=action == "delete")


@router.post("/workspaces/{ref}/snapshots", dependencies=[CSRF])
async def take_snapshot(request: Request, ref: str, user: WebUser,
                        name: Annotated[str, Form()] = "",
                        memory: Annotated[str, Form()] = "") -> Response:
    ws = _svc(request).get_for(user, ref)
    try:
        snap = await request.app.state.snapshots.create(
            ws.id, name=name.strip(), memory=bool(memory), actor=user.name)
        flash(request, f"Snapshot {snap.name} taken.")
    except DenError as exc:
        flash(request, f"Snapshot failed: {exc.message}", "error")
    return _back(f"/workspaces/{ws.id}")


@router.post("/workspaces/{ref}/network", dependencies=[CSRF])
async def set_network(request: Request, ref: str, user: WebUser,
                      mode: Annotated[str, Form()] = "",
                      allow: Annotated[str, Form(max_length=4096)] = "") -> Response:
    """The network policy form: a mode and allowlist entries separated by spaces or commas."""
    svc = _svc(request)
    ws = svc.get_for(user, ref)
    entries = [e for e in allow.replace(",", " ").split() if e]
    try:
        await svc.networks.set(ws.id, mode, entries if mode == "allowlist" else [],
                              actor=user.name)
        flash(request, f"Network of {ws.name}: {mode}.")
    except DenError as exc:
        flash(request, f"Network not changed: {exc.message}", "error")
    return _back(f"/workspaces/{ws.id}")


@router.post("/workspaces/{ref}/{action}", dependencies=[CSRF])
async def lifecycle(request: Request, ref: str, action: str, user: WebUser,
                    snapshots: Annotated[str, Form()] = "",
                    back: Annotated[str, Form()] = "") -> Response:
    svc = _svc(request)
    ws = svc.get_for(user, ref)
    if action not in LIFECYCLE:
        raise NotFound(f"no action {action!r}")
    target = back if back in ("/workspaces", f"/workspaces/{ws.id}") else f"/workspaces/{ws.id}"
    try:
        if action == "delete":
            if snapshots:
                await request.app.state.snapshots.delete_all_of(ws.id, actor=user.name)
            await svc.delete(ws.id, actor=user.name)
            flash(request, f"Deleted {ws.name}.")
            return _back("/workspaces")
        op = {"start": svc.start, "stop": svc.stop, "pause": svc.pause, "resume": svc.resume}
        done = await op[action](ws.id, actor=user.name)
        flash(request, f"{ws.name} is {done.state}.")
    except DenError as exc:
        flash(request, f"Could not {action} {ws.name}: {exc.message}", "error")
    return _back(target)


@router.get("/workspaces/{ref}/terminal")
def terminal_page(request: Request, ref: str, user: WebUser, session: str = "main") -> Response:
    ws = _svc(request).get_for(user, ref)
    if SESSION_RE.fullmatch(session) is None:
        raise ValidationFailed("session must be 1-32 lowercase letters, digits or '-'")
    return page(request, "terminal.html", user=user, ws=ws, session=session,
                new_session=secrets.token_hex(3), xterm=request.app.state.xterm_installed)


# --- snapshots ---------------------------------------------------------------------------


def _snapshot_and_workspace(request: Request, sid: str, user: User) -> tuple[Any, Workspace]:
    snap = request.app.state.snapshots.get_for(user, sid)
    if snap.workspace_id is None:
        raise NotFound(f"snapshot {sid!r} has no workspace any more")
    return snap, _svc(request).get_for(user, snap.workspace_id)


@router.get("/snapshots/{sid}/confirm/{action}")
def confirm_snapshot(request: Request, sid: str, action: str, user: WebUser) -> Response:
    snap, ws = _snapshot_and_workspace(request, sid, user)
    key = {"restore": "restore", "delete": "delete-snapshot"}.get(action)
    if key is None:
        raise NotFound(f"no action {action!r}")
    return page(request, "confirm.html", user=user, ws=ws, action=action,
                question=CONFIRM[key].format(name=ws.name, snap=snap.name),
                post_to=f"/snapshots/{snap.id}/{action}", back=f"/workspaces/{ws.id}",
                with_snapshots=False)


@router.post("/snapshots/{sid}/{action}", dependencies=[CSRF])
async def snapshot_action(request: Request, sid: str, action: str, user: WebUser,
                          name: Annotated[str, Form()] = "") -> Response:
    snaps = request.app.state.snapshots
    snap, ws = _snapshot_and_workspace(request, sid, user)
    try:
        if action == "fork":
            fork = await snaps.fork(user, snap, name=name.strip() or f"{snap.name}-fork")
            flash(request, f"Forking {snap.name} into {fork.name}.")
            return _back(f"/workspaces/{fork.id}")
        if action == "restore":
            await snaps.restore(snap, actor=user.name)
            flash(request, f"{ws.name} rolled back to {snap.name}.")
        elif action == "delete":
            await snaps.delete(snap.id, actor=user.name)
            flash(request, f"Snapshot {snap.name} deleted.")
        else:
            raise NotFound(f"no action {action!r}")
    except NotFound:
        raise
    except DenError as exc:
        flash(request, f"Could not {action} {snap.name}: {exc.message}", "error")
    return _back(f"/workspaces/{ws.id}")


# --- API tokens --------------------------------------------------------------------------


def _tokens_page(request: Request, user: User, **extra: Any) -> Response:
    with request.app.state.sessions() as s:
        rows = tokens.list_tokens(s, user)
    return page(request, "tokens.html", user=user, tokens=rows, **extra)


@router.get("/tokens")
def tokens_page(request: Request, user: WebUser) -> Response:
    return _tokens_page(request, user)


@router.post("/tokens", dependencies=[CSRF])
def create_token(request: Request, user: WebUser, name: Annotated[str, Form()] = "") -> Response:
    try:
        with request.app.state.sessions.begin() as s:
            row, secret = tokens.issue_token(s, user, name=name.strip())
            created = {"name": row.name, "token": secret}
    except DenError as exc:
        return _tokens_page(request, user, error=exc.message)
    return _tokens_page(request, user, created=created)  # shown once, never stored in clear


@router.post("/tokens/{token_id}/revoke", dependencies=[CSRF])
def revoke_token(request: Request, token_id: int, user: WebUser) -> Response:
    with request.app.state.sessions.begin() as s:
        tokens.revoke_token(s, user, token_id)
    flash(request, "Token revoked.")
    return _back("/tokens")


# --- SSH keys ----------------------------------------------------------------------------


def _keys_page(request: Request, user: User, **extra: Any) -> Response:
    settings = request.app.state.settings
    challenge, _ = request.app.state.ssh_keys.challenge(user)
    return page(request, "ssh_keys.html", user=user, challenge=challenge,
                namespace=NAMESPACE,
                keys=request.app.state.ssh_keys.list_for(user),
                ssh_port=settings.ssh_port, host=request.url.hostname or settings.host,
                workspaces=_svc(request).list_for(user), **extra)


@router.get("/ssh-keys")
def keys_page(request: Request, user: WebUser) -> Response:
    return _keys_page(request, user)


@router.post("/ssh-keys", dependencies=[CSRF])
def add_key(request: Request, user: WebUser, public_key: Annotated[str, Form()] = "",
            name: Annotated[str, Form()] = "", challenge: Annotated[str, Form()] = "",
            signature: Annotated[str, Form()] = "") -> Response:
    try:
        row = request.app.state.ssh_keys.add(user, public_key, name=name.strip() or None,
                                             challenge=challenge, signature=signature)
    except DenError as exc:
        return _keys_page(request, user, error=exc.message,
                          form={"public_key": public_key, "name": name})
    flash(request, f"Key {row.name or row.fingerprint} added.")
    return _back("/ssh-keys")


@router.post("/ssh-keys/{key_id}/delete", dependencies=[CSRF])
def delete_key(request: Request, key_id: int, user: WebUser) -> Response:
    request.app.state.ssh_keys.delete(user, key_id)
    flash(request, "Key removed.")
    return _back("/ssh-keys")
