"""Den's DNS forwarder: the name server of every workspace on Den's network (its resolv.conf
names the bridge's gateway, where this listens, UDP port 53).

It answers only the workspaces the firewall knows (by source address; the firewall also
checks their bridge port), forwards each query to the host's name servers from a fresh
socket (a random source port and a new query id, checked on the answer), and, before a
workspace gets an answer, hands the answer's IPv4 addresses to ``learn``, which pins those
the workspace's policy allows (pins.py) and updates the firewall. Everything is bounded:
query and answer sizes, queries in flight in all and per workspace (more are dropped: the
resolver retries), the wait for the upstream server. Over UDP and TCP (a resolver retries
over TCP when a UDP answer comes back truncated): one query per TCP connection, asked of the
upstream server over TCP too.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from server.network import dnswire
from server.network.firewall import FirewallError

log = logging.getLogger(__name__)

QUERY_MAX = 1232  # bytes: a query is small (the EDNS "safe" UDP size)
ANSWER_MAX = 4096  # bytes from upstream over UDP; larger answers are refused (SERVFAIL)
IN_FLIGHT_MAX = 1024  # queries being answered, UDP and TCP together
PER_SOURCE_MAX = 32
UPSTREAM_TIMEOUT_S = 2.0
TCP_TIMEOUT_S = 10.0  # a TCP client's whole exchange

Learn = Callable[[str, str, list[tuple[str, int]]], Awaitable[None]]


class Forwarder(asyncio.DatagramProtocol):
    def __init__(self, upstreams: Sequence[str], *, learn: Learn,
                 known: Callable[[str], bool], port: int = 53,
                 upstream_port: int = 53) -> None:
        self.upstreams = list(upstreams)
        self.learn = learn
        self.known = known
        self.port = port
        self.upstream_port = upstream_port
        self.address = ""  # where it listens ("" before start)
        self.dropped = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._per_source: Counter[str] = Counter()

    async def start(self, address: str) -> None:
        """Listen on ``address`` (the bridge's gateway); again elsewhere if it changed."""
        if self._transport is not None and self.address == address:
            return
        self.close()
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: self, local_addr=(address, self.port), family=socket.AF_INET)
            try:
                self._server = await asyncio.start_server(
                    self._tcp_client, host=address, port=self.port, family=socket.AF_INET,
                    limit=QUERY_MAX + 2)
            except OSError:
                transport.close()
                raise
        except OSError as exc:
            raise FirewallError(f"Den's DNS forwarder cannot listen on {address}:{self.port}",
                                detail=str(exc)) from exc
        self._transport = transport
        self.address = address
        log.info("DNS forwarder for workspaces on %s:%d (upstream %s)", address, self.port,
                 ", ".join(self.upstreams) or "none")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()

    def _admit(self, source: str) -> bool:
        if (len(self._tasks) >= IN_FLIGHT_MAX or self._per_source[source] >= PER_SOURCE_MAX
                or not self.known(source)):
            self.dropped += 1
            return False
        self._per_source[source] += 1
        return True

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        if len(data) > QUERY_MAX:
            self.dropped += 1
            return
        if self._admit(addr[0]):
            self._track(self._answer(data, addr), addr[0])

    def _track(self, work: Coroutine[Any, Any, None], source: str) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, source))

    async def _tcp_client(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        source = str(writer.get_extra_info("peername")[0])
        if not self._admit(source):
            writer.close()
            return
        current = asyncio.current_task()
        if current is not None:  # counted and cancelled on close like a UDP query
            self._tasks.add(current)
            current.add_done_callback(lambda t: self._done(t, source))
        try:
            async with asyncio.timeout(TCP_TIMEOUT_S):
                size = int.from_bytes(await reader.readexactly(2), "big")
                if size > QUERY_MAX:
                    return
                reply = await self._reply(await reader.readexactly(size), source, tcp=True)
                if reply is not None:
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                    await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _done(self, task: asyncio.Task[None], source: str) -> None:
        self._tasks.discard(task)
        self._per_source[source] -= 1
        if self._per_source[source] <= 0:
            del self._per_source[source]

    async def _answer(self, query: bytes, addr: tuple[str, int]) -> None:
        reply = await self._reply(query, addr[0], tcp=False)
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)

    async def _reply(self, query: bytes, source: str, *, tcp: bool) -> bytes | None:
        """The answer for ``source`` (None: drop the query), after ``learn``."""
        try:
            q = dnswire.question(query)
        except dnswire.Malformed:
            return None
        reply = dnswire.error_answer(query, q, dnswire.SERVFAIL)
        try:
            answer = await (self._resolve_tcp(query, q) if tcp else self.resolve(query, q))
            if answer is not None:
                found = dnswire.answers_a(answer)
                if found:
                    await self.learn(source, q.name, found)
                reply = dnswire.with_id(answer, q.id)
        except asyncio.CancelledError:
            raise
        except dnswire.Malformed:
            pass
        except Exception:  # the firewall refused: no answer opens anything
            log.exception("DNS forwarder: answering %r failed", q.name)
        return reply

    @staticmethod
    def _matches(data: bytes, ident: int, q: dnswire.Question) -> bool:
        try:
            got = dnswire.question(data, response=True)
        except dnswire.Malformed:
            return False
        return (got.id, got.name, got.qtype) == (ident, q.name, q.qtype)

    async def _resolve_tcp(self, query: bytes, q: dnswire.Question) -> bytes | None:
        """Like :meth:`resolve`, over TCP (answers up to 64 KiB, the protocol's limit)."""
        ident = secrets.randbelow(65536)
        wire = dnswire.with_id(query, ident)
        for server in self.upstreams:
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout(UPSTREAM_TIMEOUT_S):
                    reader, writer = await asyncio.open_connection(server, self.upstream_port)
                    writer.write(len(wire).to_bytes(2, "big") + wire)
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(size)
                    if self._matches(data, ident, q):
                        return data
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                continue
            finally:
                if writer is not None:
                    writer.close()
        return None

    async def resolve(self, query: bytes, q: dnswire.Question) -> bytes | None:
        """The first upstream server's answer to ``query`` (under a new id), or None."""
        loop = asyncio.get_running_loop()
        ident = secrets.randbelow(65536)
        wire = dnswire.with_id(query, ident)
        for server in self.upstreams:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                try:
                    sock.connect((server, self.upstream_port))
                    await loop.sock_sendall(sock, wire)
                    async with asyncio.timeout(UPSTREAM_TIMEOUT_S):
                        while True:
                            data = await loop.sock_recv(sock, 65535)
                            if len(data) > ANSWER_MAX:
                                break
                            if self._matches(data, ident, q):
                                return data
                except (OSError, TimeoutError):
                    continue
        return None
