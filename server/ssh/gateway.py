"""The SSH gateway: ``ssh -p 2222 <workspace>@host`` into workspaces, with asyncssh.

One connection, in order:

1. ``connection_made``: the source address. An address past the failure limit
   (:mod:`server.ssh.ratelimit`) is disconnected when it asks to authenticate.
2. Authentication: public keys only (password, keyboard-interactive and host-based are not
   offered). ``validate_public_key`` accepts a key when it is registered (the key names the
   user) *and* the SSH user name is one of that user's workspaces (:func:`target.workspace_refs`).
   Every refusal is the same ``False``: an unknown key, an unknown workspace and another
   user's workspace all read "Permission denied (publickey)" to the client.
3. ``auth_completed``: an ``ssh`` event in the workspace's log, and the workspace is woken
   (resumed or started) in the background, so that the wake overlaps the channel setup.
4. Channels, each bridged to one process in the workspace started through the workspace
   service (``exec_stream``, which wakes the workspace as well), and each held as activity
   for the idle policy while open:

   * session ``shell`` / ``exec``: ``WorkspaceService.shell_request`` (a login shell as dev in
     the repo directory, or ``bash -lc CMD``), on a terminal when the client asked for a pty;
   * session subsystem ``sftp``: OpenSSH's ``sftp-server`` inside the workspace;
   * ``direct-tcpip`` (``ssh -L``): a relay inside the workspace connecting to the
     destination, which must be the workspace itself (:func:`target.forward_allowed`).

   Remote forwarding, Unix-socket forwarding, X11 and agent forwarding are refused.
5. ``connection_lost``: a closing event with the duration; a connection that never
   authenticated counts as a failure for its address.

asyncssh exceptions stay in this package; the service's errors (``DenError``) reach the
client as ``den: <message>`` on stderr and exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import asyncssh

from server.agent.ops import StreamEnded
from server.config import Settings
from server.db.models import User, Workspace
from server.errors import DenError, NotFound, QuotaExceeded
from server.quotas.service import Slot
from server.runtime.base import ExecRequest, ExecStream, StreamChunk
from server.ssh import target
from server.ssh.keys import SSHKeyService, fingerprint
from server.ssh.ratelimit import FailureLimiter
from server.workspaces.service import WorkspaceService

log = logging.getLogger(__name__)

HOST_KEY_FILES = (("ssh_host_ed25519_key", "ssh-ed25519"), ("ssh_host_rsa_key", "ssh-rsa"))
MAX_KEYS_PER_CONNECTION = 10  # rejected keys before the connection is dropped (MaxAuthTries)
INBOX_HIGH = 1 << 20  # client bytes queued for the workspace before the channel is paused
INBOX_LOW = 256 << 10
BATCH = 1 << 20  # the most client bytes written to the workspace in one call
AGENT_REFUSED = (
    "den: agent forwarding is refused: every process in the workspace could use your keys "
    "while you are connected. See docs/ssh.md."
)


def load_host_keys(data_dir: Path) -> list[asyncssh.SSHKey]:
    """The gateway's host keys under ``data_dir``, made on first use (mode 0600)."""
    keys = []
    for name, alg in HOST_KEY_FILES:
        path = data_dir / name
        if not path.exists():
            key = asyncssh.generate_private_key(alg, key_size=3072) if alg == "ssh-rsa" \
                else asyncssh.generate_private_key(alg)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key.export_private_key("openssh"))
            os.replace(tmp, path)
            path.with_name(name + ".pub").write_bytes(key.export_public_key("openssh"))
            log.info("ssh: made host key %s (%s)", path, fingerprint(key))
        keys.append(asyncssh.read_private_key(str(path)))
    return keys


class Gateway:
    """The SSH server. ``start`` binds ``settings.host`` : ``settings.ssh_port`` (0 in
    tests picks a free port; see :attr:`port`); ``stop`` closes the listener and every
    connection."""

    def __init__(self, *, settings: Settings, workspaces: WorkspaceService,
                 keys: SSHKeyService, port: int | None = None) -> None:
        self.settings = settings
        self.workspaces = workspaces
        self.keys = keys
        self.limiter = FailureLimiter(max_failures=settings.ssh_max_auth_failures,
                                      window_s=settings.ssh_auth_failure_window_s)
        self._bind_port = settings.ssh_port if port is None else port
        self._server: asyncssh.SSHAcceptor | None = None
        self._connections: set[_Connection] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self.port = 0

    def background(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``work`` as a task the gateway holds until it ends (the loop holds tasks
        only weakly)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def preauth_full(self, address: str) -> str | None:
        """Why a new connection from ``address`` must wait (too many connections have not
        authenticated yet, in all or from that address), or None."""
        waiting = [c for c in self._connections if c.auth is None]
        if len(waiting) >= self.settings.ssh_max_preauth:
            return f"{len(waiting)} connections are authenticating"
        mine = sum(1 for c in waiting if c.peer[0] == address)
        if mine >= self.settings.ssh_max_preauth_per_address:
            return f"{mine} connections from {address} are authenticating"
        return None

    async def start(self) -> None:
        if not log.isEnabledFor(logging.DEBUG):  # asyncssh logs every channel at INFO
            logging.getLogger("asyncssh").setLevel(logging.WARNING)
        host_keys = await asyncio.to_thread(load_host_keys, self.settings.data_dir)
        try:
            self._server = await asyncssh.create_server(
                lambda: _Connection(self), self.settings.host, self._bind_port,
                server_host_keys=host_keys, encoding=None, line_editor=False,
                x11_forwarding=False, agent_forwarding=False, allow_pty=True,
                password_auth=False, kbdint_auth=False, gss_host=None,
                login_timeout=self.settings.ssh_login_timeout_s,
                keepalive_interval=60, server_version="Den", reuse_address=True,
            )
        except OSError as exc:
            raise DenError(f"cannot listen for SSH on {self.settings.host}:{self._bind_port}: "
                           f"{exc.strerror or exc}", code="ssh_listen") from exc
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("ssh: gateway listening on %s:%d", self.settings.host, self.port)

    @property
    def serving(self) -> bool:
        """Whether the gateway is listening."""
        return self._server is not None

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for conn in list(self._connections):
            conn.close()
        if self._background:  # events still being written
            await asyncio.wait(set(self._background), timeout=5)


@dataclasses.dataclass
class _Auth:
    user: User
    workspace_id: str
    workspace_name: str
    key_id: int
    key_label: str


class _Connection(asyncssh.SSHServer):
    """One client connection: authentication, and the channels it opens (deny by default)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.svc = gateway.workspaces
        self._conn: asyncssh.SSHServerConnection | None = None
        self.peer: tuple[str, int] = ("?", 0)
        self.local: tuple[str, int] = ("?", 0)
        self._candidate: _Auth | None = None
        self.auth: _Auth | None = None
        self._rejected = 0
        self._refused = False
        self._opened_at = 0.0
        self._wake: asyncio.Future[Any] | None = None
        self._recorded: asyncio.Task[None] | None = None
        self.agent_requested = False
        self.agent_notice_sent = False
        self.channels = {"session": 0, "forward": 0}

    # --- connection ---------------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        sock = conn.get_extra_info("sockname") or ("?", 0)
        self.peer = (str(peer[0]), int(peer[1]))
        self.local = (str(sock[0]), int(sock[1]))
        if reason := self.gw.preauth_full(self.peer[0]):
            self._refused = True  # not a failed attempt: the limiter does not count it
            log.info("ssh: refused %s: %s", self._where(), reason)
            conn.abort()
            return
        # asyncssh asks the connection whether to set up agent forwarding: answer no, and
        # remember that the client asked so that its sessions can say why.
        setattr(conn, "create_agent_listener", self._agent_requested)  # noqa: B010
        self.gw._connections.add(self)

    async def _agent_requested(self) -> bool:
        self.agent_requested = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.gw._connections.discard(self)
        if self._wake is not None and not self._wake.done():
            self._wake.add_done_callback(_consume)
        if self.auth is None:
            if not self._refused:
                self.gw.limiter.record_failure(self.peer[0], time.monotonic())
            return
        self.svc.metrics.session_closed("ssh")
        seconds = time.monotonic() - self._opened_at
        parts = [f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in self.channels.items() if n]
        self.gw.background(self._record_close(
            f"ssh connection from {self._where()} closed after {seconds:.0f} s"
            + (f" ({', '.join(parts)})" if parts else "")))
        log.info("ssh: %s from %s to workspace %s closed after %.1f s", self.auth.user.name,
                 self._where(), self.auth.workspace_id, seconds)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _where(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}"

    def _note(self, message: str) -> None:
        assert self.auth is not None
        try:  # the workspace may have been deleted meanwhile
            self.svc.note(self.auth.workspace_id, "ssh", message, actor=self.auth.user.name)
        except Exception as exc:  # an event lost is not worth a failed session
            log.debug("ssh: event for %s not written: %s", self.auth.workspace_id, exc)

    # --- authentication -------------------------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        wait_s = self.gw.limiter.retry_after_s(self.peer[0], time.monotonic())
        if wait_s > 0 and self._conn is not None:
            self._refused = True
            log.info("ssh: refused %s: too many failed attempts", self._where())
            self._conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                  f"too many failed attempts from {self.peer[0]}; try again in "
                                  f"{wait_s:.0f} s")
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """True when ``key`` is registered and ``username`` names one of its owner's
        workspaces; every other case is the same False (no existence leak). The database
        is read on a worker thread: unauthenticated clients never hold the event loop."""
        if self._refused:
            return False
        found = await asyncio.to_thread(self.gw.keys.owner_of, key)
        ws = None
        if found is not None:
            user, row = found
            ws = await asyncio.to_thread(self._workspace_named, user, username)
        if found is None or ws is None:
            self._rejected += 1
            log.info("ssh: refused key %s for %r from %s", fingerprint(key), username,
                     self._where())
            if self._rejected >= MAX_KEYS_PER_CONNECTION and self._conn is not None:
                self._conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                      "too many authentication failures")
            return False
        self._candidate = _Auth(user=user, workspace_id=ws.id, workspace_name=ws.name,
                                key_id=row.id, key_label=row.name or row.fingerprint)
        return True

    def _workspace_named(self, user: User, username: str) -> Workspace | None:
        for ref in target.workspace_refs(username):
            try:
                return self.svc.get_for(user, ref)
            except NotFound:
                continue
        return None

    def auth_completed(self) -> None:
        # The last key accepted is the one whose signature just succeeded.
        assert self._candidate is not None
        self.auth = self._candidate
        self._opened_at = time.monotonic()
        self.svc.metrics.session_opened("ssh")
        log.info("ssh: %s from %s authenticated for workspace %s", self.auth.user.name,
                 self._where(), self.auth.workspace_id)
        self._recorded = self.gw.background(self._record_open(self.auth))
        self._wake = asyncio.ensure_future(self._wake_after_record(self.auth))

    async def _record_open(self, auth: _Auth) -> None:
        """The key's last use and the workspace's event, written on worker threads (the
        event loop serves every session)."""
        await asyncio.to_thread(self.gw.keys.mark_used, auth.key_id)
        await asyncio.to_thread(self._note, f"ssh connection opened by {auth.user.name} from "
                                            f"{self._where()} (key {auth.key_label!r})")

    async def _wake_after_record(self, auth: _Auth) -> Any:
        if self._recorded is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._recorded)
        return await self.svc.ensure_running(auth.workspace_id, actor=auth.user.name)

    async def _record_close(self, message: str) -> None:
        if self._recorded is not None:  # after the opening event, whatever became of it
            with contextlib.suppress(Exception):
                await asyncio.shield(self._recorded)
        await asyncio.to_thread(self._note, message)

    async def awake(self) -> None:
        """Wait for the wake started at authentication (raises its DenError)."""
        assert self._wake is not None
        await asyncio.shield(self._wake)

    # --- channels -------------------------------------------------------------------------

    def session_requested(self) -> asyncssh.SSHServerSession[bytes] | bool:
        if self.auth is None:
            return False
        session = _Session(self, self._channel_slot())
        self.channels["session"] += 1
        return session

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> asyncssh.SSHTCPSession[bytes]:
        assert self.auth is not None
        if not target.forward_allowed(dest_host, dest_port,
                                      workspace_name=self.auth.workspace_name):
            log.info("ssh: refused forwarding to %s:%d for %s", dest_host, dest_port,
                     self.auth.user.name)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                "only the workspace itself can be reached (localhost, 127.0.0.1, ::1)")
        forward = _Forward(self, dest_host, dest_port, self._channel_slot())
        self.channels["forward"] += 1
        return forward

    def _channel_slot(self) -> Slot:
        """One of the user's SSH channels (``DEN_MAX_SSH_CHANNELS_PER_USER``), or the
        channel is refused with the limit's message."""
        assert self.auth is not None
        try:
            return self.svc.quotas.take(self.auth.user, "ssh_channels")
        except QuotaExceeded as exc:
            log.info("ssh: channel refused for %s: %s", self.auth.user.name, exc.message)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE,
                                            exc.message) from None

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        log.info("ssh: refused remote forwarding of %s:%d", listen_host, listen_port)
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        return False


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a background wake's result so that its failure is not reported as lost."""
    if not fut.cancelled():
        fut.exception()


class _Bridge:
    """Copies bytes between an SSH channel and a process in the workspace: binary-safe,
    with back-pressure both ways, client EOF passed on as the end of the process's stdin.
    Shared by sessions and forwarded connections."""

    kind = "channel"

    def __init__(self, conn: _Connection, slot: Slot) -> None:
        self.conn = conn
        self.slot = slot  # the user's channel, released when the channel closes
        self.chan: Any = None
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._inbox_bytes = 0
        self._reading_paused = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._task: asyncio.Task[None] | None = None
        self.stream: ExecStream | None = None

    # asyncssh callbacks, shared ----------------------------------------------------------

    def connection_made(self, chan: Any) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self._inbox.put_nowait(data)
        self._inbox_bytes += len(data)
        if self._inbox_bytes > INBOX_HIGH and not self._reading_paused:
            self._reading_paused = True
            self.chan.pause_reading()

    def eof_received(self) -> bool:
        self._inbox.put_nowait(None)
        return True  # keep our side open: the process's output and exit status follow

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.slot.release()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # the bridge ------------------------------------------------------------------------------

    def start(self, make_stream: Callable[[], Awaitable[ExecStream]]) -> None:
        self._task = asyncio.create_task(self._run(make_stream))

    async def _run(self, make_stream: Callable[[], Awaitable[ExecStream]]) -> None:
        auth = self.conn.auth
        assert auth is not None
        svc = self.conn.svc
        try:
            async with svc.activity.hold(auth.workspace_id):
                try:
                    await self.conn.awake()
                    self.stream = await make_stream()
                except DenError as exc:
                    log.info("ssh: %s for %s in workspace %s failed: %s", self.kind,
                             auth.user.name, auth.workspace_id, exc.message)
                    self.failed(exc.message)
                    return
                await self.started()
                pump = asyncio.create_task(self._pump_input(self.stream))
                try:
                    async for chunk in self.stream.output():
                        if not self._can_write.is_set():
                            await self._can_write.wait()
                        self.deliver(chunk)
                    code = await self.stream.wait()
                finally:
                    pump.cancel()
                    with contextlib.suppress(BaseException):
                        await pump
                await self._drain()
                self.finished(code)
        except asyncio.CancelledError:
            pass  # the client closed the channel
        except StreamEnded as exc:  # the workspace went to sleep (or stopped) under it
            log.info("ssh: %s for %s in workspace %s ended: the workspace %s", self.kind,
                     auth.user.name, auth.workspace_id, exc.reason)
            with contextlib.suppress(Exception):
                self.failed(f"the workspace {exc.reason}; connect again to wake it")
        except Exception:
            log.exception("ssh: %s for %s in workspace %s broke", self.kind, auth.user.name,
                          auth.workspace_id)
            with contextlib.suppress(Exception):
                self.chan.close()
        finally:
            # The activity write off the event loop (it is a database write), in a task of
            # the gateway's: nothing here waits for it.
            self.conn.gw.background(_touch(svc, auth.workspace_id))
            if self.stream is not None:
                # Ends what is left of a process whose channel went away; for one that has
                # exited it only closes the engine's stream.
                await self.stream.kill()

    async def _pump_input(self, stream: ExecStream) -> None:
        while True:
            item = await self._inbox.get()
            batch: list[bytes] = []
            eof = item is None
            if item is not None:
                batch.append(item)
                size = len(item)
                while not self._inbox.empty() and size < BATCH:
                    more = self._inbox.get_nowait()
                    if more is None:
                        eof = True
                        break
                    batch.append(more)
                    size += len(more)
                await stream.write(b"".join(batch) if len(batch) > 1 else batch[0])
                self._inbox_bytes -= size
                if self._reading_paused and self._inbox_bytes < INBOX_LOW:
                    self._reading_paused = False
                    self.chan.resume_reading()
            if eof:
                await stream.close_stdin()
                return

    async def _drain(self) -> None:
        """Wait until what was written to the channel has been sent (the exit status must
        not overtake it)."""
        while self.chan.get_write_buffer_size() > 0:
            await asyncio.sleep(0.01)

    # per kind ----------------------------------------------------------------------------

    async def started(self) -> None:
        """The process runs; the channel's input is about to flow to it."""

    def deliver(self, chunk: StreamChunk) -> None:
        self.chan.write(chunk.data)

    def failed(self, message: str) -> None:
        self.chan.close()

    def finished(self, exit_code: int) -> None:
        self.chan.close()


class _Session(_Bridge, asyncssh.SSHServerSession[bytes]):
    """A session channel: a shell, a command, or the sftp subsystem."""

    kind = "session"

    def __init__(self, conn: _Connection, slot: Slot) -> None:
        super().__init__(conn, slot)
        self.term: str | None = None
        self.size: tuple[int, int] | None = None
        self.command: str | None = None
        self.subsystem: str | None = None
        self._sized: tuple[int, int] | None = None
        # Resizes in flight: the loop keeps only weak references to tasks, and a resize task
        # collected mid-way was a window-change lost for good (the shell kept its old size).
        self._resizes: set[asyncio.Task[None]] = set()

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Any) -> bool:
        self.term = term_type or "xterm"
        self.size = _size(term_size[0], term_size[1])
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        if "\x00" in command:
            return False
        self.command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem != "sftp":
            return False
        self.subsystem = subsystem
        return True

    def break_received(self, msec: int) -> bool:
        return False

    def signal_received(self, signal: str) -> None:
        log.debug("ssh: ignored signal %s from the client", signal)

    def session_started(self) -> None:
        self.start(self._make_stream)

    def terminal_size_changed(self, width: int, height: int, pixwidth: int,
                              pixheight: int) -> None:
        self.size = _size(width, height) or self.size
        if self.stream is not None and self.size is not None and self.size != self._sized:
            self._sized = self.size
            log.info("ssh: window change to %dx%d", *self.size)
            task = asyncio.create_task(self.stream.resize(*self.size))
            self._resizes.add(task)
            task.add_done_callback(self._resized)

    def _resized(self, task: asyncio.Task[None]) -> None:
        """A resize has been sent, or failed: said in the log (nothing else awaits it)."""
        self._resizes.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("ssh: a window change was not passed on: %r", exc)

    async def _make_stream(self) -> ExecStream:
        auth = self.conn.auth
        assert auth is not None
        svc = self.conn.svc
        ws = svc.get(auth.workspace_id)
        tty = self.term is not None
        env = target.session_env(self.chan.get_environment(), term=self.term,
                                 client=self.conn.peer, server=self.conn.local)
        if self.subsystem == "sftp":
            repo = svc.repo_path(ws)
            req: ExecRequest = dataclasses.replace(
                svc.shell_request(ws, tty=False, env=env), argv=target.sftp_argv(repo))
        else:
            req = svc.shell_request(ws, self.command, tty=tty,
                                    size=self.size if tty else None, env=env)
        self._sized = self.size
        return await svc.exec_stream(auth.workspace_id, req, actor=auth.user.name)

    async def started(self) -> None:
        if self.size is not None and self.size != self._sized and self.term is not None:
            self._sized = self.size  # resized while the process was starting
            assert self.stream is not None
            await self.stream.resize(*self.size)
        if self.conn.agent_requested and not self.conn.agent_notice_sent:
            self.conn.agent_notice_sent = True
            self._stderr(AGENT_REFUSED)

    def _stderr(self, line: str) -> None:
        self.chan.write_stderr((line + ("\r\n" if self.term else "\n")).encode())

    def deliver(self, chunk: StreamChunk) -> None:
        if chunk.stream == "stderr" and self.term is None:
            self.chan.write_stderr(chunk.data)
        else:
            self.chan.write(chunk.data)

    def failed(self, message: str) -> None:
        self._stderr(f"den: {message}")
        self.chan.exit(1)

    def finished(self, exit_code: int) -> None:
        self.chan.exit(exit_code)


class _Forward(_Bridge, asyncssh.SSHTCPSession[bytes]):
    """A direct-tcpip channel (ssh -L): a relay in the workspace to ``dest``."""

    kind = "forward"

    def __init__(self, conn: _Connection, dest_host: str, dest_port: int, slot: Slot) -> None:
        super().__init__(conn, slot)
        self.dest = (dest_host, dest_port)
        self._errors = bytearray()

    def session_started(self) -> None:
        self.start(self._make_stream)

    async def _make_stream(self) -> ExecStream:
        auth = self.conn.auth
        assert auth is not None
        svc = self.conn.svc
        host = "127.0.0.1" if self.dest[0].lower() == "localhost" else self.dest[0].strip("[]")
        stream = await svc.connect_port(auth.workspace_id, host, self.dest[1],
                                        actor=auth.user.name)
        if stream is not None:  # the workspace's agent connects
            return stream
        ws = svc.get(auth.workspace_id)
        req = ExecRequest(argv=target.relay_argv(*self.dest), user="dev",
                          cwd=svc.repo_path(ws))
        return await svc.exec_stream(auth.workspace_id, req, actor=auth.user.name)

    def deliver(self, chunk: StreamChunk) -> None:
        if chunk.stream == "stderr":
            self._errors += chunk.data[: 4096 - len(self._errors)]
        else:
            self.chan.write(chunk.data)

    def finished(self, exit_code: int) -> None:
        if exit_code != 0:
            log.info("ssh: forwarding to %s:%d in workspace %s: %s", *self.dest,
                     self.conn.auth.workspace_id if self.conn.auth else "?",
                     self._errors.decode(errors="replace").strip() or f"exit {exit_code}")
        with contextlib.suppress(Exception):
            self.chan.write_eof()
        self.chan.close()


def _size(cols: int, rows: int) -> tuple[int, int] | None:
    if 0 < cols <= 1000 and 0 < rows <= 1000:
        return cols, rows
    return None


async def _touch(svc: WorkspaceService, workspace_id: str) -> None:
    try:
        await asyncio.to_thread(svc.touch, workspace_id)
    except Exception as exc:  # the workspace may be gone; activity lost is no failure
        log.debug("ssh: activity of %s not recorded: %s", workspace_id, exc)
