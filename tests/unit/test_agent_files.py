"""File operations over an agent session, against a scripted in-memory agent: the error
mapping, untrusted listings, reads and writes in chunks under flow control, deadlines, and
the files routes over a runtime that hands out such a session."""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import server.agent.files as agent_files
from server.agent.files import READ_WINDOW, AgentFiles, FileEntry, file_error, parse_entries
from server.agent.protocol import WINDOW, Frame, FrameReader, Type, encode, encode_json
from server.agent.session import CHUNK, MERGE_BYTES, AgentOpError, AgentSession
from server.errors import (
    Conflict,
    DenError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ValidationFailed,
)
from server.runtime.base import ExecStream, WorkspaceSpec
from server.runtime.errors import AgentTimeout, AgentUnavailable, EngineConflict
from server.runtime.fake import FakeRuntime
from tests.conftest import ApiClient


def run(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test body on a fresh event loop."""
    def sync() -> None:
        asyncio.run(fn())
    sync.__name__ = fn.__name__
    return sync


Handler = Callable[["Agent", int, dict[str, Any]], None]


class Agent:
    """A transport whose other end is a scripted agent: ``ops[op]`` answers each OPEN;
    every other frame the host sends is kept in ``frames`` (and passed to ``on_frame``)."""

    def __init__(self, ops: dict[str, Handler]) -> None:
        self.ops = ops
        self.to_host: asyncio.Queue[bytes] = asyncio.Queue()
        self.reader = FrameReader()
        self.opened: list[dict[str, Any]] = []
        self.frames: dict[int, list[Frame]] = {}
        self.on_frame: Callable[[Frame], None] | None = None

    async def read(self) -> bytes:
        return await self.to_host.get()

    async def write(self, data: bytes) -> None:
        for f in self.reader.feed(data):
            if f.type is Type.HELLO:
                self.send(encode_json(Type.HELLO, 0, {"v": 1, "nonce": f.json()["nonce"]}))
            elif f.type is Type.OPEN:
                req = f.json()
                self.opened.append(req)
                self.frames[f.chan] = []
                if req["op"] == "ping":
                    self.ok(f.chan)
                else:
                    self.ops[req["op"]](self, f.chan, req)
            else:
                self.frames.setdefault(f.chan, []).append(f)
                if self.on_frame is not None:
                    self.on_frame(f)

    def close(self) -> None:
        self.to_host.put_nowait(b"")

    def send(self, data: bytes) -> None:
        self.to_host.put_nowait(data)

    def ok(self, chan: int, payload: Any = None, *, close: bool = True) -> None:
        self.send(encode_json(Type.MSG, chan, {"ok": payload or {}}))
        if close:
            self.send(encode(Type.CLOSE, chan))

    def error(self, chan: int, code: str, message: str = "") -> None:
        self.send(encode_json(Type.MSG, chan, {"error": {"code": code, "message": message}}))
        self.send(encode(Type.CLOSE, chan))

    def got(self, chan: int, kind: Type) -> list[Frame]:
        return [f for f in self.frames.get(chan, []) if f.type is kind]


async def connect(ops: dict[str, Handler]) -> tuple[AgentFiles, Agent]:
    agent = Agent(ops)
    session = await AgentSession.connect(agent, name="t", timeout_s=1)
    return AgentFiles(session, root="/workspace", user="dev"), agent


def answer(code: str, message: str = "") -> Handler:
    def handler(agent: Agent, chan: int, req: dict[str, Any]) -> None:
        agent.error(chan, code, message)
    return handler


# --- the error mapping ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "message", "op", "error", "slug"),
    [
        ("outside", "", "read", Forbidden, "path_outside"),
        ("permission", "", "write", Forbidden, "forbidden"),
        ("not_found", "", "stat", NotFound, "not_found"),
        ("is_dir", "", "read", ValidationFailed, "is_a_directory"),
        ("not_dir", "", "list", ValidationFailed, "not_a_directory"),
        ("too_large", "", "read", PayloadTooLarge, "too_large"),
        ("not_empty", "", "remove", Conflict, "not_empty"),
        ("exists", "", "remove", Conflict, "not_empty"),  # rmdir(2) may say either
        ("not_empty", "", "rename", Conflict, "not_empty"),
        ("exists", "", "mkdir", Conflict, "exists"),
        ("invalid", "cannot remove the root", "remove", ValidationFailed, "invalid"),
        ("no_user", "no user dev", "stat", EngineConflict, "engine_conflict"),
        ("failed", "x: no space left on device", "write", DenError, "disk_full"),
        ("failed", "something odd", "read", ValidationFailed, "invalid"),
        ("a code from the future", "", "read", ValidationFailed, "invalid"),
    ],
)
def test_agent_errors_map_to_the_files_api_errors(code: str, message: str, op: str,
                                                  error: type[DenError], slug: str) -> None:
    err = file_error(AgentOpError(code, message), "/workspace/x", root="/workspace", op=op)
    assert type(err) is error and err.code == slug


@pytest.mark.parametrize(
    ("call", "op"),
    [
        (lambda f: f.stat("/workspace/x"), "stat"),
        (lambda f: f.list("/workspace/x"), "list"),
        (lambda f: f.mkdir("/workspace/x"), "mkdir"),
        (lambda f: f.remove("/workspace/x"), "remove"),
        (lambda f: f.rename("/workspace/x", "/workspace/y"), "rename"),
        (lambda f: f.read("/workspace/x", max_bytes=10), "read"),
    ],
)
def test_every_operation_carries_root_and_user_and_maps_errors(
        call: Callable[[AgentFiles], Awaitable[Any]], op: str) -> None:
    @run
    async def body() -> None:
        files, agent = await connect({op: answer("outside")})
        with pytest.raises(Forbidden) as info:
            await call(files)
        assert info.value.code == "path_outside"
        req = agent.opened[-1]
        assert (req["op"], req["path"], req["root"], req["user"]) == (
            op, "/workspace/x", "/workspace", "dev")
    body()


@run
async def test_simple_operations_succeed() -> None:
    def ok(agent: Agent, chan: int, req: dict[str, Any]) -> None:
        agent.ok(chan, {"type": "file", "size": 3, "mtime": 1.5, "mode": "0600"}
                 if req["op"] == "stat" else None)

    files, agent = await connect(dict.fromkeys(("stat", "mkdir", "remove", "rename"), ok))
    assert await files.stat("/workspace/a/x") == FileEntry("x", "file", 3, 1.5, "600")
    await files.mkdir("/workspace/d", parents=True)
    await files.remove("/workspace/d", recursive=True)
    await files.rename("/workspace/a", "/workspace/b")
    assert [(r["op"], r.get("parents"), r.get("recursive"), r.get("to")) for r in
            agent.opened[1:]] == [("mkdir", True, None, None), ("remove", None, True, None),
                                  ("rename", None, None, "/workspace/b")]


# --- listings are untrusted ------------------------------------------------------------------


def test_a_listing_is_checked_bounded_and_sorted() -> None:
    rows: list[Any] = [
        {"name": "b", "type": "file", "size": 3, "mtime": 2.5, "mode": "0644"},
        {"name": "a", "type": "dir", "size": 4096, "mtime": 1, "mode": "4755"},
        {"name": "../../etc", "type": "file", "size": 1, "mtime": 1.0, "mode": "0644"},
        {"name": "x" * 5000, "type": "file", "size": 1, "mtime": 1.0, "mode": "0644"},
        {"name": "", "type": "file"},
        "not a row",
        {"name": "weird", "type": "socket!", "size": -5, "mtime": "soon", "mode": "rwx"},
        {"name": "t", "type": "symlink", "size": True, "mtime": 3.0, "mode": "0777"},
    ]
    listing = parse_entries({"entries": rows, "truncated": False}, limit=100)
    assert listing.entries == [
        FileEntry("a", "dir", 4096, 1.0, "4755"),
        FileEntry("b", "file", 3, 2.5, "644"),
        FileEntry("t", "symlink", 0, 3.0, "777"),
        FileEntry("weird", "other", 0, 0.0, "0"),
    ]
    assert not listing.truncated
    many = [{"name": f"f{i}", "type": "file", "size": 0, "mtime": 0, "mode": "644"}
            for i in range(50)]
    cut = parse_entries({"entries": many, "truncated": False}, limit=10)
    assert cut.truncated and len(cut.entries) == 10
    assert parse_entries({"entries": many[:3], "truncated": True}, limit=10).truncated
    with pytest.raises(AgentUnavailable):
        parse_entries({"entries": "nope"}, limit=10)


@run
async def test_list_asks_for_a_limit() -> None:
    def listing(agent: Agent, chan: int, req: dict[str, Any]) -> None:
        agent.ok(chan, {"entries": [{"name": "f", "type": "file", "size": 1, "mtime": 1.0,
                                     "mode": "0644"}], "truncated": True})

    files, agent = await connect({"list": listing})
    result = await files.list("/workspace", limit=7)
    assert result.truncated and [e.name for e in result.entries] == ["f"]
    assert agent.opened[-1]["limit"] == 7


# --- reads ---------------------------------------------------------------------------------


@dataclass
class Reader:
    """The agent's side of a read: sends ``content`` within the window it is granted."""

    content: bytes
    announce: int | None = None  # the size it says (default: the content's)
    sent: int = 0
    credit: int = WINDOW
    granted: int = 0
    chan: int = 0
    agent: Agent | None = None
    max_unacked: int = 0

    def open(self, agent: Agent, chan: int, req: dict[str, Any]) -> None:
        self.agent, self.chan = agent, chan
        size = len(self.content) if self.announce is None else self.announce
        agent.ok(chan, {"size": size}, close=False)
        agent.on_frame = self.frame
        self.pump()

    def frame(self, f: Frame) -> None:
        if f.type is Type.WINDOW and f.chan == self.chan:
            n = struct.unpack(">I", f.payload)[0]
            self.credit += n
            self.granted += n
            self.pump()

    def pump(self) -> None:
        assert self.agent is not None
        while self.sent < len(self.content) and self.credit > 0:
            n = min(CHUNK, self.credit, len(self.content) - self.sent)
            self.agent.send(encode(Type.DATA, self.chan, self.content[self.sent:self.sent + n]))
            self.sent += n
            self.credit -= n
            self.max_unacked = max(self.max_unacked, self.sent - self.granted)
        if self.sent == len(self.content):
            self.agent.send(encode(Type.EOF, self.chan))
            self.agent.send(encode(Type.CLOSE, self.chan))
            self.sent += 1  # once


@run
async def test_a_read_streams_chunk_by_chunk_under_flow_control() -> None:
    content = bytes(range(256)) * 8192  # 2 MiB
    reader = Reader(content)
    files, agent = await connect({"read": reader.open})
    stream = await files.read("/workspace/big", max_bytes=len(content))
    assert stream.size == len(content)
    digest, pieces = hashlib.sha256(), 0
    async for chunk in stream.chunks():
        assert len(chunk) <= MERGE_BYTES  # frames queued behind each other come merged
        digest.update(chunk)
        pieces += 1
    assert digest.hexdigest() == hashlib.sha256(content).hexdigest() and pieces >= 8
    # The agent only ever ran one window ahead of what had been handed on.
    assert reader.max_unacked <= WINDOW and reader.granted >= len(content) - WINDOW
    assert agent.opened[-1]["max_bytes"] == len(content)


@run
async def test_a_read_cut_short_closes_the_channel() -> None:
    # more than a read's window: the agent waits for grants
    reader = Reader(b"x" * (2 * READ_WINDOW))
    files, agent = await connect({"read": reader.open})
    stream = await files.read("/workspace/f", max_bytes=4 * READ_WINDOW)
    chunks = stream.chunks()
    first = await anext(chunks)
    assert first == b"x" * len(first) and CHUNK <= len(first) <= MERGE_BYTES
    await chunks.aclose()  # a client that went away
    assert agent.got(reader.chan, Type.CLOSE)


@run
async def test_a_read_is_the_announced_size_and_a_short_file_is_an_error() -> None:
    grown = Reader(b"abcdef", announce=4)  # the file grew after the open
    files, _ = await connect({"read": grown.open})
    stream = await files.read("/workspace/log", max_bytes=100)
    assert b"".join([c async for c in stream.chunks()]) == b"abcd"

    shrunk = Reader(b"ab", announce=4)
    files, _ = await connect({"read": shrunk.open})
    stream = await files.read("/workspace/log", max_bytes=100)
    with pytest.raises(AgentUnavailable, match="shrank"):
        _ = [c async for c in stream.chunks()]


@run
async def test_a_read_larger_than_the_limit_fails_before_any_content() -> None:
    liar = Reader(b"x" * (2 * WINDOW), announce=1 << 40)  # more than it was allowed to
    files, agent = await connect({"read": liar.open})
    with pytest.raises(PayloadTooLarge):
        await files.read("/workspace/f", max_bytes=1000)
    assert agent.got(liar.chan, Type.CLOSE)
    files, _ = await connect({"read": answer("too_large")})
    with pytest.raises(PayloadTooLarge):
        await files.read("/workspace/f", max_bytes=1000)


@run
async def test_a_silent_agent_costs_the_deadline() -> None:
    files, _ = await connect({"read": lambda a, c, r: None})
    with pytest.raises(AgentTimeout):
        await files.read("/workspace/f", max_bytes=10)


@pytest.fixture(autouse=True)
def short_deadlines(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REQUEST_TIMEOUT_S", "CHUNK_TIMEOUT_S", "COMMIT_TIMEOUT_S"):
        monkeypatch.setattr(agent_files, name, 0.2)


@run
async def test_a_read_that_stalls_midway_times_out() -> None:
    def stall(agent: Agent, chan: int, req: dict[str, Any]) -> None:
        agent.ok(chan, {"size": 10}, close=False)
        agent.send(encode(Type.DATA, chan, b"12345"))

    files, agent = await connect({"read": stall})
    stream = await files.read("/workspace/f", max_bytes=10)
    got = []
    with pytest.raises(AgentTimeout):
        async for chunk in stream.chunks():
            got.append(chunk)
    assert got == [b"12345"] and agent.got(1, Type.CLOSE)


# --- writes --------------------------------------------------------------------------------


@dataclass
class Writer:
    """The agent's side of a write: ready, then takes DATA (granting it back), and at EOF
    answers the size. ``fail_after``: answer ``fail`` once that many bytes came."""

    received: bytearray = field(default_factory=bytearray)
    frames: list[int] = field(default_factory=list)
    chan: int = 0
    grant: bool = True
    fail_after: int | None = None
    fail: tuple[str, str] = ("failed", "write: no space left on device")
    agent: Agent | None = None
    done: bool = False

    def open(self, agent: Agent, chan: int, req: dict[str, Any]) -> None:
        self.agent, self.chan = agent, chan
        agent.ok(chan, close=False)
        agent.on_frame = self.frame

    def frame(self, f: Frame) -> None:
        assert self.agent is not None
        if f.chan != self.chan or self.done:
            return
        if f.type is Type.DATA:
            assert len(f.payload) <= CHUNK
            self.received += f.payload
            self.frames.append(len(f.payload))
            if self.fail_after is not None and len(self.received) >= self.fail_after:
                self.done = True
                self.agent.error(self.chan, *self.fail)
            elif self.grant:
                self.agent.send(encode(Type.WINDOW, self.chan, struct.pack(">I", len(f.payload))))
        elif f.type is Type.EOF:
            self.done = True
            self.agent.ok(self.chan, {"size": len(self.received)})


async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at:at + size]


@run
async def test_a_write_streams_in_window_sized_frames() -> None:
    data = bytes(range(256)) * 12000  # ~3 MiB, in uneven pieces
    writer = Writer()
    files, agent = await connect({"write": writer.open})
    assert await files.write("/workspace/f", pieces(data, 100_003), max_bytes=len(data)) == len(
        data)
    assert bytes(writer.received) == data and max(writer.frames) == CHUNK
    assert agent.got(writer.chan, Type.EOF)
    req = agent.opened[-1]
    assert (req["mkdirs"], req["max_bytes"]) == (True, len(data))


@run
async def test_an_empty_write() -> None:
    writer = Writer()
    files, _ = await connect({"write": writer.open})
    assert await files.write("/workspace/empty", pieces(b"", 1), max_bytes=10) == 0


@run
async def test_a_write_past_the_limit_closes_before_eof() -> None:
    writer = Writer()
    files, agent = await connect({"write": writer.open})
    with pytest.raises(PayloadTooLarge):
        await files.write("/workspace/f", pieces(b"x" * 5000, 1000), max_bytes=3500)
    assert len(writer.received) == 3000  # what came before the limit was passed
    assert not agent.got(writer.chan, Type.EOF) and agent.got(writer.chan, Type.CLOSE)


@run
async def test_an_agent_error_midway_is_the_answer() -> None:
    writer = Writer(fail_after=CHUNK)  # a full disk after the first frame
    files, _ = await connect({"write": writer.open})
    with pytest.raises(DenError) as info:
        await files.write("/workspace/f", pieces(b"x" * (4 * WINDOW), 1 << 20),
                          max_bytes=1 << 30)
    assert info.value.code == "disk_full"


@run
async def test_a_write_refused_at_open() -> None:
    files, _ = await connect({"write": answer("permission")})
    with pytest.raises(Forbidden):
        await files.write("/workspace/private/x", pieces(b"x", 1), max_bytes=10)


@run
async def test_an_agent_that_stops_granting_costs_the_deadline() -> None:
    writer = Writer(grant=False)
    files, agent = await connect({"write": writer.open})
    with pytest.raises(AgentTimeout):
        await files.write("/workspace/f", pieces(b"x" * (2 * WINDOW), CHUNK),
                          max_bytes=1 << 30)
    assert len(writer.received) == WINDOW and agent.got(writer.chan, Type.CLOSE)


@run
async def test_a_write_answer_with_the_wrong_size_is_an_error() -> None:
    def liar(agent: Agent, chan: int, req: dict[str, Any]) -> None:
        agent.ok(chan, close=False)

        def frame(f: Frame) -> None:
            if f.type is Type.EOF:
                agent.ok(chan, {"size": 999})
        agent.on_frame = frame

    files, _ = await connect({"write": liar})
    with pytest.raises(AgentUnavailable):
        await files.write("/workspace/f", pieces(b"abc", 1), max_bytes=10)


# --- the routes over a runtime with an agent -------------------------------------------------


@dataclass
class AgentRuntime(FakeRuntime):
    """The fake, plus an agent (the scripted one) for its workspaces."""

    ops: dict[str, Handler] = field(default_factory=dict)
    scripted: Agent | None = None
    session: AgentSession | None = None

    async def agent(self, spec: WorkspaceSpec) -> AgentSession | None:
        if self.session is None or not self.session.alive:
            self.scripted = Agent(self.ops)
            self.session = await AgentSession.connect(self.scripted, name=spec.workspace_id,
                                                      timeout_s=1)
        return self.session

    def on_fallback(self, listener: Callable[[str, str], None]) -> None:
        pass  # the scripted agent always answers

    async def connect(  # type: ignore[override]  # the files tests have no connections
            self, spec: WorkspaceSpec, host: str, port: int) -> ExecStream | None:
        return None


@pytest.fixture
def fake_runtime() -> AgentRuntime:
    return AgentRuntime()


@pytest.fixture
def files_url(fake_api: ApiClient, make_repo: Callable[..., Path]) -> str:
    ws = fake_api.create(make_repo("api"), name="api")
    return f"/api/v1/workspaces/{ws['id']}/files"


def test_the_routes_stream_through_the_agent(fake_api: ApiClient, files_url: str,
                                             fake_runtime: AgentRuntime) -> None:
    content = b"0123456789" * 100_000
    reader, writer = Reader(content), Writer()

    def listing(agent: Agent, chan: int, req: dict[str, Any]) -> None:
        agent.ok(chan, {"entries": [{"name": "b", "type": "file", "size": 1, "mtime": 2.0,
                                     "mode": "0644"}], "truncated": True})

    fake_runtime.ops = {"read": reader.open, "write": writer.open, "list": listing,
                        "remove": answer("not_empty")}
    r = fake_api.get(files_url, params={"path": "api/big"})
    assert (r.status_code, r.headers["content-length"]) == (200, str(len(content)))
    assert r.content == content
    r = fake_api.put(files_url, params={"path": "api/new"}, content=content)
    assert (r.status_code, r.json()) == (200, {"path": "/workspace/api/new",
                                               "size": len(content)})
    assert bytes(writer.received) == content
    r = fake_api.get(f"{files_url}/list", params={"path": "api"})
    assert r.json() == {"path": "/workspace/api", "truncated": True, "entries": [
        {"name": "b", "type": "file", "size": 1, "mtime": 2.0, "mode": "644"}]}
    r = fake_api.delete(files_url, params={"path": "api"})
    assert (r.status_code, r.json()["error"]["code"]) == (409, "not_empty")


def test_route_errors_before_the_first_byte_are_json(fake_api: ApiClient, files_url: str,
                                                     fake_runtime: AgentRuntime) -> None:
    writer = Writer()
    fake_runtime.ops = {"read": answer("is_dir"), "write": writer.open}
    r = fake_api.get(files_url, params={"path": "api"})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "is_a_directory")
    limit = 64 * 1024 * 1024
    # A declared length over the limit: refused before the workspace is touched.
    r = fake_api.put(files_url, params={"path": "big"}, content=b"x" * (limit + 1))
    assert (r.status_code, r.json()["error"]["code"]) == (413, "too_large")
    assert fake_runtime.scripted is not None
    assert "write" not in [req["op"] for req in fake_runtime.scripted.opened]

    # Chunked, with no length: refused as the body passes the limit, the agent's write
    # closed before EOF (which removes its temporary file).
    def body() -> Iterator[bytes]:
        for _ in range(65):
            yield b"x" * (1024 * 1024)

    r = fake_api.put(files_url, params={"path": "big"}, content=body())
    assert (r.status_code, r.json()["error"]["code"]) == (413, "too_large")
    chan = next(i + 1 for i, req in enumerate(fake_runtime.scripted.opened)
                if req["op"] == "write")
    assert fake_runtime.scripted.got(chan, Type.CLOSE)
    assert not fake_runtime.scripted.got(chan, Type.EOF)
