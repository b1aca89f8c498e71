"""The direct path: TCP connections from the host to a port inside a workspace, straight
to its agent's listener on the workspace's own address, without the engine's exec stream and
without the agent protocol's framing (docs/agent.md "Direct connections").

Den hands the agent a fresh secret over the agent session (the ``direct`` op: the session
runs over the engine's exec, which only Den can open), once per session. Each connection then
starts with a handshake in which both sides prove they know that secret over a fresh
challenge of the other; Den checks the agent's proof (bound to the address it dialled)
before it sends a byte of its own, so a workspace that has since taken over the address, or
any process in the workspace imitating the agent, gets nothing. Then Den names the port and
the agent splices raw bytes to it. Whenever the direct path cannot be used (an agent that
predates it, a listener that cannot be reached, a proof that does not hold) the caller falls
back to the agent's framed ``connect`` over the session; a failure disables the direct path
for the rest of that session (logged).

The address is looked up from the engine once per agent session: a session ends when its
container stops, so an address is never carried across a stop/start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import secrets
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from server.agent.session import AgentOpError, AgentSession
from server.runtime.base import StreamChunk
from server.runtime.errors import AgentTimeout, AgentUnavailable, EngineConflict

log = logging.getLogger(__name__)

PORT = 7386  # the agent's listener (agent/direct.go)
MAGIC = b"DND1"
NONCE = 32
HANDSHAKE_TIMEOUT_S = 5.0
ENABLE_TIMEOUT_S = 5.0
READ_BYTES = 256 * 1024  # one read from the socket, at most (a bounded buffer)
FAMILIES = {"127.0.0.1": 4, "localhost": 4, "::1": 6}
OK, NOT_LISTENING = 0, 1


class ImpostorError(Exception):
    """What answered at the workspace's address could not prove it is its agent."""


def mac(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, label + b"".join(parts), hashlib.sha256).digest()


def agent_proof(secret: bytes, nonce_h: bytes, nonce_a: bytes, addr: str) -> bytes:
    return mac(secret, b"den-direct agent", nonce_h, nonce_a, addr.encode())


def host_proof(secret: bytes, nonce_a: bytes, nonce_h: bytes, target: bytes) -> bytes:
    return mac(secret, b"den-direct host", nonce_a, nonce_h, target)


async def handshake(pipe: Pipe, *, secret: bytes, addr: str, family: int, port: int) -> bool:
    """The host's side. True: connected to the port; False: nothing listens there.
    ImpostorError when the agent's proof is wrong (nothing of ours was sent but a nonce)."""
    nonce_h = secrets.token_bytes(NONCE)
    pipe.write(MAGIC + nonce_h)
    answer = await pipe.readexactly(2 * NONCE)
    nonce_a, proof = answer[:NONCE], answer[NONCE:]
    if not hmac.compare_digest(proof, agent_proof(secret, nonce_h, nonce_a, addr)):
        raise ImpostorError(f"{addr} did not prove it is the workspace's agent")
    target = struct.pack(">BH", family, port)
    pipe.write(target + host_proof(secret, nonce_a, nonce_h, target))
    status = await pipe.readexactly(1)
    return status[0] == OK


class Pipe(asyncio.Protocol):
    """A TCP connection with as little Python per byte as asyncio allows: what arrives is
    kept as the bytes objects the loop hands over (no stream buffer to copy into and out
    of), at most about ``READ_BYTES`` unread before reading pauses, and writes wait while
    the transport's buffer is full."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._unread = 0
        self._eof = False
        self._reading_paused = False
        self._writing_paused = False
        self._wake: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    # --- from the loop -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports (den serve runs on uvloop) are not asyncio.Transport subclasses
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._unread += len(data)
        if self._unread >= READ_BYTES and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._signal()

    def eof_received(self) -> bool:
        self._eof = True
        self._signal()
        return True  # our side may still write (a half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._signal()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _signal(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    # --- for the caller --------------------------------------------------------------------

    async def read(self) -> bytes:
        """What arrived, as it arrived; b"" at the end."""
        while not self._chunks:
            if self._eof:
                return b""
            self._wake = asyncio.get_running_loop().create_future()
            await self._wake
        data = self._chunks.popleft()
        self._unread -= len(data)
        if self._reading_paused and self._unread < READ_BYTES // 2 and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def readexactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            data = await self.read()
            if not data:
                raise asyncio.IncompleteReadError(out, n)
            out += data
        if len(out) > n:  # the app spoke right after the status: keep the rest
            self._chunks.appendleft(out[n:])
            self._unread += len(out) - n
            out = out[:n]
        return out

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        if self._writing_paused:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._eof = True
        self._signal()


class DirectStream:
    """A connection made over the direct path, as an ExecStream (output: what the port
    sends; ``write``: what it receives; ``close_stdin``: half-close; ``kill``: close)."""

    def __init__(self, pipe: Pipe) -> None:
        self._pipe = pipe
        self._done = asyncio.Event()
        self.on_done: Callable[[DirectStream], None] | None = None

    async def output(self) -> AsyncIterator[StreamChunk]:
        try:
            while data := await self._pipe.read():
                yield StreamChunk("stdout", data)
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self._done.is_set():
            self._done.set()
            if self.on_done is not None:
                self.on_done(self)

    def abort(self) -> None:
        """Close now (the agent session ended: the workspace pauses, stops or restarts)."""
        self._pipe.close()
        self._finish()

    async def write(self, data: bytes) -> None:
        self._pipe.write(data)
        await self._pipe.drain()

    async def close_stdin(self) -> None:
        transport = self._pipe.transport
        with contextlib.suppress(OSError, RuntimeError):
            if transport is not None and transport.can_write_eof() \
                    and not transport.is_closing():
                transport.write_eof()

    async def resize(self, cols: int, rows: int) -> None:
        return None

    async def wait(self) -> int:
        await self._done.wait()
        return 0

    async def kill(self) -> None:
        self.abort()

    async def signal(self, name: str) -> None:
        return None


@dataclass
class _Path:
    session: AgentSession
    address: str | None = None  # None: the direct path is off for this session
    secret: bytes = b""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: bool = False
    streams: set[DirectStream] = field(default_factory=set)

    def end(self) -> None:
        """The session is over: so is every connection made for it (a connection must not
        outlive the run of the workspace it was proven for, nor hold a checkpoint up)."""
        self.address = None
        for stream in list(self.streams):
            stream.abort()


class DirectPaths:
    """The direct path of each workspace's current agent session, and counts of how
    connections went (``direct``, ``relay``: the caller fell back)."""

    def __init__(self, *, port: int = PORT) -> None:
        self.port = port
        self._paths: dict[str, _Path] = {}
        self.counts = {"direct": 0, "relay": 0}

    async def connect(self, name: str, session: AgentSession,
                      address: Callable[[], Awaitable[str | None]], host: str, port: int
                      ) -> DirectStream | None:
        """A connection to ``host:port`` in workspace ``name`` over the direct path, or None
        (counted as ``relay``) when it cannot be used: the caller relays through ``session``.
        EngineConflict when nothing listens on the port."""
        family = FAMILIES.get(host)
        path = await self._path(name, session, address) if family else None
        if family is None or path is None or path.address is None:
            self.counts["relay"] += 1
            return None
        addr = f"{path.address}:{self.port}"
        pipe = Pipe()
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                await asyncio.get_running_loop().create_connection(
                    lambda: pipe, path.address, self.port)
                connected = await handshake(pipe, secret=path.secret, addr=addr,
                                            family=family, port=port)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ImpostorError) as exc:
            pipe.close()
            if path.session is session and path.address is not None:
                log.warning("workspace %s: the direct path to %s failed (%s: %s); connections "
                            "go through the agent session until it ends", name, addr,
                            exc.__class__.__name__, exc)
                path.address = None
            self.counts["relay"] += 1
            return None
        if not connected:
            pipe.close()
            raise EngineConflict(f"cannot connect to {host}:{port} in the workspace: "
                                 "nothing listens there")
        self.counts["direct"] += 1
        stream = DirectStream(pipe)
        if path.address is None:  # the session ended during the handshake
            stream.abort()
            raise AgentUnavailable(f"workspace {name}: {session.end_reason or 'no agent'}")
        path.streams.add(stream)
        stream.on_done = path.streams.discard
        return stream

    async def _path(self, name: str, session: AgentSession,
                    address: Callable[[], Awaitable[str | None]]) -> _Path:
        path = self._paths.get(name)
        if path is None or path.session is not session:
            path = self._paths[name] = _Path(session)
            session.when_ended(functools.partial(self._ended, name, path))
        async with path.lock:
            if path.ready:
                return path
            path.ready = True
            try:
                found = await address()
            except Exception as exc:  # the engine's answer: the relay still works
                log.info("workspace %s: no address for the direct path: %s", name, exc)
                return path
            if not found:
                return path
            secret = secrets.token_bytes(32)
            try:
                await session.request({"op": "direct", "secret": secret.hex()},
                                      timeout_s=ENABLE_TIMEOUT_S)
            except (AgentOpError, AgentUnavailable, AgentTimeout) as exc:
                log.info("workspace %s: its agent offers no direct path (%s)", name, exc)
                return path
            path.address, path.secret = found, secret
            return path

    def _ended(self, name: str, path: _Path) -> None:
        path.end()
        if self._paths.get(name) is path:
            del self._paths[name]


def direct_counts(runtime: object) -> dict[str, int]:
    """A runtime's counts of connections by path ({} for one without a direct path)."""
    paths = getattr(runtime, "direct", None)
    return dict(paths.counts) if isinstance(paths, DirectPaths) else {}
