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
import hashlib
import hmac
import logging
import secrets
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

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


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    secret: bytes, addr: str, family: int, port: int) -> bool:
    """The host's side. True: connected to the port; False: nothing listens there.
    ImpostorError when the agent's proof is wrong (nothing of ours was sent but a nonce)."""
    nonce_h = secrets.token_bytes(NONCE)
    writer.write(MAGIC + nonce_h)
    answer = await reader.readexactly(2 * NONCE)
    nonce_a, proof = answer[:NONCE], answer[NONCE:]
    if not hmac.compare_digest(proof, agent_proof(secret, nonce_h, nonce_a, addr)):
        raise ImpostorError(f"{addr} did not prove it is the workspace's agent")
    target = struct.pack(">BH", family, port)
    writer.write(target + host_proof(secret, nonce_a, nonce_h, target))
    status = await reader.readexactly(1)
    return status[0] == OK


class DirectStream:
    """A connection made over the direct path, as an ExecStream (output: what the port
    sends; ``write``: what it receives; ``close_stdin``: half-close; ``kill``: close)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._done = asyncio.Event()

    async def output(self) -> AsyncIterator[StreamChunk]:
        try:
            while True:
                try:
                    data = await self._reader.read(READ_BYTES)
                except OSError:
                    return
                if not data:
                    return
                yield StreamChunk("stdout", data)
        finally:
            self._done.set()

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def close_stdin(self) -> None:
        with contextlib.suppress(OSError):
            if self._writer.can_write_eof():
                self._writer.write_eof()

    async def resize(self, cols: int, rows: int) -> None:
        return None

    async def wait(self) -> int:
        await self._done.wait()
        return 0

    async def kill(self) -> None:
        self._writer.close()
        self._done.set()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def signal(self, name: str) -> None:
        return None


@dataclass
class _Path:
    session: AgentSession
    address: str | None = None  # None: the direct path is off for this session
    secret: bytes = b""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: bool = False


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
        writer = None
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(path.address, self.port,
                                                               limit=READ_BYTES)
                connected = await handshake(reader, writer, secret=path.secret, addr=addr,
                                            family=family, port=port)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ImpostorError) as exc:
            if writer is not None:
                writer.close()
            if path.session is session and path.address is not None:
                log.warning("workspace %s: the direct path to %s failed (%s: %s); connections "
                            "go through the agent session until it ends", name, addr,
                            exc.__class__.__name__, exc)
                path.address = None
            self.counts["relay"] += 1
            return None
        if not connected:
            writer.close()
            raise EngineConflict(f"cannot connect to {host}:{port} in the workspace: "
                                 "nothing listens there")
        self.counts["direct"] += 1
        return DirectStream(reader, writer)

    async def _path(self, name: str, session: AgentSession,
                    address: Callable[[], Awaitable[str | None]]) -> _Path:
        path = self._paths.get(name)
        if path is None or path.session is not session:
            path = self._paths[name] = _Path(session)
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

    def forget(self, name: str) -> None:
        self._paths.pop(name, None)
