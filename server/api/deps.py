"""FastAPI dependencies: the services, and the current user from a bearer token."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security, WebSocket
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from server.auth.tokens import authenticate
from server.db.models import User
from server.errors import Forbidden, Unauthorized
from server.forges.pull_requests import ForgeService
from server.prebuilds.service import PrebuildService
from server.snapshots.service import SnapshotService
from server.ssh.keys import SSHKeyService
from server.workspaces.files import FileService
from server.workspaces.processes import ProcessService
from server.workspaces.service import WorkspaceService


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def user_from_header(app_state: object, header: str | None) -> User:
    token = _bearer(header)
    if token is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    user = authenticate(app_state.sessions, token,  # type: ignore[attr-defined]
                        getattr(app_state, "token_cache", None))
    if user is None:
        raise Unauthorized("invalid or revoked token")
    return user


# Declares the scheme in the OpenAPI document; user_from_header alone decides (auto_error
# off: a missing or malformed header gets Den's own 401).
BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                    description="An API token: `Authorization: Bearer den_...`")


def metrics_reader(
    request: Request,
    _declared: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> None:
    """``/metrics``: the metrics token (``DEN_METRICS_TOKEN``) or an admin's API token."""
    token = _bearer(request.headers.get("authorization"))
    secret = request.app.state.settings.metrics_token.get_secret_value()
    if token is not None and secret and hmac.compare_digest(token.encode(), secret.encode()):
        return
    if not user_from_header(request.app.state, request.headers.get("authorization")).is_admin:
        raise Forbidden("the metrics need an admin's API token or the metrics token")


async def current_user(
    request: Request,
    _declared: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> User:
    """The bearer token's user: found by :class:`server.api.guard.BodyGuard` before the body
    was read (every ``/api/`` request; async, so taking it costs no thread hop), or here, on
    a worker thread, for a route outside ``/api/``."""
    user = getattr(request.state, "user", None)
    if isinstance(user, User):
        return user
    return await run_in_threadpool(user_from_header, request.app.state,
                                   request.headers.get("authorization"))


def websocket_user(websocket: WebSocket) -> User:
    return user_from_header(websocket.app.state, websocket.headers.get("authorization"))


def workspace_service(request: Request) -> WorkspaceService:
    return request.app.state.workspaces  # type: ignore[no-any-return]


def snapshot_service(request: Request) -> SnapshotService:
    return request.app.state.snapshots  # type: ignore[no-any-return]


def file_service(request: Request) -> FileService:
    return request.app.state.files  # type: ignore[no-any-return]


def process_service(request: Request) -> ProcessService:
    return request.app.state.processes  # type: ignore[no-any-return]


def ssh_key_service(request: Request) -> SSHKeyService:
    return request.app.state.ssh_keys  # type: ignore[no-any-return]


CurrentUser = Annotated[User, Depends(current_user)]


def admin_user(user: CurrentUser) -> User:
    """The caller, who must be an admin (403 otherwise)."""
    if not user.is_admin:
        raise Forbidden("only an admin may do this")
    return user


AdminUser = Annotated[User, Depends(admin_user)]
MetricsReader = Annotated[None, Depends(metrics_reader)]
Workspaces = Annotated[WorkspaceService, Depends(workspace_service)]
Files = Annotated[FileService, Depends(file_service)]
Processes = Annotated[ProcessService, Depends(process_service)]
Snapshots = Annotated[SnapshotService, Depends(snapshot_service)]


def prebuild_service(request: Request) -> PrebuildService:
    return request.app.state.prebuilds  # type: ignore[no-any-return]


Prebuilds = Annotated[PrebuildService, Depends(prebuild_service)]


def forge_service(request: Request) -> ForgeService:
    return request.app.state.forges  # type: ignore[no-any-return]


Forges = Annotated[ForgeService, Depends(forge_service)]
SSHKeys = Annotated[SSHKeyService, Depends(ssh_key_service)]

