"""``create_app(settings)``: the FastAPI application, its services wired in the lifespan.

No import-time globals: everything hangs off ``app.state`` and is built from Settings.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from server import __version__, backends
from server.agent.direct import direct_counts
from server.api import (
    event_stream,
    files,
    forges,
    gpus,
    health,
    limits,
    ports,
    prebuilds,
    processes,
    snapshots,
    ssh_keys,
    terminal,
    usage,
    users,
    workspaces,
)
from server.api import exec as exec_routes
from server.api.guard import BodyGuard
from server.api.observe import Observe
from server.auth.token_cache import TokenCache
from server.backends import Backend
from server.config import Settings
from server.db.migrate import ensure_schema
from server.db.models import Meta, Workspace
from server.db.session import make_engine, make_session_factory, prepare_data_dir
from server.errors import DenError
from server.forges.pull_requests import ForgeService
from server.gpus.allocation import GpuPool
from server.logs import request_id
from server.metrics import Metrics, StateCollector, checkpoint_usage, serve_separately
from server.network.denials import KmsgWatcher
from server.network.guard import NetworkGuard
from server.pool.warm import WarmPool
from server.prebuilds.service import PrebuildService
from server.preview import tokens as preview_tokens
from server.preview.dispatch import PreviewMiddleware
from server.preview.service import PreviewService
from server.quotas.rates import RateLimit
from server.runtime.base import Runtime
from server.runtime.errors import EngineUnavailable
from server.snapshots.service import SnapshotService
from server.ssh.keys import SSHKeyService
from server.web.mount import mount as mount_web
from server.web.render import error_page, is_page
from server.web.sessions import session_secret
from server.workspaces.files import FileService
from server.workspaces.processes import ProcessService
from server.workspaces.reaper import Reaper
from server.workspaces.service import WorkspaceService
from server.workspaces.supervisor import EngineSupervisor

log = logging.getLogger(__name__)


def instance_id(sessions: sessionmaker[Session]) -> str:
    """This installation's id (labels every engine object it creates); made once."""
    with sessions.begin() as s:
        row = s.scalar(select(Meta).where(Meta.key == "instance_id"))
        if row is None:
            row = Meta(key="instance_id", value=secrets.token_hex(8))
            s.add(row)
        return row.value


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found",
               405: "method_not_allowed", 413: "too_large", 422: "invalid"}


def unparsable_body(cause: BaseException | None) -> str | None:
    """Why FastAPI could not parse a JSON body (its 400 "error parsing the body"), or None
    when the 400 had another cause."""
    if isinstance(cause, UnicodeDecodeError):
        return "the request body is not valid UTF-8 (JSON must be)"
    if isinstance(cause, RecursionError):
        return "the request body nests too deeply (more than about 1,000 levels)"
    if isinstance(cause, ValueError):
        return f"the request body is not valid JSON: {cause}"
    return None


def _error(status: int, code: str, message: str,
           fields: dict[str, object] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **(fields or {})}},
                        status_code=status)


def _allowed_methods(request: Request) -> list[str]:
    """The methods of ``request``'s path, as the OpenAPI document lists them: of the templates
    that match, the one with the most literal segments wins (``/ssh-keys/challenge`` over
    ``/ssh-keys/{key_id}``). A path the document does not describe (the web pages) is tried
    against the router with each method."""
    got = request.url.path.strip("/").split("/")
    best, methods = -1, set[str]()
    for template, ops in request.app.openapi().get("paths", {}).items():
        parts = template.strip("/").split("/")
        if len(parts) != len(got) or not all(
                p.startswith("{") or p == g for p, g in zip(parts, got, strict=True)):
            continue
        literal = sum(not p.startswith("{") for p in parts)
        if literal > best:
            best, methods = literal, set()
        if literal == best:
            methods |= {m.upper() for m in ops}
    if best < 0:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            scope = {**request.scope, "method": method}
            if any(r.matches(scope)[0] is Match.FULL for r in request.app.router.routes):
                methods.add(method)
    return sorted(methods)


def create_app(settings: Settings, *, runtime: Runtime | None = None,
               network: NetworkGuard | None = None) -> FastAPI:
    """Build the app. Without ``runtime``, the backend the settings name (server/backends.py)
    gives the runtime, its network guard and its devcontainer builder; with one (tests),
    ``network`` is its guard and devcontainer.json is refused."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        prepare_data_dir(settings.data_dir)
        url = settings.resolved_database_url()
        engine = make_engine(url)
        ensure_schema(engine, url, auto_migrate=settings.auto_migrate)
        sessions = make_session_factory(engine)
        pool = await asyncio.to_thread(GpuPool.from_settings, settings)
        backend = (Backend(runtime=runtime, network=network) if runtime is not None
                   else backends.load(settings, gpus=pool))
        rt, guard = backend.runtime, backend.network
        instance = instance_id(sessions)
        warm = WarmPool(settings=settings, runtime=rt, instance_id=instance, metrics=metrics)
        svc = WorkspaceService(settings=settings, sessions=sessions, runtime=rt,
                               instance_id=instance, metrics=metrics,
                               network=guard, gpus=pool, pool=warm,
                               devcontainers=backend.devcontainers)
        denials: KmsgWatcher | None = None
        if guard is not None:  # fail closed: no server whose workspaces escape the policy
            await guard.sync(svc.networks.policies)
            if guard.log_denied:
                denials = KmsgWatcher(guard.log_tag, svc.networks.record_denial)
                denials.start()
        app.state.settings = settings
        app.state.sessions = sessions
        app.state.token_cache = TokenCache()  # bearer tokens seen lately (server/auth/)
        app.state.token_cache.watch(sessions)
        app.state.workspaces = svc
        app.state.files = FileService(svc)
        app.state.processes = ProcessService(svc)
        app.state.snapshots = SnapshotService(svc)
        app.state.prebuilds = PrebuildService(svc, app.state.snapshots)
        app.state.previews = PreviewService(
            svc, key=preview_tokens.derive_key(session_secret(settings)))
        forge_svc = ForgeService(settings=settings, sessions=sessions, workspaces=svc)
        forge_svc.attach()
        app.state.forges = forge_svc
        svc.remove_leftovers()

        async def reconcile() -> None:
            await svc.reconcile()
            with sessions() as s:
                forge_svc.reconcile(set(s.scalars(select(Workspace.id))))

        supervisor = EngineSupervisor(runtime=rt, reconcile=reconcile,
                                      interval_s=settings.engine_check_interval_s,
                                      retry_max_s=settings.engine_retry_max_s,
                                      on_event=svc.apply_engine_event,
                                      instance=svc.instance_id)
        app.state.engine = supervisor
        await supervisor.start()  # checks and reconciles once; then watches, follows events
        await app.state.prebuilds.recover()
        warm.start()  # after the first reconcile: it removed the last run's pool
        collector = StateCollector(
            metrics=metrics, sessions=sessions, gate=svc.long_calls.counts,
            checkpoint_bytes=lambda: checkpoint_usage(rt, settings.data_dir),
            gpu_total=len(pool.gpus), port_connections=lambda: direct_counts(rt),
            file_transfers=lambda: dict(app.state.files.transfers))
        metrics.registry.register(collector)
        stop_listener = (serve_separately(settings.metrics_listen, metrics)
                         if settings.metrics_listen else None)
        reaper = Reaper(svc, settings)
        app.state.reaper = reaper
        if settings.reaper_interval_s > 0:
            reaper.start()
        app.state.ssh_keys = SSHKeyService(sessions)
        app.state.ssh_gateway = None
        try:
            if settings.ssh_port > 0:  # the SSH gateway, on the same address as HTTP
                from server.ssh.gateway import Gateway

                app.state.ssh_gateway = Gateway(settings=settings, workspaces=svc,
                                                keys=app.state.ssh_keys)
                await app.state.ssh_gateway.start()
            yield
        finally:
            if app.state.ssh_gateway is not None:
                await app.state.ssh_gateway.stop()
            await reaper.stop()
            await warm.stop()
            if denials is not None:
                await asyncio.to_thread(denials.stop)
            if guard is not None:
                await guard.close()
            await supervisor.stop()
            await app.state.previews.pool.close()
            await app.state.prebuilds.shutdown()
            await svc.shutdown()
            if stop_listener is not None:
                stop_listener()
            metrics.registry.unregister(collector)
            close = getattr(rt, "close", None)
            if runtime is None and close is not None:
                close()
            engine.dispose()

    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN (issue 11). The
    # schema stays at /openapi.json for any OpenAPI viewer.
    app = FastAPI(title="Den", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None,
                  description="Persistent dev workspaces, isolated with gVisor.")
    metrics = Metrics()  # this app's own registry
    app.state.metrics = metrics
    app.add_middleware(BodyGuard, settings=settings)  # inside Observe: refusals are logged
    app.add_middleware(RateLimit, settings=settings)  # before authentication reads the database
    app.add_middleware(Observe, metrics=metrics)

    @app.exception_handler(DenError)
    async def den_error(request: Request, exc: DenError) -> Response:
        if isinstance(exc, EngineUnavailable) and hasattr(request.app.state, "engine"):
            request.app.state.engine.report_unavailable(exc.message)
        if exc.status_code >= 500:
            log.error("%s %s: %s (%s)", request.method, request.url.path, exc.message,
                      exc.detail)
        if is_page(request):
            return error_page(request, exc.status_code, exc.code, exc.message)
        response = _error(exc.status_code, exc.code, exc.message, getattr(exc, "fields", None))
        response.headers.update(getattr(exc, "headers", None) or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error(422, "invalid", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        status, message = exc.status_code, str(exc.detail)
        if status == 400 and (why := unparsable_body(exc.__cause__)) is not None:
            status, message = 422, why  # like a JSON syntax error: bad input, 422 invalid
        code = _HTTP_CODES.get(status, "http_error")
        if is_page(request):
            response = error_page(request, status, code, message)
        else:
            response = _error(status, code, message)
        response.headers.update(exc.headers or {})
        if status == 405:  # every method of the path, not only the first route's
            response.headers["Allow"] = ", ".join(_allowed_methods(request))
        return response

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        response = _error(500, "internal", "internal server error (this is a bug; see the log)")
        if rid := request_id.get():  # answered outside the middleware that adds it
            response.headers["X-Request-ID"] = rid
        return response

    for module in (health, users, limits, workspaces, exec_routes, files, processes, snapshots,
                   prebuilds, forges, ssh_keys, ports, gpus, usage):
        app.include_router(module.router)
    app.include_router(terminal.router)
    app.include_router(event_stream.router)
    app.add_middleware(PreviewMiddleware)  # inside the session middleware that mount_web adds
    mount_web(app, settings)
    return app
