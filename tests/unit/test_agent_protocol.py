"""The agent's wire format and the host's session, against an in-memory peer."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from server.agent.protocol import (
    HEADER,
    MAX_PAYLOAD,
    DockerDemux,
    FrameReader,
    ProtocolError,
    Type,
    encode,
    encode_json,
)
from server.agent.session import MERGE_BYTES, AgentSession, Channel
from server.runtime.errors import AgentUnavailable


def test_frames_round_trip_across_any_split() -> None:
    data = encode_json(Type.MSG, 7, {"ok": {}}) + encode(Type.DATA, 7, b"x" * 1000, flags=1)
    for cut in range(len(data)):
        r = FrameReader()
        frames = r.feed(data[:cut]) + r.feed(data[cut:])
        assert [(f.type, f.chan, f.flags) for f in frames] == [(Type.MSG, 7, 0), (Type.DATA, 7, 1)]
        assert frames[1].payload == b"x" * 1000


def test_a_malformed_or_oversized_frame_is_an_error() -> None:
    with pytest.raises(ProtocolError):
        FrameReader().feed(b"\0" * HEADER.size)
    with pytest.raises(ProtocolError):
        FrameReader().feed(HEADER.pack(b"\xd3\x4e", 4, 0, 1, MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError):
        FrameReader().feed(HEADER.pack(b"\xd3\x4e", 99, 0, 1, 0))


def test_sync_skips_old_bytes_and_other_hellos() -> None:
    r = FrameReader()
    r.sync("abc")
    old = encode(Type.DATA, 3, b"old data")[:9] + encode_json(Type.HELLO, 0, {"nonce": "zzz"})
    assert r.feed(old) == [] and r.hello is None
    frames = r.feed(encode_json(Type.HELLO, 0, {"nonce": "abc", "v": 1})
                    + encode_json(Type.MSG, 1, {"ok": {}}))
    assert r.hello == {"nonce": "abc", "v": 1}
    assert [f.type for f in frames] == [Type.MSG]


def test_docker_demux_splits_streams_across_reads() -> None:
    raw = b"".join(bytes([s, 0, 0, 0]) + struct.pack(">I", len(d)) + d
                   for s, d in [(1, b"hello"), (2, b"log\n"), (1, b"world")])
    for cut in range(len(raw)):
        d = DockerDemux()
        pieces = d.feed(raw[:cut]) + d.feed(raw[cut:])
        out = b"".join(p for s, p in pieces if s == 1)
        err = b"".join(p for s, p in pieces if s == 2)
        assert (out, err) == (b"helloworld", b"log\n")


def run(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test body on a fresh event loop."""
    def sync() -> None:
        asyncio.run(fn())
    sync.__name__ = fn.__name__
    return sync


class Peer:
    """A transport whose other end is a scripted agent."""

    def __init__(self) -> None:
        self.to_host: asyncio.Queue[bytes] = asyncio.Queue()
        self.sent: list[bytes] = []
        self.closed = False
        self.on_write = None

    async def read(self) -> bytes:
        return await self.to_host.get()

    async def write(self, data: bytes) -> None:
        self.sent.append(data)
        if self.on_write is not None:
            self.on_write(data)

    def close(self) -> None:
        self.closed = True
        self.to_host.put_nowait(b"")


def _hello_answerer(peer: Peer, *, after: int = 0) -> None:
    seen = [0]

    def on_write(data: bytes) -> None:
        if data[2] == Type.HELLO and len(data) < 4096:
            seen[0] += 1
            if seen[0] > after:
                nonce = json.loads(data[HEADER.size:])["nonce"]
                peer.to_host.put_nowait(b"junk" + encode_json(Type.HELLO, 0, {"nonce": nonce}))

    peer.on_write = on_write  # type: ignore[assignment]


async def _channel(op: str) -> tuple[Peer, AgentSession, Channel]:
    """A session with a scripted agent that says hello, and one channel opened on it."""
    peer = Peer()
    _hello_answerer(peer)
    session = await AgentSession.connect(peer, name="t", timeout_s=1)
    return peer, session, await session.open({"op": op})


async def _data_until_end(ch: Channel) -> int:
    """Bytes of data events read (and not consumed) until the channel's end, which stays."""
    got = 0
    while (event := await ch.next(1)).kind == "data":
        got += len(event.data)
    assert event.kind == "end"
    ch._events.appendleft(event)
    return got


@run
async def test_queued_data_of_one_stream_is_handed_over_merged_in_order() -> None:
    peer, session, ch = await _channel("exec")
    await ch.widen(0, 4 * 262144)
    frames = [encode(Type.DATA, ch.chan, bytes([i]) * 65536) for i in range(6)]
    frames.insert(3, encode(Type.DATA, ch.chan, b"e" * 10, flags=1))  # stderr between
    frames.append(encode_json(Type.MSG, ch.chan, {"exit": 0}))
    peer.to_host.put_nowait(b"".join(frames))  # one read: all queued before the first next
    events = [await ch.next(1) for _ in range(4)]
    assert [(e.kind, e.stream, len(e.data)) for e in events] == [
        ("data", 0, 3 * 65536), ("data", 1, 10), ("data", 0, 3 * 65536), ("msg", 0, 0)]
    assert events[0].data == b"".join(bytes([i]) * 65536 for i in range(3))
    assert events[2].data[:1] == b"\x03" and events[2].data[-1:] == b"\x05"
    for event in events[:3]:
        await ch.consumed(event.stream, len(event.data))
    grants = [struct.unpack(">I", d[12:])[0] for d in peer.sent if d[2] == Type.WINDOW]
    assert sum(grants[1:]) == 6 * 65536  # all of it given back (after the widening)
    # a slow consumer's catch-up is bounded: never more than MERGE_BYTES at once
    for _ in range(8):
        peer.to_host.put_nowait(encode(Type.DATA, ch.chan, b"y" * 65536))
    await asyncio.sleep(0)
    while len(ch._events) < 8:
        await asyncio.sleep(0.001)
    sizes = [len((await ch.next(1)).data) for _ in range(2)]
    assert sizes == [MERGE_BYTES, MERGE_BYTES]
    await session.close()


@run
async def test_hello_retries_with_a_pad_then_gives_up() -> None:
    peer = Peer()
    _hello_answerer(peer, after=1)
    session = await AgentSession.connect(peer, name="t", timeout_s=0.05)
    assert session.alive and any(len(d) > MAX_PAYLOAD for d in peer.sent)
    await session.close()
    silent = Peer()
    with pytest.raises(AgentUnavailable):
        await AgentSession.connect(silent, name="t", timeout_s=0.05)
    assert silent.closed


@run
async def test_data_beyond_the_window_drops_the_session() -> None:
    peer, session, ch = await _channel("exec")
    for _ in range(5):
        peer.to_host.put_nowait(encode(Type.DATA, ch.chan, b"x" * 65536))
    assert await _data_until_end(ch) == 4 * 65536
    end = await ch.next(1)
    assert end.kind == "end" and "window" in end.reason
    assert not session.alive and peer.closed


@run
async def test_consumed_data_is_granted_back_and_close_is_sent() -> None:
    peer, session, ch = await _channel("exec")
    peer.to_host.put_nowait(encode(Type.DATA, ch.chan, b"x" * 65536, flags=1))
    event = await ch.next(1)
    await ch.consumed(event.stream, len(event.data))
    grants = [d for d in peer.sent if d[2] == Type.WINDOW]
    assert grants and grants[-1][3] == 1 and struct.unpack(">I", grants[-1][12:])[0] == 65536
    await ch.close()
    assert peer.sent[-1][2] == Type.CLOSE
    await session.close()


@run
async def test_a_widened_window_is_granted_and_still_enforced() -> None:
    peer, session, ch = await _channel("connect")
    await ch.widen(0, 4 * 262144)
    grant = [d for d in peer.sent if d[2] == Type.WINDOW][-1]
    assert grant[3] == 0 and struct.unpack(">I", grant[12:])[0] == 3 * 262144
    await ch.widen(0, 262144)  # never narrows: nothing sent
    assert [d for d in peer.sent if d[2] == Type.WINDOW][-1] is grant
    for _ in range(17):  # 16 chunks of 64 KiB fit the widened window; the 17th does not
        peer.to_host.put_nowait(encode(Type.DATA, ch.chan, b"x" * 65536))
    assert await _data_until_end(ch) == 16 * 65536
    end = await ch.next(1)
    assert end.kind == "end" and "window" in end.reason
    assert not session.alive
