"""The files API: read, write, list, delete, stat, mkdir and rename inside ``/workspace`` only.

Every operation acts as ``dev`` inside the workspace, so the workspace's own permissions
apply, and paths are normalised here first. Where the runtime hands out the workspace's
agent (:class:`~server.runtime.base.AgentChannel`), the agent does the operations
(:mod:`server.agent.files`): it resolves symlinks and refuses what leads outside
``/workspace``, and reads and writes stream, so no file is held whole in Den's memory.
Otherwise (the fake runtime, a workspace created without the agent, an agent that cannot be
reached) small ``sh`` scripts run through the engine's exec, resolving the path again inside
the sandbox with ``realpath``; a write then collects the body first (at most
``file_max_bytes``). The scripts are pure data (tested by equality); the exit codes below are
the contract between them and :class:`FileService`, and both paths answer the same errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import weakref
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from server.agent.files import LIST_LIMIT, AgentFiles, FileEntry, Listing
from server.agent.session import AgentSession
from server.errors import Conflict, DenError, Forbidden, NotFound, PayloadTooLarge, ValidationFailed
from server.runtime import host_files
from server.runtime.base import AgentChannel, ExecResult, HostVolumes, WorkspaceSpec
from server.runtime.errors import AgentTimeout, AgentUnavailable, EngineConflict
from server.workspaces.service import WORKSPACE_ROOT, WorkspaceService, path_in_workspace
from server.workspaces.states import State

__all__ = ["FileContent", "FileEntry", "FileService", "Listing", "parse_listing"]


def _inside(var: str) -> str:
    return f'case "${var}" in {WORKSPACE_ROOT}|{WORKSPACE_ROOT}/*) ;; *) exit 3;; esac; '


def _no_follow(arg: str, var: str) -> str:
    """Set ``var`` to the path in ``arg`` with its directory resolved and its last component
    kept: the entry itself, a symlink rather than its target (like ``lstat``)."""
    return (f'd=$(realpath -e -- "$(dirname -- "{arg}")") || exit 2; '
            f'{var}="${{d%/}}/$(basename -- "{arg}")"; ')


def _entry_of(var: str) -> str:
    """Print the entry of ``var`` as one LIST_SCRIPT record (find does not follow it)."""
    return f"exec find \"${var}\" -maxdepth 0 -printf '%y\\t%s\\t%T@\\t%m\\t%f\\0'"


_INSIDE = _inside("p")

READ_SCRIPT = (
    'p=$(realpath -e -- "$1") || exit 2; ' + _INSIDE
    + '[ -d "$p" ] && exit 4; '
    + '[ "$(stat -c %s -- "$p")" -gt "$2" ] && exit 5; '
    + 'exec cat -- "$p"'
)
WRITE_SCRIPT = (
    'p=$(realpath -m -- "$1") || exit 2; ' + _INSIDE
    + '[ -d "$p" ] && exit 4; '
    + 'mkdir -p -- "$(dirname -- "$p")" && cat > "$p" && stat -c %s -- "$p"'
)
LIST_SCRIPT = (
    'p=$(realpath -e -- "$1") || exit 2; ' + _INSIDE
    + '[ -d "$p" ] || exit 4; '
    + "exec find \"$p\" -mindepth 1 -maxdepth 1 -printf '%y\\t%s\\t%T@\\t%m\\t%f\\0'"
)
DELETE_SCRIPT = (
    'd=$(realpath -e -- "$(dirname -- "$1")") || exit 2; '
    + 'p="$d/$(basename -- "$1")"; ' + _INSIDE
    + '[ "$p" = ' + WORKSPACE_ROOT + " ] && exit 6; "
    + '[ -e "$p" ] || [ -L "$p" ] || exit 2; '
    + 'if [ -d "$p" ] && [ ! -L "$p" ]; then '
    + 'if [ "$2" = 1 ]; then exec rm -rf -- "$p"; else rmdir -- "$p" 2>/dev/null || exit 7; fi; '
    + 'else exec rm -f -- "$p"; fi'
)

STAT_SCRIPT = (
    _no_follow("$1", "p") + _INSIDE
    + '[ -e "$p" ] || [ -L "$p" ] || exit 2; '
    + _entry_of("p")
)
# Prints "+" (made) or "=" (already a directory, with parents), then the entry.
MKDIR_SCRIPT = (
    'p=$(realpath -m -- "$1") || exit 2; ' + _INSIDE
    + 'if [ -e "$p" ] || [ -L "$p" ]; then '
    + '{ [ "$2" = 1 ] && [ -d "$p" ]; } || exit 8; m="="; '
    + 'elif [ "$2" = 1 ]; then mkdir -p -- "$p" || exit 1; m="+"; '
    + 'else d=$(dirname -- "$p"); [ -e "$d" ] || exit 2; [ -d "$d" ] || exit 9; '
    + 'mkdir -- "$p" || exit 1; m="+"; fi; '
    + 'printf %s "$m"; ' + _no_follow("$1", "q") + _entry_of("q")
)
RENAME_SCRIPT = (
    _no_follow("$1", "s") + _inside("s")
    + '[ "$s" = ' + WORKSPACE_ROOT + " ] && exit 6; "
    + '[ -e "$s" ] || [ -L "$s" ] || exit 2; '
    + _no_follow("$2", "t") + _inside("t")
    + '[ "$t" = ' + WORKSPACE_ROOT + " ] && exit 6; "
    + 'if [ "$s" != "$t" ]; then '
    + 'if [ -d "$t" ] && [ ! -L "$t" ]; then '
    + '{ [ -d "$s" ] && [ ! -L "$s" ]; } || exit 4; '
    + '[ -z "$(find "$t" -mindepth 1 -maxdepth 1 -print -quit)" ] || exit 7; '
    + 'elif [ -e "$t" ] || [ -L "$t" ]; then '
    + '[ -d "$s" ] && [ ! -L "$s" ] && exit 9; fi; '
    + 'mv -f -T -- "$s" "$t" || exit 1; fi; '
    + _entry_of("t")
)

_TYPES = {"f": "file", "d": "dir", "l": "symlink"}


def script_argv(script: str, *args: str) -> list[str]:
    return ["/bin/sh", "-c", script, "den-files", *args]


def _raise_for(result: ExecResult, path: str, *, want_dir: bool = False,
               op: str = "delete") -> None:
    """Translate a file script's exit code into Den's errors (``op`` words two of them)."""
    code = result.exit_code
    message = result.stderr.decode(errors="replace").strip()
    if code == 0:
        return
    if "Permission denied" in message:
        raise Forbidden(f"permission denied: {path}")
    if code == 2:
        raise NotFound(f"no such file or directory: {path}")
    if code == 3:
        raise Forbidden(f"{path} resolves outside /workspace", code="path_outside")
    if code == 4:
        if want_dir:
            raise ValidationFailed(f"{path} is not a directory", code="not_a_directory")
        raise ValidationFailed(f"{path} is a directory", code="is_a_directory")
    if code == 5:
        raise PayloadTooLarge(f"{path} is larger than this server's file size limit")
    if code == 6:
        raise Forbidden(f"/workspace itself cannot be {'renamed' if op == 'rename' else 'deleted'}")
    if code == 7:
        if op == "rename":
            raise Conflict(f"{path}: the target is a directory that is not empty",
                           code="not_empty")
        raise Conflict(f"directory {path} is not empty; delete with recursive=true",
                       code="not_empty")
    if code == 8:
        raise Conflict(f"{path} already exists", code="exists")
    if code == 9 or "Not a directory" in message:
        raise ValidationFailed(f"{path} is not a directory", code="not_a_directory")
    if "No space left" in message:
        raise DenError(f"no space left in the workspace while writing {path}", code="disk_full")
    if code > 128:  # killed: the workspace stopped (or paused) under the operation
        raise Conflict(f"the file operation on {path} was cut short (signal {code - 128}): "
                       "the workspace stopped or paused meanwhile, or it ran out of time")
    raise ValidationFailed(f"file operation on {path} failed: {message or f'exit {code}'}")


class FileContent:
    """A file being read: ``size`` bytes to come from :meth:`chunks`. Iterate it once, or
    :meth:`aclose` it: either way the read ends (the agent's channel is closed)."""

    def __init__(self, size: int, chunks: AsyncIterator[bytes],
                 close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.size = size
        self._chunks = chunks
        self._close = close

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in self._chunks:
                yield chunk
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        close, self._close = self._close, None
        if close is not None:
            await close()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _host_error(exc: OSError, path: str) -> DenError:
    """The Den error for a failure of a write from the host after its first byte."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DenError(f"no space left in the workspace while writing {path}",
                        code="disk_full")
    if exc.errno == errno.EFBIG:
        return PayloadTooLarge(f"{path} is larger than the workspace's file system allows")
    if exc.errno == errno.EISDIR:
        return ValidationFailed(f"{path} is a directory", code="is_a_directory")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Forbidden(f"permission denied: {path}")
    return ValidationFailed(f"file operation on {path} failed: {exc.strerror or exc}")


def _cut_short() -> Conflict:
    """A file operation that the workspace's stop or pause ended (or would have ended)."""
    return Conflict("the workspace stopped or paused during the file operation, which was "
                    "cut short; try again")


async def _fs(path: str, step: Callable[..., Awaitable[None]], *args: Any) -> None:
    """A step of a write from the host, its file system error as Den's."""
    try:
        await step(*args)
    except OSError as exc:
        raise _host_error(exc, path) from exc


class FileService:
    """File operations on a workspace, as ``dev``: through its agent when it has one, else
    through the workspace service's exec. Reads and writes of plain files go through the
    workspace's directory on the host when the runtime has one (:mod:`~server.runtime.
    host_files`), as ``dev`` too, with the agent deciding every case that is not plain."""

    def __init__(self, workspaces: WorkspaceService) -> None:
        self.workspaces = workspaces
        # Reads and writes by the path they took: host, agent or exec (/metrics).
        self.transfers: Counter[str] = Counter()
        # The workspace user's ids per agent session (None: the host path is not used).
        self._ids: weakref.WeakKeyDictionary[AgentSession, host_files.Ids | None] = (
            weakref.WeakKeyDictionary())

    @property
    def max_bytes(self) -> int:
        return self.workspaces.settings.file_max_bytes

    async def _agent(self, ws_id: str, actor: str) -> AgentFiles | None:
        """The workspace's agent (waking the workspace), or None: use the scripts then."""
        reached = await self._reach(ws_id, actor)
        return reached[0] if reached is not None else None

    async def _reach(self, ws_id: str, actor: str) -> tuple[AgentFiles, WorkspaceSpec] | None:
        """The workspace's agent and spec (waking the workspace), or None: the scripts."""
        svc = self.workspaces
        runtime = svc.runtime
        if not isinstance(runtime, AgentChannel):
            return None
        ws = await svc.ensure_running(ws_id, actor=actor)
        spec = svc.spec_for(ws)
        try:
            session = await runtime.agent(spec)
        except EngineConflict:
            return None  # the sandbox died: the exec path notices, records it and restarts it
        if session is None:
            return None
        return AgentFiles(session, root=WORKSPACE_ROOT, user="dev"), spec

    async def _host(self, files: AgentFiles, spec: WorkspaceSpec
                    ) -> tuple[Path, host_files.Ids] | None:
        """Where and as whom to read or write the workspace's files from the host, or None
        (a runtime without a host directory, an agent without the ``user`` op)."""
        runtime = self.workspaces.runtime
        if not isinstance(runtime, HostVolumes) or not host_files.usable():
            return None
        session = files.session
        if session not in self._ids:
            self._ids[session] = host_files.Ids.parse(await files.user_ids())
        ids = self._ids[session]
        if ids is None:
            return None
        root = await runtime.workspace_dir(spec)
        return (root, ids) if root is not None else None

    @contextlib.asynccontextmanager
    async def _busy(self, ws_id: str) -> AsyncIterator[None]:
        """Like an exec: the workspace is busy meanwhile, and used when it ends. An agent
        that goes away because the workspace stopped or paused under the call is a 409."""
        try:
            async with self.workspaces.activity.hold(ws_id):
                yield
        except (AgentUnavailable, AgentTimeout) as exc:
            if not self._still_running(ws_id):
                raise _cut_short() from exc
            raise
        finally:
            self.workspaces.touch(ws_id)

    def _still_running(self, ws_id: str) -> bool:
        try:
            return self.workspaces.get(ws_id).state == State.RUNNING.value
        except NotFound:
            return False

    async def _run(self, ws_id: str, actor: str, argv: list[str], *,
                   stdin: bytes | None = None) -> ExecResult:
        svc = self.workspaces
        ws = svc.get(ws_id)
        req = svc.exec_request(ws, argv, cwd=WORKSPACE_ROOT, stdin=stdin, timeout_s=300)
        # A file may be as large as file_max_bytes; one byte more shows it was cut.
        # A files call is short: it never waits behind long execs (server/workspaces/admission).
        req = dataclasses.replace(req, max_output_bytes=self.max_bytes + 1, short=True)
        return await svc.exec(ws_id, req, actor=actor)

    async def read(self, ws_id: str, path: str, *, actor: str) -> FileContent:
        """Open a file: every error comes from here, before the content."""
        target = path_in_workspace(path)
        reached = await self._reach(ws_id, actor)
        if reached is None:
            self.transfers["exec"] += 1
            limit = str(self.max_bytes)
            result = await self._run(ws_id, actor, script_argv(READ_SCRIPT, target, limit))
            _raise_for(result, target)
            return FileContent(len(result.stdout), _once(result.stdout))
        files, spec = reached
        host = await self._host(files, spec)
        opened = None if host is None else await host_files.open_read(
            host[0], _relative(target), host[1], max_bytes=self.max_bytes)
        if opened is not None:
            self.transfers["host"] += 1
            return FileContent(opened.size, self._held(ws_id, opened.chunks()), opened.close)
        self.transfers["agent"] += 1
        stream = await files.read(target, max_bytes=self.max_bytes)
        return FileContent(stream.size, self._held(ws_id, stream.chunks()), stream.aclose)

    async def write(self, ws_id: str, path: str, body: AsyncIterable[bytes], *,
                    actor: str) -> int:
        """Write ``body`` (at most ``file_max_bytes``, else 413) to ``path``; its size."""
        target = path_in_workspace(path)
        if target == WORKSPACE_ROOT:
            raise ValidationFailed("path names /workspace itself; name a file inside it")
        reached = await self._reach(ws_id, actor)
        if reached is not None:
            files, spec = reached
            async with self._busy(ws_id):
                host = await self._host(files, spec)
                writer = None if host is None else await host_files.open_write(
                    host[0], _relative(target), host[1])
                if writer is not None:
                    self.transfers["host"] += 1
                    return await self._write_host(ws_id, writer, body, target)
                self.transfers["agent"] += 1
                return await files.write(target, body, max_bytes=self.max_bytes)
        self.transfers["exec"] += 1
        data = bytearray()
        async for chunk in body:
            data += chunk
            if len(data) > self.max_bytes:
                raise PayloadTooLarge(
                    f"file is larger than this server's limit of {self.max_bytes} bytes")
        result = await self._run(ws_id, actor, script_argv(WRITE_SCRIPT, target),
                                 stdin=bytes(data))
        _raise_for(result, target)
        return len(data)

    async def _held(self, ws_id: str, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async with self._busy(ws_id):
            async for chunk in chunks:
                yield chunk

    async def _write_host(self, ws_id: str, writer: host_files.HostWrite,
                          body: AsyncIterable[bytes], target: str) -> int:
        """Write ``body`` through ``writer`` in pieces of host_files.CHUNK bytes, each in a
        thread while the next is received (at most two pieces held), then rename it over
        ``target``; on any failure the temporary file is removed. A stop, pause or delete
        of the workspace meanwhile does not reach the host's write, but the answer is the
        agent's all the same (409, and nothing written): the API's contract is one."""
        total, pending = 0, bytearray()
        writing: asyncio.Task[None] | None = None
        try:
            async for chunk in body:
                total += len(chunk)
                if total > self.max_bytes:
                    raise PayloadTooLarge(
                        f"file is larger than this server's limit of {self.max_bytes} bytes")
                pending += chunk
                if len(pending) >= host_files.CHUNK:
                    if writing is not None:
                        await writing
                    piece, pending = pending, bytearray()
                    writing = asyncio.create_task(_fs(target, writer.write, piece))
            if writing is not None:
                await writing
            writing = None
            await _fs(target, writer.write, pending)
            if not self._still_running(ws_id):
                raise _cut_short()
            await _fs(target, writer.commit)
            return total
        except BaseException:
            if writing is not None:
                writing.cancel()  # the thread finishes its piece; abort waits for it
                with contextlib.suppress(BaseException):
                    await writing  # its own error, if it had one, is not left unread
            await writer.abort()  # a client that went away included
            raise

    async def list(self, ws_id: str, path: str, *, actor: str) -> Listing:
        target = path_in_workspace(path)
        files = await self._agent(ws_id, actor)
        if files is not None:
            async with self._busy(ws_id):
                return await files.list(target, limit=LIST_LIMIT)
        result = await self._run(ws_id, actor, script_argv(LIST_SCRIPT, target))
        _raise_for(result, target, want_dir=True)
        entries = parse_listing(result.stdout)
        return Listing(entries[:LIST_LIMIT], truncated=len(entries) > LIST_LIMIT)

    async def delete(self, ws_id: str, path: str, *, recursive: bool, actor: str) -> None:
        target = path_in_workspace(path)
        if target == WORKSPACE_ROOT:
            raise Forbidden("/workspace itself cannot be deleted")
        files = await self._agent(ws_id, actor)
        if files is not None:
            async with self._busy(ws_id):
                await files.remove(target, recursive=recursive)
            return
        result = await self._run(
            ws_id, actor, script_argv(DELETE_SCRIPT, target, "1" if recursive else "0")
        )
        _raise_for(result, target)

    async def stat(self, ws_id: str, path: str, *, actor: str) -> FileEntry:
        """What ``path`` is: a symlink itself, not its target."""
        target = path_in_workspace(path)
        files = await self._agent(ws_id, actor)
        if files is not None:
            async with self._busy(ws_id):
                return await files.stat(target)
        result = await self._run(ws_id, actor, script_argv(STAT_SCRIPT, target))
        _raise_for(result, target)
        return _one_entry(result.stdout, target)

    async def mkdir(self, ws_id: str, path: str, *, parents: bool,
                    actor: str) -> tuple[FileEntry, bool]:
        """Make a directory; its entry, and whether it was made (False: with ``parents``
        it was already a directory)."""
        target = path_in_workspace(path)
        files = await self._agent(ws_id, actor)
        if files is not None:
            async with self._busy(ws_id):
                existed = False
                if parents:  # the agent answers ok whether it made it or found it
                    with contextlib.suppress(NotFound):
                        await files.stat(target)
                        existed = True
                await files.mkdir(target, parents=parents)  # a file there: 409 exists
                return await files.stat(target), not existed
        result = await self._run(
            ws_id, actor, script_argv(MKDIR_SCRIPT, target, "1" if parents else "0"))
        _raise_for(result, target, want_dir=True)
        made = result.stdout[:1] == b"+"
        return _one_entry(result.stdout[1:], target), made

    async def rename(self, ws_id: str, path: str, to: str, *, actor: str) -> FileEntry:
        """Rename ``path`` (the entry itself, a symlink rather than its target) to ``to``,
        replacing a file or an empty directory there; the entry at ``to``."""
        source, target = path_in_workspace(path), path_in_workspace(to)
        if WORKSPACE_ROOT in (source, target):
            raise Forbidden("/workspace itself cannot be renamed or replaced")
        files = await self._agent(ws_id, actor)
        if files is not None:
            async with self._busy(ws_id):
                await files.rename(source, target)
                return await files.stat(target)
        result = await self._run(ws_id, actor, script_argv(RENAME_SCRIPT, source, target))
        _raise_for(result, source, op="rename")
        return _one_entry(result.stdout, target)


def _relative(target: str) -> str:
    """``target`` (a normalised path in /workspace) relative to /workspace."""
    return target[len(WORKSPACE_ROOT):].lstrip("/") or "."


def _one_entry(raw: bytes, path: str) -> FileEntry:
    entries = parse_listing(raw)
    if len(entries) != 1:  # it went away between the operation and its stat
        raise NotFound(f"no such file or directory: {path}")
    return entries[0]


def parse_listing(raw: bytes) -> list[FileEntry]:
    """Parse ``find -printf '%y\\t%s\\t%T@\\t%m\\t%f\\0'`` output, sorted by name."""
    entries: list[FileEntry] = []
    for record in raw.split(b"\0"):
        if not record:
            continue
        kind, size, mtime, mode, name = record.split(b"\t", 4)
        entries.append(
            FileEntry(
                name=name.decode(errors="backslashreplace"),
                type=_TYPES.get(kind.decode(), "other"),
                size=int(size),
                mtime=float(mtime),
                mode=mode.decode(),
            )
        )
    return sorted(entries, key=lambda e: e.name)
