"""File routes: read, write, list, delete, stat, mkdir, rename inside /workspace. Reads and
writes stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from server.api.deps import CurrentUser, Files, Workspaces
from server.api.schemas import FileEntryOut, FileList, FileRename, FileWritten, errors
from server.errors import PayloadTooLarge
from server.workspaces.files import FileContent, FileEntry
from server.workspaces.service import path_in_workspace

router = APIRouter(prefix="/api/v1/workspaces/{ref}/files", tags=["files"],
                   responses=errors(403, 404, 409, 413, 502, 503, 504))

_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
# A path inside /workspace, as the query parameter ``path``.
FilePath = Annotated[str, Query(max_length=4096, description="A path inside /workspace, "
                                "relative to it or absolute")]


@router.get("", response_class=StreamingResponse,
            responses={200: {"content": _BINARY, "description": "The file's bytes, streamed"}})
async def read_file(ref: str, path: FilePath, user: CurrentUser, svc: Workspaces, files: Files
                    ) -> StreamingResponse:
    ws = svc.get_for(user, ref)
    content = await files.read(ws.id, path, actor=user.name)  # errors: before the first byte
    # Once streaming, an error aborts the response (short of Content-Length: never a
    # truncated file that looks whole).
    return StreamingResponse(_body(content), media_type="application/octet-stream",
                             headers={"Content-Length": str(content.size)})


async def _body(content: FileContent) -> AsyncIterator[bytes]:
    try:
        async for chunk in content.chunks():
            yield chunk
    finally:
        await content.aclose()


@router.put("", response_model=FileWritten, openapi_extra={
    "requestBody": {"required": True, "content": _BINARY,
                    "description": "The file's new content (any bytes), streamed"}})
async def write_file(ref: str, path: FilePath, request: Request, user: CurrentUser,
                     svc: Workspaces, files: Files) -> FileWritten:
    ws = svc.get_for(user, ref)
    limit = svc.settings.file_max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"file is larger than this server's limit of {limit} bytes")
    size = await files.write(ws.id, path, request.stream(), actor=user.name)
    return FileWritten(path=path_in_workspace(path), size=size)


@router.delete("", status_code=204)
async def delete_file(ref: str, path: FilePath, user: CurrentUser, svc: Workspaces, files: Files,
                      recursive: bool = False) -> Response:
    ws = svc.get_for(user, ref)
    await files.delete(ws.id, path, recursive=recursive, actor=user.name)
    return Response(status_code=204)


@router.get("/list", response_model=FileList)
async def list_files(ref: str, user: CurrentUser, svc: Workspaces, files: Files,
                     path: FilePath = ".") -> FileList:
    ws = svc.get_for(user, ref)
    listing = await files.list(ws.id, path, actor=user.name)
    return FileList(
        path=path_in_workspace(path),
        entries=[_out(e) for e in listing.entries],
        truncated=listing.truncated,
    )


def _out(e: FileEntry) -> FileEntryOut:
    return FileEntryOut(name=e.name, type=e.type, size=e.size, mtime=e.mtime, mode=e.mode)


@router.get("/stat", response_model=FileEntryOut)
async def stat_file(ref: str, path: FilePath, user: CurrentUser, svc: Workspaces,
                    files: Files) -> FileEntryOut:
    ws = svc.get_for(user, ref)
    return _out(await files.stat(ws.id, path, actor=user.name))


@router.post("/mkdir", status_code=201, response_model=FileEntryOut,
             responses={200: {"model": FileEntryOut,
                              "description": "It was already a directory (parents=true)"}})
async def make_dir(ref: str, path: FilePath, response: Response, user: CurrentUser,
                   svc: Workspaces, files: Files, parents: bool = False) -> FileEntryOut:
    ws = svc.get_for(user, ref)
    entry, made = await files.mkdir(ws.id, path, parents=parents, actor=user.name)
    if not made:
        response.status_code = 200
    return _out(entry)


@router.post("/rename", response_model=FileEntryOut)
async def rename_file(ref: str, body: FileRename, user: CurrentUser, svc: Workspaces,
                      files: Files) -> FileEntryOut:
    ws = svc.get_for(user, ref)
    return _out(await files.rename(ws.id, body.src, body.to, actor=user.name))
