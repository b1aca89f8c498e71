"""The keep-alive pool of preview connections and the relay's side of reuse, on a stand-in
connection (an ``ExecStream`` fed by the test): parking, dropping a connection the app
closed, the caps, and a reused connection found closed (sent again only without a body)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import pytest

from server.preview import proxy
from server.preview.pool import UpstreamPool
from server.runtime.base import StreamChunk


class Conn:
    """What the app sends is put in ``inbox`` (None: it closes); what Den writes is kept."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.written = bytearray()
        self.killed = False

    async def output(self) -> AsyncIterator[StreamChunk]:
        while (data := await self.inbox.get()) is not None:
            yield StreamChunk("stdout", data)

    async def write(self, data: bytes) -> None:
        self.written += data

    async def kill(self) -> None:
        self.killed = True


def upstream() -> tuple[Conn, proxy.Upstream]:
    conn = Conn()
    return conn, proxy.Upstream(conn, idle_timeout_s=5)  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_parked_connections_are_reused_dropped_when_closed_and_capped() -> None:
    async def run() -> None:
        pool = UpstreamPool(per_port=2, total=3, idle_s=30)
        a_conn, a = upstream()
        pool.give("ws1", 80, a)
        assert pool.take("ws1", 81) is None and pool.take("ws2", 80) is None
        assert pool.take("ws1", 80) is a and a.reused and len(pool) == 0
        pool.give("ws1", 80, a)
        await a_conn.inbox.put(None)  # the app closes it while parked
        await settle()
        assert len(pool) == 0 and a_conn.killed
        assert pool.take("ws1", 80) is None
        conns = [upstream() for _ in range(4)]
        for _, up in conns[:3]:
            pool.give("ws1", 80, up)
        await settle()
        assert conns[0][0].killed and len(pool) == 2  # per port: the oldest goes
        pool.give("ws1", 81, conns[3][1])
        pool.give("ws2", 80, upstream()[1])
        await settle()
        assert conns[1][0].killed and len(pool) == 3  # in all: the oldest goes
        assert pool.take("ws1", 80) is conns[2][1]  # the newest of a port first
        await pool.close()
        assert len(pool) == 0 and conns[3][0].killed

    asyncio.run(run())


def test_parked_connections_expire() -> None:
    async def run() -> None:
        pool = UpstreamPool(idle_s=0.05)
        conn, up = upstream()
        pool.give("ws1", 80, up)
        deadline = asyncio.get_running_loop().time() + 5
        while not conn.killed:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert len(pool) == 0

    asyncio.run(run())


async def relay(up: proxy.Upstream, *, body: bool) -> tuple[Any, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": b"x" if body else b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()
        return {}

    async def send(msg: MutableMapping[str, Any]) -> None:
        sent.append(dict(msg))

    scope: dict[str, Any] = {"type": "http", "method": "POST" if body else "GET",
                             "headers": []}
    head = [(b"host", b"app")] + ([(b"content-length", b"1")] if body else [])
    try:
        result: Any = await proxy.http(scope, receive, send, up, target=b"/", head=head,
                                       body=body, chunked=False, rewrite=lambda h: h, port=80)
    except proxy.StaleUpstream as exc:
        result = exc
    return result, sent


def test_a_reused_connection_found_closed() -> None:
    async def run() -> None:
        # A fresh connection that answers: kept, reusable.
        conn, up = upstream()
        await conn.inbox.put(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        kept, sent = await relay(up, body=False)
        assert kept is True and sent[0]["status"] == 200 and not conn.killed
        assert conn.written.startswith(b"GET / HTTP/1.1\r\n")
        # Reused, and closed by the app before answering: a GET may go again.
        pool = UpstreamPool()
        pool.give("ws1", 80, up)
        again = pool.take("ws1", 80)
        assert again is up
        await conn.inbox.put(None)
        result, sent = await relay(up, body=False)
        assert isinstance(result, proxy.StaleUpstream) and sent == [] and conn.killed
        # With a body it may not (the body is gone): a 502 for the browser.
        conn, up = upstream()
        up.reused = True
        await conn.inbox.put(None)
        result, sent = await relay(up, body=True)
        assert result is False and sent[0]["status"] == 502
        # An answer that closes the connection is not kept.
        conn, up = upstream()
        await conn.inbox.put(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2"
                             b"\r\n\r\nok")
        kept, sent = await relay(up, body=False)
        assert kept is False and conn.killed and sent[-1] == {"type": "http.response.body",
                                                              "body": b""}

    asyncio.run(run())


@pytest.mark.parametrize("trailing", [b"HTTP/1.1 200 OK\r\n", b"junk"])
def test_bytes_after_the_response_are_never_reused(trailing: bytes) -> None:
    async def run() -> None:
        conn, up = upstream()
        await conn.inbox.put(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + trailing)
        kept, _ = await relay(up, body=False)
        assert kept is False and conn.killed

    asyncio.run(run())
