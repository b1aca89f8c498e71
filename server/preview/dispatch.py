"""The front door of preview URLs: an ASGI middleware that takes preview requests before
the app's routes see them (docs/preview.md).

* a Host under ``DEN_PREVIEW_DOMAIN``: ``<port>--<workspace>--<owner>.<domain>`` (its own
  browser origin), with ``/_den/auth`` on it reserved for Den's sign-in hand-over;
* ``/preview/<workspace>/<port>/...`` on Den's own origin (the path form);
* ``/preview-auth?to=<preview URL>`` on Den's origin: where a preview origin sends a browser
  that is not signed in there; it comes back with a one-minute grant that ``/_den/auth`` turns
  into that origin's own ``den_preview`` cookie. Den's session cookie never goes to a preview
  origin, and Den's cookies are removed from every request that goes to an app.

It sits inside the session middleware (the path form and ``/preview-auth`` read Den's session)
and outside the app's exception handlers, so it renders its own errors.
"""

from __future__ import annotations

import html
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from server.db.models import User, Workspace
from server.errors import DenError
from server.preview import access, headers, proxy, tokens, urls
from server.preview.service import PreviewService, may_open
from server.web import sessions as web_sessions
from server.workspaces.states import State

log = logging.getLogger(__name__)

AUTH_PATH = "/_den/auth"  # on a preview origin
GRANT_PATH = "/preview-auth"  # on Den's origin
DENIED = "no such preview, or you may not open it"
BAD_LINK = "this share link is invalid or has expired"


@dataclass(frozen=True)
class _Target:
    port: int
    raw_target: bytes  # path and query for the app
    prefix: str | None  # path form: /preview/<workspace>/<port>
    preview_host: str | None  # subdomain form: the origin's host
    cookie_path: str
    host_form: urls.HostTarget | None = None
    path_form: urls.PathTarget | None = None


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return ""


def _secure(scope: Scope) -> bool:
    return scope.get("scheme") in ("https", "wss")


def _cookie(name: str, value: str, *, path: str, max_age_s: int, secure: bool
            ) -> tuple[bytes, bytes]:
    attrs = f"{name}={value}; Path={path}; Max-Age={max_age_s}; HttpOnly; SameSite=Lax"
    return b"set-cookie", (attrs + ("; Secure" if secure else "")).encode("latin-1")


async def _redirect(send: Send, location: str, *, extra: list[tuple[bytes, bytes]] | None = None
                    ) -> None:
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", location.encode("latin-1")),
                            (b"content-length", b"0"), (b"cache-control", b"no-store"),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": b""})


def _navigation(scope: Scope) -> bool:
    """A browser loading a page (not a script's request)."""
    return scope["type"] == "http" and scope["method"] == "GET" and proxy.wants_html(scope)


async def _waking_page(send: Send, name: str) -> None:
    body = (f"<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=1>"
            f"<title>Waking {html.escape(name)}</title><p>Starting workspace "
            f"{html.escape(name)}; this page reloads itself until the app answers.</p>").encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"text/html; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"1"), (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})


async def _continue_page(send: Send, location: str) -> None:
    """A page that goes on to ``location`` at once. Not a redirect: after the login form, a
    redirect to another origin would be part of the form's navigation, which Den's
    Content-Security-Policy (form-action 'self') rightly blocks."""
    url = html.escape(location, quote=True)
    body = (f'<!doctype html><meta charset=utf-8><meta http-equiv="refresh" content="0;url={url}">'
            f'<title>Opening the preview</title><p><a href="{url}">Continue to the preview'
            f'</a></p>').encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/html; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"),
                            (b"referrer-policy", b"no-referrer")]})
    await send({"type": "http.response.body", "body": body})


def _safe_next(target: str) -> str:
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


class PreviewMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        settings = state.settings
        host = _header(scope, b"host")
        try:
            if urls.is_preview_host(host, settings.preview_domain):
                await self._preview_origin(scope, receive, send, state, host)
            elif scope["path"] == GRANT_PATH and scope["type"] == "http":
                await self._grant(scope, send, state)
            elif scope["path"].startswith(urls.PATH_PREFIX):
                await self._path_form(scope, receive, send, state)
            else:
                await self.app(scope, receive, send)
        except proxy.CutShort:
            return

    # --- the two forms ------------------------------------------------------------------

    async def _preview_origin(self, scope: Scope, receive: Receive, send: Send, state: Any,
                              host: str) -> None:
        name = urls.host_name(host)
        if scope["path"] == AUTH_PATH and scope["type"] == "http":
            await self._take_grant(scope, send, state, name)
            return
        found = urls.parse_host(host, state.settings.preview_domain)
        if found is None:
            await self._deny(scope, send, 404, "not_found", DENIED)
            return
        raw = scope.get("raw_path") or scope["path"].encode()
        target = _Target(port=found.port, raw_target=raw, prefix=None, preview_host=name,
                         cookie_path="/", host_form=found)
        await self._serve(scope, receive, send, state, target)

    async def _path_form(self, scope: Scope, receive: Receive, send: Send, state: Any) -> None:
        found = urls.parse_path(scope["path"])
        raw = scope.get("raw_path") or scope["path"].encode()
        if found is None or not raw.startswith(found.prefix.encode()):
            await self._deny(scope, send, 404, "not_found", DENIED)
            return
        target = _Target(port=found.port, raw_target=raw[len(found.prefix):], prefix=found.prefix,
                         preview_host=None, cookie_path=found.prefix + "/", path_form=found)
        await self._serve(scope, receive, send, state, target)

    # --- sign-in hand-over --------------------------------------------------------------

    async def _grant(self, scope: Scope, send: Send, state: Any) -> None:
        """On Den's origin: send a signed-in browser back to the preview origin it came from,
        with a grant for that origin only."""
        conn = HTTPConnection(scope)
        to = conn.query_params.get("to", "")
        parts = urlsplit(to)
        if parts.scheme not in ("http", "https") or urls.parse_host(
                parts.netloc, state.settings.preview_domain) is None:
            await proxy.error_response(send, scope, 400, "bad_request",
                                       "to must be a preview URL of this server")
            return
        user = web_sessions.user_of(conn, state.sessions)
        shash = web_sessions.session_hash(conn)
        if user is None or shash is None:
            here = f"{GRANT_PATH}?{urlencode({'to': to})}"
            await _redirect(send, f"/login?next={quote(here, safe='')}")
            return
        grant = access.grant(state.previews.key, preview_host=urls.host_name(parts.netloc),
                             session_hash=shash)
        back = _safe_next(parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        await _continue_page(send, f"{parts.scheme}://{parts.netloc}{AUTH_PATH}?"
                                   + urlencode({"grant": grant, "next": back}))

    async def _take_grant(self, scope: Scope, send: Send, state: Any, name: str) -> None:
        """On a preview origin: turn a grant into this origin's own cookie."""
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        value = access.cookie_from_grant(state.previews.key, query.get("grant", ""),
                                         preview_host=name,
                                         max_age_s=state.settings.session_max_age_s)
        if value is None:
            await proxy.error_response(send, scope, 403, "forbidden",
                                       "the sign-in hand-over is invalid or has expired; "
                                       "open the preview URL again")
            return
        cookie = _cookie(access.PREVIEW_COOKIE, value, path="/", secure=_secure(scope),
                         max_age_s=state.settings.session_max_age_s)
        await _redirect(send, _safe_next(query.get("next", "/")), extra=[cookie])

    # --- serving --------------------------------------------------------------------------

    async def _deny(self, scope: Scope, send: Send, status: int, code: str, message: str
                    ) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await proxy.error_response(send, scope, status, code, message)

    async def _sign_in(self, scope: Scope, send: Send, state: Any, target: _Target) -> None:
        query = scope.get("query_string", b"").decode("latin-1")
        if not _navigation(scope):
            await self._deny(scope, send, 401, "unauthorized",
                             "sign in to Den first, or send 'Authorization: Bearer <token>'")
            return
        if target.preview_host is None:
            here = scope["path"] + (f"?{query}" if query else "")
            await _redirect(send, f"/login?next={quote(here, safe='')}")
            return
        den = state.settings.public_url.rstrip("/")
        if not den:
            await self._deny(scope, send, 401, "unauthorized",
                             "signing in to preview origins needs DEN_PUBLIC_URL on the server")
            return
        scheme = "https" if _secure(scope) else "http"
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        here = f"{scheme}://{_header(scope, b'host')}{path}" + (f"?{query}" if query else "")
        await _redirect(send, f"{den}{GRANT_PATH}?" + urlencode({"to": here}))

    def _workspace(self, previews: PreviewService, target: _Target, user: User | None
                   ) -> Workspace | None:
        if target.host_form is not None:
            return previews.by_owner_and_name(target.host_form.owner, target.host_form.workspace)
        assert target.path_form is not None
        return previews.by_ref(target.path_form.workspace, user)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, state: Any,
                     target: _Target) -> None:
        previews: PreviewService = state.previews
        conn = HTTPConnection(scope)
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                          keep_blank_values=True)
        from_param = next((v for k, v in query if k == access.SHARE_PARAM), None)
        if from_param is not None and tokens.verify(previews.key, tokens.SHARE, from_param,
                                                    now=time.time()) is None:
            await self._deny(scope, send, 403, "forbidden", BAD_LINK)
            return
        user = access.viewer(conn, state=state, previews=previews,
                             preview_host=target.preview_host)
        ws = self._workspace(previews, target, user)
        link = from_param if from_param is not None else conn.cookies.get(access.SHARE_COOKIE)
        link_ok = ws is not None and previews.link_allows(link, ws, target.port)
        if from_param is not None and not link_ok:
            await self._deny(scope, send, 403, "forbidden", BAD_LINK)
            return
        share = previews.effective(previews.served_share(ws.id, target.port)) if ws else None
        if ws is None or share is None or not may_open(
                share=share, viewer=user, owner_id=ws.owner_id, link_ok=link_ok,
                public_allowed=state.settings.preview_public_sharing):
            if user is None and not link_ok:
                await self._sign_in(scope, send, state, target)
            else:
                await self._deny(scope, send, 404, "not_found", DENIED)
            return
        if scope["type"] == "http" and from_param is not None:
            payload = tokens.verify(previews.key, tokens.SHARE, from_param, now=time.time())
            assert payload is not None
            rest = urlencode([(k, v) for k, v in query if k != access.SHARE_PARAM])
            cookie = _cookie(access.SHARE_COOKIE, from_param, path=target.cookie_path,
                             max_age_s=max(1, int(payload["e"] - time.time())),
                             secure=_secure(scope))
            here = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
            await _redirect(send, here + (f"?{rest}" if rest else ""), extra=[cookie])
            return
        if target.prefix is not None and not target.raw_target and scope["type"] == "http":
            qs = scope.get("query_string", b"").decode("latin-1")
            await _redirect(send, target.prefix + "/" + (f"?{qs}" if qs else ""))
            return
        actor = user.name if user is not None else "preview"
        if ws.state in (State.STOPPED.value, State.STARTING.value) and _navigation(scope):
            previews.wake_in_background(ws, actor=actor)  # a cold start takes seconds
            await _waking_page(send, ws.name)
            return
        try:
            async with previews.slot(ws.id):
                await self._relay(scope, receive, send, state, target, ws, actor)
        except DenError as exc:
            if exc.status_code >= 500:
                log.info("preview of %s port %d: %s", ws.id, target.port, exc.message)
            await self._deny(scope, send, exc.status_code, exc.code, exc.message)

    async def _relay(self, scope: Scope, receive: Receive, send: Send, state: Any,
                     target: _Target, ws: Workspace, actor: str) -> None:
        previews: PreviewService = state.previews
        given = [(k, v) for k, v in scope["headers"]]
        host = _header(scope, b"host")
        if not host:  # an HTTP/1.0 request may lack one; the app gets Den's own address
            server = scope.get("server") or ("localhost", None)
            host = f"{server[0]}:{server[1]}" if server[1] else str(server[0])
            given.append((b"host", host.encode("latin-1")))
        client = scope.get("client")
        proto = "https" if _secure(scope) else "http"
        head = headers.request_headers(given, client_ip=client[0] if client else "",
                                       proto=proto, host=host, prefix=target.prefix)
        qs = scope.get("query_string", b"")
        raw = (target.raw_target or b"/") + (b"?" + qs if qs else b"")
        if scope["type"] == "websocket":
            stream = await previews.connect(ws, target.port, actor=actor)
            up = proxy.Upstream(stream, idle_timeout_s=None)
            await proxy.websocket(scope, receive, send, up, target=raw.decode("latin-1"),
                                  host=host, head=head, port=target.port)
            return
        names = {k.lower() for k, _ in scope["headers"]}
        chunked = b"transfer-encoding" in names and b"content-length" not in names
        body = proxy.has_body(scope["headers"])
        origin = state.settings.public_url.rstrip("/")

        def rewrite(h: headers.Headers) -> headers.Headers:
            return headers.response_headers(h, prefix=target.prefix, origin=origin)

        for fresh in (False, True):  # a reused connection found closed: once more, anew
            up = await previews.upstream(ws, target.port, actor=actor, fresh=fresh)
            try:
                kept = await proxy.http(scope, receive, send, up, target=raw, head=head,
                                        body=body, chunked=chunked, rewrite=rewrite,
                                        port=target.port)
            except proxy.StaleUpstream:
                continue
            if kept:
                previews.pool.give(ws.id, target.port, up)
            return
