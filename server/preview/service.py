"""Preview ports: share levels (stored per workspace and port), the listening ports, signed
share links, the per-workspace connection cap, and connections into the workspace.

Share-level changes and public exposure are recorded in the workspace's event log through
the workspace service (the one writer of workspace state; a share level is not a state, so
this service keeps its own table and only adds events).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import delete, func, select

from server.db.models import PreviewLink, PreviewPort, User, WebSession, Workspace
from server.errors import Conflict, DenError, Forbidden, NotFound, ValidationFailed
from server.preview import tokens, urls
from server.preview.cache import AccessCache
from server.preview.pool import UpstreamPool
from server.preview.proxy import Upstream
from server.runtime.base import ExecRequest, ExecStream
from server.runtime.errors import AgentTimeout, AgentUnavailable, EngineConflict
from server.ssh import target
from server.workspaces.service import WorkspaceService
from server.workspaces.states import State

log = logging.getLogger(__name__)

PROC_NET_TCP = ["cat", "/proc/net/tcp", "/proc/net/tcp6"]
PORTS_OUTPUT_BYTES = 1 << 20
LONG_CONNECTION_S = 5.0  # the workspace service's activity debounce
MAX_LINKS = 100  # live share links per workspace


class Share(StrEnum):
    PRIVATE = "private"  # the owner (and admins)
    USERS = "users"  # anyone signed in to this Den
    PUBLIC = "public"  # anyone with the URL


class PortClosed(DenError):
    """Nothing answers on the port inside the workspace."""

    status_code = 502
    code = "port_closed"


class TooManyConnections(DenError):
    status_code = 503
    code = "too_many_connections"


@dataclass(frozen=True)
class PortInfo:
    port: int
    listening: bool | None  # None: the workspace is not running, nobody can tell
    share: Share
    label: str = ""  # from the devcontainer's portsAttributes


def may_open(*, share: Share, viewer: User | None, owner_id: int, link_ok: bool,
             public_allowed: bool) -> bool:
    """Whether ``viewer`` (None: not signed in) may open a port: the one decision."""
    if viewer is not None and (viewer.id == owner_id or viewer.is_admin):
        return True
    if link_ok:
        return True
    if share is Share.PUBLIC and public_allowed:
        return True
    return share in (Share.USERS, Share.PUBLIC) and viewer is not None


class PreviewService:
    """Share levels, port listing, links, and connections for preview URLs."""

    def __init__(self, workspaces: WorkspaceService, *, key: bytes) -> None:
        self.workspaces = workspaces
        self.settings = workspaces.settings
        self.key = key
        self._open: Counter[str] = Counter()
        self._waking: dict[str, asyncio.Task[None]] = {}
        self.pool = UpstreamPool()
        self._touched: dict[str, float] = {}  # workspace id -> when a reuse last marked it
        # The access decision's reads (workspace, share level, link, sign-in), per burst.
        self.cache = AccessCache()
        self.cache.watch(workspaces.sessions)
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)  # expiries (tests)

    # --- finding the workspace (cached: the rows are detached, read only) -----------------

    def by_owner_and_name(self, owner: str, name: str) -> Workspace | None:
        def load() -> Workspace | None:
            with self.workspaces.sessions() as s:
                return s.scalar(select(Workspace).join(User, Workspace.owner_id == User.id)
                                .where(User.name == owner, Workspace.name == name))
        return self.cache.get(("name", owner, name), load)

    def by_ref(self, ref: str, viewer: User | None) -> Workspace | None:
        """The path form's ``<workspace>``: an id (anyone's), or a name of the viewer's own."""
        def load() -> Workspace | None:
            with self.workspaces.sessions() as s:
                row = s.get(Workspace, ref)
                if row is None and viewer is not None:
                    row = s.scalar(select(Workspace).where(Workspace.owner_id == viewer.id,
                                                           Workspace.name == ref))
                return row
        return self.cache.get(("ref", ref, viewer.id if viewer else None), load)

    def signed_in(self, session_hash: str) -> User | None:
        """The user of the live Den session whose id hashes to ``session_hash`` (a preview
        origin's cookie, or Den's own on the path form), or None: logging out ends it at
        once, and so does its expiry."""
        def load() -> tuple[User | None, datetime]:
            with self.workspaces.sessions() as s:
                row = s.scalar(select(WebSession)
                               .where(WebSession.session_hash == session_hash))
                if row is None:
                    return None, datetime.min.replace(tzinfo=UTC)
                user = s.get(User, row.user_id)
                if user is not None:
                    s.expunge(user)
                return user, row.expires_at
        user, expires_at = self.cache.get(("session", session_hash), load)
        return user if expires_at > self.clock() else None

    # --- share levels ----------------------------------------------------------------------

    def _rows(self, workspace_id: str) -> dict[int, PreviewPort]:
        with self.workspaces.sessions() as s:
            rows = s.scalars(select(PreviewPort).where(PreviewPort.workspace_id == workspace_id))
            return {r.port: r for r in rows}

    def _shares(self, workspace_id: str) -> dict[int, Share]:
        return {p: Share(r.share) for p, r in self._rows(workspace_id).items()}

    def label_of(self, workspace_id: str, port: int) -> str:
        return getattr(self._rows(workspace_id).get(port), "label", "")

    def share_of(self, workspace_id: str, port: int) -> Share:
        return self._shares(workspace_id).get(port, Share.PRIVATE)

    def served_share(self, workspace_id: str, port: int) -> Share:
        """:meth:`share_of` as a preview request reads it (cached), before :meth:`effective`."""
        return self.cache.get(("share", workspace_id, port),
                              lambda: self.share_of(workspace_id, port))

    def set_share(self, ws: Workspace, port: int, share: str, *, actor: str) -> Share:
        if urls.valid_port(str(port)) is None:
            raise NotFound(f"no port {port}: ports are 1-65535")
        try:
            level = Share(share)
        except ValueError:
            raise ValidationFailed("share must be one of private, users, public") from None
        if level is Share.PUBLIC and not self.settings.preview_public_sharing:
            raise Forbidden("public sharing is turned off on this server "
                            "(DEN_PREVIEW_PUBLIC_SHARING)", code="public_sharing_off")
        old = self.share_of(ws.id, port)
        if old is level:
            return level
        now = datetime.now(UTC)
        label = self.label_of(ws.id, port)
        with self.workspaces.sessions.begin() as s:
            s.execute(delete(PreviewPort).where(PreviewPort.workspace_id == ws.id,
                                                PreviewPort.port == port))
            if level is not Share.PRIVATE or label:  # a labelled port stays listed
                s.add(PreviewPort(workspace_id=ws.id, port=port, share=level.value,
                                  label=label, updated_by=actor[:64], updated_at=now))
        message = f"port {port}: share {old.value} -> {level.value}"
        if level is Share.PUBLIC:
            message += " (public: anyone with its URL can open it, without signing in)"
        self.workspaces.note(ws.id, "share", message, actor=actor)
        log.info("workspace %s: %s by %s", ws.id, message, actor)
        return level

    def effective(self, share: Share) -> Share:
        """A share level as served: ``public`` reads as ``users`` while public sharing is off."""
        if share is Share.PUBLIC and not self.settings.preview_public_sharing:
            return Share.USERS
        return share

    # --- ports ------------------------------------------------------------------------------

    async def ports(self, ws: Workspace) -> list[PortInfo]:
        """The ports listening inside a running workspace (asked of /proc/net/tcp{,6}, not
        waking it) and the ports with a share level, sorted; ``listening`` is None where the
        workspace could not be asked."""
        rows = self._rows(ws.id)
        shares = {p: Share(r.share) for p, r in rows.items()}
        listening: set[int] | None = None
        if State(ws.state) is State.RUNNING:
            # Straight to the runtime, not the service's exec: looking at the ports neither
            # wakes the workspace nor counts as activity (a dashboard open on it would keep
            # it awake forever).
            req = ExecRequest(argv=PROC_NET_TCP, user="dev", cwd="/", timeout_s=10.0,
                              max_output_bytes=PORTS_OUTPUT_BYTES)
            try:
                result = await self.workspaces.runtime.exec(self.workspaces.spec_for(ws), req)
            except DenError as exc:
                log.info("workspace %s: ports not read: %s", ws.id, exc.message)
            else:
                listening = set(urls.listening_ports(result.stdout.decode("ascii", "replace")))
        ports = sorted(set(shares) | (listening or set()))
        return [PortInfo(port=p, listening=None if listening is None else p in listening,
                         share=shares.get(p, Share.PRIVATE),
                         label=rows[p].label if p in rows else "") for p in ports]

    def urls_of(self, ws: Workspace, port: int, *, base_url: str) -> tuple[str | None, str]:
        """The subdomain URL (None without DEN_PREVIEW_DOMAIN or when the name cannot be a
        DNS label) and the path-form URL of ``port``; ``base_url`` is Den's own URL when
        DEN_PUBLIC_URL is not set (the request's)."""
        base = self.settings.public_url or base_url
        parts = urlsplit(base)
        host_url = urls.host_url(scheme=parts.scheme or "http",
                                 domain=self.settings.preview_domain, port=port,
                                 workspace=ws.name, owner=ws.owner.name, public_port=parts.port)
        return host_url, urls.path_url(base, ws.id, port)

    # --- share links ------------------------------------------------------------------------

    def share_link(self, ws: Workspace, port: int, ttl_s: int, *, actor: str
                   ) -> tuple[str, PreviewLink]:
        """A signed token that opens ``port`` of ``ws`` for ``ttl_s`` seconds, and its row
        (id, expiry): the link works while the row exists. Recorded in the event log."""
        if urls.valid_port(str(port)) is None:
            raise NotFound(f"no port {port}: ports are 1-65535")
        if not 60 <= ttl_s <= self.settings.preview_max_link_ttl_s:
            raise ValidationFailed(
                f"ttl_s must be between 60 and {self.settings.preview_max_link_ttl_s}")
        expires_at = int(time.time()) + ttl_s
        row = PreviewLink(id="lk" + secrets.token_hex(8), workspace_id=ws.id, port=port,
                          created_by=actor[:64], created_at=datetime.now(UTC),
                          expires_at=datetime.fromtimestamp(expires_at, UTC))
        with self.workspaces.sessions.begin() as s:
            self._prune(s, ws.id)
            live = s.scalar(select(func.count()).select_from(PreviewLink)
                            .where(PreviewLink.workspace_id == ws.id)) or 0
            if live >= MAX_LINKS:
                raise Conflict(f"workspace {ws.name} has {MAX_LINKS} live share links; "
                               "revoke some first (den share NAME PORT --links)",
                               code="too_many_links")
            s.add(row)
            s.flush()
            s.expunge(row)
        token = tokens.share_link(self.key, workspace_id=ws.id, port=port, link_id=row.id,
                                  expires_at=expires_at)
        self.workspaces.note(ws.id, "share", f"port {port}: share link {row.id} made, "
                                             f"valid for {ttl_s} s", actor=actor)
        return token, row

    @staticmethod
    def _prune(s: Any, workspace_id: str) -> None:
        s.execute(delete(PreviewLink).where(PreviewLink.workspace_id == workspace_id,
                                            PreviewLink.expires_at <= datetime.now(UTC)))

    def links(self, ws: Workspace, port: int) -> list[PreviewLink]:
        """The live share links of ``port``, oldest first."""
        with self.workspaces.sessions.begin() as s:
            self._prune(s, ws.id)
            rows = list(s.scalars(select(PreviewLink).where(
                PreviewLink.workspace_id == ws.id, PreviewLink.port == port)
                .order_by(PreviewLink.created_at, PreviewLink.id)))
            s.expunge_all()
            return rows

    def revoke_link(self, ws: Workspace, port: int, link_id: str, *, actor: str) -> None:
        """End a share link before it expires: from now on it is refused as a tampered one
        is (and so is the cookie it left in a browser)."""
        with self.workspaces.sessions.begin() as s:
            res = s.execute(delete(PreviewLink).where(
                PreviewLink.id == link_id, PreviewLink.workspace_id == ws.id,
                PreviewLink.port == port))
            gone = res.rowcount  # type: ignore[attr-defined]
        if not gone:
            raise NotFound(f"no live share link {link_id!r} for port {port} of {ws.name}")
        self.workspaces.note(ws.id, "share", f"port {port}: share link {link_id} revoked",
                             actor=actor)
        log.info("workspace %s: port %d: share link %s revoked by %s", ws.id, port, link_id,
                 actor)

    def link_allows(self, token: str | None, ws: Workspace, port: int) -> bool:
        """Whether ``token`` is a valid, unexpired, unrevoked share link for ``port``."""
        if not token:
            return False
        payload = tokens.verify(self.key, tokens.SHARE, token, now=time.time())
        link_id = tokens.share_link_id(payload, workspace_id=ws.id, port=port)
        if link_id is None:
            return False

        def load() -> tuple[str, int, datetime] | None:
            with self.workspaces.sessions() as s:
                row = s.get(PreviewLink, link_id)
                return None if row is None else (row.workspace_id, row.port, row.expires_at)
        row = self.cache.get(("link", link_id), load)
        return row is not None and row[:2] == (ws.id, port) and row[2] > self.clock()

    def wake_in_background(self, ws: Workspace, *, actor: str) -> None:
        """Start a stopped workspace without waiting (a browser gets a page that reloads
        itself meanwhile); one wake per workspace at a time."""
        task = self._waking.get(ws.id)
        if task is not None and not task.done():
            return
        self._waking[ws.id] = asyncio.create_task(self._wake(ws.id, actor))

    async def _wake(self, workspace_id: str, actor: str) -> None:
        try:
            await self.workspaces.ensure_running(workspace_id, actor=actor)
        except DenError as exc:
            log.info("workspace %s: preview wake failed: %s", workspace_id, exc.message)
        finally:
            self._waking.pop(workspace_id, None)

    # --- connections ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(self, workspace_id: str) -> AsyncIterator[None]:
        """One of the workspace's preview connections (503 past the cap); activity while
        held, so a workspace serving a preview is never idle."""
        if self._open[workspace_id] >= self.settings.preview_max_connections:
            raise TooManyConnections(
                f"too many preview connections to this workspace "
                f"(DEN_PREVIEW_MAX_CONNECTIONS={self.settings.preview_max_connections})")
        self._open[workspace_id] += 1
        started = time.monotonic()
        try:
            async with self.workspaces.activity.hold(workspace_id):
                yield
        finally:
            self._open[workspace_id] -= 1
            if self._open[workspace_id] <= 0:
                del self._open[workspace_id]
            # connect() marked the start; a long connection (a WebSocket, a stream) marks its
            # end too, so that the idle clock starts when it closed. A database write per
            # short request would cost more than it tells.
            if time.monotonic() - started > LONG_CONNECTION_S:
                self.workspaces.touch(workspace_id)

    async def connect(self, ws: Workspace, port: int, *, actor: str) -> ExecStream:
        """A TCP connection to ``port`` on the workspace's loopback, waking it first (a
        paused workspace resumes, a stopped one starts). PortClosed when nothing listens."""
        svc = self.workspaces
        try:
            try:
                stream = await svc.connect_port(ws.id, "127.0.0.1", port, actor=actor)
            except EngineConflict:  # a server on "localhost" may have bound ::1 only (Vite)
                stream = await svc.connect_port(ws.id, "::1", port, actor=actor)
            if stream is None:  # a workspace without the agent: a relay through exec
                req = ExecRequest(argv=target.relay_argv("127.0.0.1", port), user="dev",
                                  cwd=svc.repo_path(ws))
                stream = await svc.exec_stream(ws.id, req, actor=actor)
        except (EngineConflict, AgentUnavailable, AgentTimeout) as exc:
            raise PortClosed(f"nothing answers on port {port} in workspace {ws.name}: "
                             f"{exc.message}") from exc
        return stream

    async def upstream(self, ws: Workspace, port: int, *, actor: str, fresh: bool = False
                       ) -> Upstream:
        """A connection to ``port`` for one HTTP request: an idle one from the pool (the
        workspace is running, or it would be gone), else a new one (:meth:`connect`)."""
        up = None if fresh else self.pool.take(ws.id, port)
        if up is None:
            stream = await self.connect(ws, port, actor=actor)
            return Upstream(stream, idle_timeout_s=self.settings.preview_idle_timeout_s)
        now = time.monotonic()  # activity, as connect marks it, without a write per request
        if now - self._touched.get(ws.id, -LONG_CONNECTION_S) >= LONG_CONNECTION_S:
            if len(self._touched) >= 4096:
                self._touched.clear()
            self._touched[ws.id] = now
            self.workspaces.touch(ws.id)
        return up
