"""The host's side of the direct path (server/agent/direct.py) against an in-process agent
that speaks agent/direct.go's handshake; the Go side has its own tests (agent/direct_test.go)
and tests/engine/test_preview_direct.py runs both for real."""

from __future__ import annotations

import asyncio
import secrets
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from server.agent import direct
from server.agent.session import AgentOpError
from server.runtime.errors import AgentUnavailable, EngineConflict


class FakeAgent:
    """agent/direct.go's listener on 127.0.0.1, proving itself with ``proof_secret`` (the
    secret it was given, unless it is an impostor). It records what each connection sent
    before the host's proof was checked."""

    def __init__(self, proof_secret: bytes | None = None) -> None:
        self.secret = b""
        self.proof_secret = proof_secret
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await reader.readexactly(36)
            self.received.append(hello)
            host, port = writer.get_extra_info("sockname")[:2]
            nonce_a = secrets.token_bytes(32)
            secret = self.proof_secret if self.proof_secret is not None else self.secret
            writer.write(nonce_a + direct.agent_proof(secret, hello[4:], nonce_a,
                                                      f"{host}:{port}"))
            try:
                rest = await asyncio.wait_for(reader.readexactly(35), 2)
            except (TimeoutError, asyncio.IncompleteReadError):
                return
            self.received.append(rest)
            if rest[3:] != direct.host_proof(self.secret, nonce_a, hello[4:], rest[:3]):
                return
            _, target = struct.unpack(">BH", rest[:3])
            try:
                app_r, app_w = await asyncio.open_connection("127.0.0.1", target)
            except OSError:
                writer.write(b"\x01")
                return
            writer.write(b"\x00")

            async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
                w.write_eof()

            await asyncio.gather(pipe(reader, app_w), pipe(app_r, writer))
        finally:
            writer.close()


class FakeSession:
    """What DirectPaths asks of an agent session: the ``direct`` op."""

    def __init__(self, agent: FakeAgent, *, knows_direct: bool = True) -> None:
        self.agent = agent
        self.knows_direct = knows_direct
        self.requests: list[dict[str, Any]] = []
        self.listeners: list[Any] = []
        self.end_reason = ""

    def when_ended(self, listener: Any) -> None:
        if self.end_reason:
            listener()
        else:
            self.listeners.append(listener)

    def end(self) -> None:
        self.end_reason = "the agent's stream ended"
        for listener in self.listeners:
            listener()

    async def request(self, req: dict[str, Any], *, timeout_s: float) -> Any:
        self.requests.append(req)
        if self.end_reason:
            raise AgentUnavailable(self.end_reason)
        if not self.knows_direct:
            raise AgentOpError("invalid", 'unknown op "direct"')
        self.agent.secret = bytes.fromhex(req["secret"])
        return {"port": direct.PORT}


def run(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test body on a fresh event loop, asyncio's and uvloop's (den serve
    runs on uvloop), with a deadline: nothing hangs."""
    def sync() -> None:
        asyncio.run(asyncio.wait_for(fn(), 30))
        uvloop.run(asyncio.wait_for(fn(), 30))
    sync.__name__ = fn.__name__
    return sync


async def echo_app() -> tuple[asyncio.Server, int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.write(b"bye")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def address() -> str:
    return "127.0.0.1"


async def read_all(stream: direct.DirectStream) -> bytes:
    return b"".join([c.data async for c in stream.output()])


@run
async def test_a_connection_goes_direct_after_both_proofs_and_half_closes() -> None:
    agent = FakeAgent()
    paths = direct.DirectPaths(port=await agent.start())
    app, app_port = await echo_app()
    session = FakeSession(agent)
    stream = await paths.connect("ws1", session, address, "127.0.0.1", app_port)  # type: ignore[arg-type]
    assert stream is not None
    await stream.write(b"x" * 300_000)
    await stream.close_stdin()
    assert await read_all(stream) == b"x" * 300_000 + b"bye"
    await stream.kill()
    again = await paths.connect("ws1", session, address, "127.0.0.1", app_port)  # type: ignore[arg-type]
    assert again is not None
    await again.kill()
    assert len(session.requests) == 1  # one secret per session
    assert paths.counts == {"direct": 2, "relay": 0}
    app.close()


@run
async def test_nothing_listening_is_a_conflict_not_a_fallback() -> None:
    agent = FakeAgent()
    paths = direct.DirectPaths(port=await agent.start())
    app, app_port = await echo_app()
    app.close()
    await app.wait_closed()
    with pytest.raises(EngineConflict, match="nothing listens"):
        await paths.connect("ws1", FakeSession(agent), address, "127.0.0.1", app_port)  # type: ignore[arg-type]


@run
async def test_an_impostor_gets_nothing_and_the_session_falls_back_to_the_relay() -> None:
    impostor = FakeAgent(proof_secret=secrets.token_bytes(32))  # does not know the secret
    paths = direct.DirectPaths(port=await impostor.start())
    app, app_port = await echo_app()
    session = FakeSession(impostor)
    assert await paths.connect("ws1", session, address, "127.0.0.1", app_port) is None  # type: ignore[arg-type]
    # It got the host's hello (a nonce) and nothing else: no proof, no port, no request.
    await asyncio.sleep(0)
    assert [len(r) for r in impostor.received] == [36]
    # The direct path stays off for this session: no second try at the impostor.
    assert await paths.connect("ws1", session, address, "127.0.0.1", app_port) is None  # type: ignore[arg-type]
    assert len(impostor.received) == 1
    assert paths.counts == {"direct": 0, "relay": 2}
    # A new session (the workspace started again) tries anew.
    agent = FakeAgent()
    paths.port = await agent.start()
    stream = await paths.connect("ws1", FakeSession(agent), address, "127.0.0.1", app_port)  # type: ignore[arg-type]
    assert stream is not None
    await stream.kill()
    app.close()


@run
async def test_an_agent_without_the_direct_op_or_an_address_means_the_relay() -> None:
    agent = FakeAgent()
    paths = direct.DirectPaths(port=await agent.start())

    async def no_address() -> None:
        return None

    assert await paths.connect("a", FakeSession(agent, knows_direct=False), address,  # type: ignore[arg-type]
                               "127.0.0.1", 1) is None
    assert await paths.connect("b", FakeSession(agent), no_address,  # type: ignore[arg-type]
                               "127.0.0.1", 1) is None
    assert await paths.connect("c", FakeSession(agent), address,  # type: ignore[arg-type]
                               "example.com", 1) is None
    assert agent.received == []
    assert paths.counts == {"direct": 0, "relay": 3}


def test_proofs_depend_on_every_input() -> None:
    s, n1, n2 = b"k" * 32, b"a" * 32, b"b" * 32
    base = direct.agent_proof(s, n1, n2, "10.0.0.2:7386")
    assert base != direct.agent_proof(s, n2, n1, "10.0.0.2:7386")
    assert base != direct.agent_proof(s, n1, n2, "10.0.0.3:7386")
    assert base != direct.agent_proof(b"j" * 32, n1, n2, "10.0.0.2:7386")
    assert direct.host_proof(s, n1, n2, b"\x04\x00\x50") != direct.host_proof(
        s, n1, n2, b"\x04\x00\x51")
    assert base != direct.host_proof(s, n1, n2, b"10.0.0.2:7386")  # labels differ


@run
async def test_the_session_ending_closes_its_direct_connections() -> None:
    agent = FakeAgent()
    paths = direct.DirectPaths(port=await agent.start())
    app, app_port = await echo_app()
    session = FakeSession(agent)
    stream = await paths.connect("ws1", session, address, "127.0.0.1", app_port)  # type: ignore[arg-type]
    assert stream is not None
    await stream.write(b"ping")
    session.end()  # the workspace pauses: its agent session ends
    assert not paths._paths  # nothing kept for a session that is over
    assert await read_all(stream) in (b"", b"ping")  # closed, not left hanging
    await asyncio.wait_for(stream.wait(), 5)
    assert await paths.connect("ws1", session, address, "127.0.0.1", app_port) is None  # type: ignore[arg-type]
    app.close()
