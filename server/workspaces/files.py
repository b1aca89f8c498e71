"""The files API: read, write, list and delete inside ``/workspace`` only.

Every operation runs as ``dev`` inside the workspace (through the engine's exec), so the
workspace's own permissions apply. Paths are normalised here first, then resolved again
inside the sandbox with ``realpath`` so that symlinks pointing outside ``/workspace`` are
refused too. The scripts are pure data (tested by equality); the exit codes below are the
contract between them and :class:`FileService`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from server.errors import Conflict, DenError, Forbidden, NotFound, PayloadTooLarge, ValidationFailed
from server.runtime.base import ExecResult
from server.workspaces.service import WORKSPACE_ROOT, WorkspaceService, path_in_workspace

_INSIDE = (
    'case "$p" in ' + WORKSPACE_ROOT + "|" + WORKSPACE_ROOT + "/*) ;; *) exit 3;; esac; "
)

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

_TYPES = {"f": "file", "d": "dir", "l": "symlink"}


@dataclass(frozen=True)
class FileEntry:
    name: str
    type: str
    size: int
    mtime: float
    mode: str


def script_argv(script: str, *args: str) -> list[str]:
    return ["/bin/sh", "-c", script, "den-files", *args]


def _raise_for(result: ExecResult, path: str, *, want_dir: bool = False) -> None:
    """Translate a file script's exit code into Den's errors."""
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
        raise Forbidden("/workspace itself cannot be deleted")
    if code == 7:
        raise Conflict(f"directory {path} is not empty; delete with recursive=true",
                       code="not_empty")
    if "No space left" in message:
        raise DenError(f"no space left in the workspace while writing {path}", code="disk_full")
    raise ValidationFailed(f"file operation on {path} failed: {message or f'exit {code}'}")


class FileService:
    """File operations on a workspace, as ``dev``, through the workspace service's exec."""

    def __init__(self, workspaces: WorkspaceService) -> None:
        self.workspaces = workspaces

    async def _run(self, ws_id: str, actor: str, argv: list[str], *,
                   stdin: bytes | None = None) -> ExecResult:
        svc = self.workspaces
        ws = svc.get(ws_id)
        req = svc.exec_request(ws, argv, cwd=WORKSPACE_ROOT, stdin=stdin, timeout_s=300)
        # A file may be as large as file_max_bytes; one byte more shows it was cut.
        req = dataclasses.replace(req, max_output_bytes=svc.settings.file_max_bytes + 1)
        return await svc.exec(ws_id, req, actor=actor)

    async def read(self, ws_id: str, path: str, *, actor: str) -> bytes:
        target = path_in_workspace(path)
        limit = str(self.workspaces.settings.file_max_bytes)
        result = await self._run(ws_id, actor, script_argv(READ_SCRIPT, target, limit))
        _raise_for(result, target)
        return result.stdout

    async def write(self, ws_id: str, path: str, data: bytes, *, actor: str) -> int:
        target = path_in_workspace(path)
        if target == WORKSPACE_ROOT:
            raise ValidationFailed("path names /workspace itself; name a file inside it")
        if len(data) > self.workspaces.settings.file_max_bytes:
            raise PayloadTooLarge("file is larger than this server's file size limit")
        result = await self._run(ws_id, actor, script_argv(WRITE_SCRIPT, target), stdin=data)
        _raise_for(result, target)
        return len(data)

    async def list(self, ws_id: str, path: str, *, actor: str) -> list[FileEntry]:
        target = path_in_workspace(path)
        result = await self._run(ws_id, actor, script_argv(LIST_SCRIPT, target))
        _raise_for(result, target, want_dir=True)
        return parse_listing(result.stdout)

    async def delete(self, ws_id: str, path: str, *, recursive: bool, actor: str) -> None:
        target = path_in_workspace(path)
        if target == WORKSPACE_ROOT:
            raise Forbidden("/workspace itself cannot be deleted")
        result = await self._run(
            ws_id, actor, script_argv(DELETE_SCRIPT, target, "1" if recursive else "0")
        )
        _raise_for(result, target)


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
