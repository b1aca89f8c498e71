"""File operations over an agent session: stat, list, read, write, mkdir, remove, rename.

The agent resolves symlinks, checks containment under ``root`` and the permission bits of
``user`` inside the workspace (docs/agent.md); this module speaks the operations and maps
the agent's error codes onto Den's errors, the same ones the files API has always answered.
Reads and writes stream: a read hands on one chunk at a time and grants the agent window
credit only once the chunk is handed on, a write sends as the agent's window allows, so
neither holds a file in memory. Every wait has a deadline, and nothing the agent says is
trusted: sizes, names and list lengths are checked and bounded here.
"""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass
from typing import Any

from server.agent.protocol import WINDOW
from server.agent.session import CHUNK, AgentOpError, AgentSession, Channel, ok_or_raise
from server.errors import Conflict, DenError, Forbidden, NotFound, PayloadTooLarge, ValidationFailed
from server.runtime.errors import AgentTimeout, AgentUnavailable, EngineConflict

REQUEST_TIMEOUT_S = 30.0  # one answer to one request
CHUNK_TIMEOUT_S = 30.0  # between two chunks of a read; for window credit during a write
COMMIT_TIMEOUT_S = 120.0  # from a write's EOF to its answer (close and rename on the agent)
REMOVE_TIMEOUT_S = 300.0  # a recursive remove of a large tree
LIST_LIMIT = 10_000
READ_WINDOW = 1 << 20  # unread bytes of a file the agent may send ahead
MAX_NAME_CHARS = 1024  # NAME_MAX is 255 bytes; invalid UTF-8 arrives as U+FFFD each
TYPES = frozenset({"file", "dir", "symlink", "other"})


@dataclass(frozen=True)
class FileEntry:
    name: str
    type: str
    size: int
    mtime: float
    mode: str  # octal permission bits as ``find -printf %m`` writes them: "644", "4755"


@dataclass(frozen=True)
class Listing:
    entries: list[FileEntry]  # sorted by name
    truncated: bool  # entries were left out (past the limit, or past one answer's size)


def file_error(err: AgentOpError, path: str, *, root: str, op: str = "") -> DenError:
    """The Den error for the agent's answer ``err`` to an operation on ``path``."""
    code = err.code
    if code == "outside":
        return Forbidden(f"{path} resolves outside {root}", code="path_outside")
    if code == "permission":
        return Forbidden(f"permission denied: {path}")
    if code == "not_found":
        return NotFound(f"no such file or directory: {path}")
    if code == "is_dir":
        return ValidationFailed(f"{path} is a directory", code="is_a_directory")
    if code == "not_dir":
        return ValidationFailed(f"{path} is not a directory", code="not_a_directory")
    if code == "too_large":
        return PayloadTooLarge(f"{path} is larger than this server's file size limit")
    if code == "not_empty" or (code == "exists" and op == "remove"):  # rmdir: either errno
        if op == "remove":
            return Conflict(f"directory {path} is not empty; delete with recursive=true",
                            code="not_empty")
        return Conflict(f"{path}: the target is a directory that is not empty",
                        code="not_empty")
    if code == "exists":
        return Conflict(f"{path} already exists", code="exists")
    if code == "no_user":
        return EngineConflict(f"the workspace's image has no such user: {err.message}")
    if "no space left" in err.message.lower():
        return DenError(f"no space left in the workspace while writing {path}",
                        code="disk_full")
    return ValidationFailed(f"file operation on {path} failed: {err.message or code}",
                            detail=f"agent error {code}")


def parse_entries(ok: Any, *, limit: int) -> Listing:
    """A ``list`` answer, checked: at most ``limit`` entries, plausible fields, sane names."""
    rows = ok.get("entries") if isinstance(ok, dict) else None
    if not isinstance(rows, list):
        raise AgentUnavailable("the agent sent a listing Den does not understand")
    truncated = bool(ok.get("truncated")) or len(rows) > limit
    entries: list[FileEntry] = []
    for row in rows[:limit]:
        entry = _entry(row)
        if entry is not None:
            entries.append(entry)
    return Listing(sorted(entries, key=lambda e: e.name), truncated)


def _entry(row: Any) -> FileEntry | None:
    if not isinstance(row, dict):
        return None
    name = row.get("name")
    if (not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS
            or "/" in name or "\0" in name or name in (".", "..")):
        return None
    size, mtime, mode = row.get("size"), row.get("mtime"), row.get("mode")
    kind = row.get("type")
    try:
        bits = int(mode, 8) if isinstance(mode, str) and len(mode) <= 6 else 0
    except ValueError:
        bits = 0
    return FileEntry(
        name=name,
        type=kind if isinstance(kind, str) and kind in TYPES else "other",
        size=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else 0,
        mtime=float(mtime) if isinstance(mtime, int | float) and not isinstance(mtime, bool)
        else 0.0,
        mode=format(bits & 0o7777, "o"),
    )


async def _answer(ch: Channel, timeout_s: float) -> Any:
    """The channel's next answer (``ok`` payload, or AgentOpError); data before it is
    acknowledged and dropped (no operation here sends any)."""
    while True:
        event = await ch.next(timeout_s)
        if event.kind == "msg":
            return ok_or_raise(event.msg)
        if event.kind == "data":
            await ch.consumed(event.stream, len(event.data))
        elif event.kind == "end":
            raise AgentUnavailable(f"the workspace's agent went away: {event.reason}")


async def _why_ended(ch: Channel) -> AgentOpError | AgentUnavailable:
    """After a channel ended under a write: the agent's error if it sent one (the end
    event is queued last, so this never waits)."""
    while True:
        event = await ch.next(1.0)
        if event.kind == "msg":
            try:
                ok_or_raise(event.msg)
            except AgentOpError as err:
                return err
        elif event.kind == "end":
            return AgentUnavailable(f"the workspace's agent went away: {event.reason}")


async def _close(ch: Channel) -> None:
    """Close ``ch`` even when the caller is being cancelled (a client that went away): the
    agent must hear CLOSE to stop a read or drop a write's temporary file."""
    task = asyncio.ensure_future(ch.close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)
    await asyncio.shield(task)


_closing: set[asyncio.Future[None]] = set()


class ReadStream:
    """A file being read: ``size`` (from the agent, at open) and :meth:`chunks`. The
    content is the file's first ``size`` bytes; a file that shrinks meanwhile raises."""

    def __init__(self, ch: Channel, *, size: int, path: str) -> None:
        self._ch = ch
        self.size = size
        self.path = path

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        left = self.size
        try:
            while left > 0:
                event = await self._ch.next(CHUNK_TIMEOUT_S)
                if event.kind == "data":
                    piece = event.data[:left] if event.stream == 0 else b""
                    if piece:
                        yield piece
                        left -= len(piece)
                    await self._ch.consumed(event.stream, len(event.data))
                elif event.kind == "eof":
                    raise AgentUnavailable(f"{self.path} shrank while it was being read")
                elif event.kind == "msg":
                    try:
                        ok_or_raise(event.msg)
                    except AgentOpError as err:
                        raise AgentUnavailable(f"reading {self.path} failed: "
                                               f"{err.message}") from err
                elif event.kind == "end":
                    raise AgentUnavailable(f"the workspace's agent went away: {event.reason}")
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await _close(self._ch)


class AgentFiles:
    """File operations on one workspace through its agent, confined to ``root`` and done
    with ``user``'s permissions. Paths are absolute and already normalised by the caller."""

    def __init__(self, session: AgentSession, *, root: str, user: str) -> None:
        self._session = session
        self.root = root
        self.user = user

    @property
    def session(self) -> AgentSession:
        return self._session

    async def user_ids(self) -> Any:
        """The agent's ``user`` answer for ``user`` (its uid, gid and groups, unchecked), or
        None: an agent without the op, or no such user."""
        try:
            return await self._session.request({"op": "user", "user": self.user},
                                               timeout_s=REQUEST_TIMEOUT_S)
        except AgentOpError:
            return None

    def _op(self, op: str, path: str, **fields: Any) -> dict[str, Any]:
        return {"op": op, "path": path, "root": self.root, "user": self.user, **fields}

    async def _request(self, op: dict[str, Any], *, timeout_s: float | None = None) -> Any:
        try:
            return await self._session.request(op, timeout_s=timeout_s or REQUEST_TIMEOUT_S)
        except AgentOpError as err:
            raise file_error(err, op["path"], root=self.root, op=op["op"]) from err

    async def stat(self, path: str) -> FileEntry:
        """What ``path`` is (a symlink itself, not its target)."""
        ok = await self._request(self._op("stat", path))
        entry = _entry({**ok, "name": posixpath.basename(path) or "/"}
                       if isinstance(ok, dict) else None)
        if entry is None:
            raise AgentUnavailable("the agent sent a stat Den does not understand")
        return entry

    async def list(self, path: str, *, limit: int = LIST_LIMIT) -> Listing:
        ok = await self._request(self._op("list", path, limit=limit))
        return parse_entries(ok, limit=limit)

    async def read(self, path: str, *, max_bytes: int) -> ReadStream:
        """Open ``path`` for reading: errors (not found, too large, ...) come from here,
        before any content; then iterate :meth:`ReadStream.chunks` (which closes it)."""
        ch = await self._session.open(self._op("read", path, max_bytes=max_bytes))
        try:
            ok = await _answer(ch, REQUEST_TIMEOUT_S)
            size = ok.get("size") if isinstance(ok, dict) else None
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise AgentUnavailable("the agent sent a read answer Den does not understand")
            if size > max_bytes:
                raise PayloadTooLarge(f"{path} is larger than this server's file size limit")
            if size > WINDOW:  # one round trip for credit per window otherwise
                await ch.widen(0, READ_WINDOW)
        except AgentOpError as err:
            await _close(ch)
            raise file_error(err, path, root=self.root, op="read") from err
        except BaseException:
            await _close(ch)
            raise
        return ReadStream(ch, size=size, path=path)

    async def write(self, path: str, chunks: AsyncIterable[bytes], *, max_bytes: int,
                    mkdirs: bool = True) -> int:
        """Write ``chunks`` to ``path`` (a temporary file beside it, renamed over it at the
        end); the size written. Past ``max_bytes`` PayloadTooLarge, and the channel is
        closed before EOF, which makes the agent remove its temporary file."""
        ch = await self._session.open(self._op("write", path, mkdirs=mkdirs,
                                               max_bytes=max_bytes))
        try:
            await _answer(ch, REQUEST_TIMEOUT_S)  # ready
            total = 0
            async for chunk in chunks:
                total += len(chunk)
                if total > max_bytes:
                    raise PayloadTooLarge(
                        f"file is larger than this server's limit of {max_bytes} bytes")
                for start in range(0, len(chunk), CHUNK):
                    await self._send(ch, chunk[start:start + CHUNK])
            await ch.eof()
            ok = await _answer(ch, COMMIT_TIMEOUT_S)
            size = ok.get("size") if isinstance(ok, dict) else None
            if size != total:
                raise AgentUnavailable(f"the agent wrote {size!r} bytes of {total}")
            return total
        except AgentOpError as err:
            raise file_error(err, path, root=self.root, op="write") from err
        finally:
            await _close(ch)

    async def _send(self, ch: Channel, piece: bytes) -> None:
        try:
            await asyncio.wait_for(ch.write(piece), CHUNK_TIMEOUT_S)
        except TimeoutError:
            raise AgentTimeout("the workspace's agent stopped taking the file") from None
        except AgentUnavailable:
            why = await _why_ended(ch)  # the agent's own error, if it sent one
            raise why from None

    async def mkdir(self, path: str, *, parents: bool = False) -> None:
        await self._request(self._op("mkdir", path, parents=parents))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._request(self._op("remove", path, recursive=recursive),
                            timeout_s=REMOVE_TIMEOUT_S if recursive else None)

    async def rename(self, path: str, to: str) -> None:
        await self._request(self._op("rename", path, to=to))
