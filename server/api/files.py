"""File routes: read, write, list, delete inside /workspace."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.api.deps import CurrentUser, Files, Workspaces
from server.api.schemas import FileEntryOut, FileList, FileWritten
from server.errors import PayloadTooLarge
from server.workspaces.service import path_in_workspace

router = APIRouter(prefix="/api/v1/workspaces/{ref}/files", tags=["files"])


@router.get("", response_class=Response)
async def read_file(ref: str, path: str, user: CurrentUser, svc: Workspaces, files: Files
                    ) -> Response:
    ws = svc.get_for(user, ref)
    data = await files.read(ws.id, path, actor=user.name)
    return Response(content=data, media_type="application/octet-stream")


@router.put("", response_model=FileWritten)
async def write_file(ref: str, path: str, request: Request, user: CurrentUser,
                     svc: Workspaces, files: Files) -> FileWritten:
    ws = svc.get_for(user, ref)
    limit = svc.settings.file_max_bytes
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"file is larger than this server's limit of {limit} bytes")
    size = await files.write(ws.id, path, bytes(body), actor=user.name)
    return FileWritten(path=path_in_workspace(path), size=size)


@router.delete("", status_code=204)
async def delete_file(ref: str, path: str, user: CurrentUser, svc: Workspaces, files: Files,
                      recursive: bool = False) -> Response:
    ws = svc.get_for(user, ref)
    await files.delete(ws.id, path, recursive=recursive, actor=user.name)
    return Response(status_code=204)


@router.get("/list", response_model=FileList)
async def list_files(ref: str, user: CurrentUser, svc: Workspaces, files: Files,
                     path: str = ".") -> FileList:
    ws = svc.get_for(user, ref)
    entries = await files.list(ws.id, path, actor=user.name)
    return FileList(
        path=path_in_workspace(path),
        entries=[FileEntryOut(name=e.name, type=e.type, size=e.size, mtime=e.mtime,
                              mode=e.mode) for e in entries],
    )
