"""A command's stdout spooled to a file on the host, not held in memory (issue 11, finding 6).

A pull request's bundle may be ``DEN_FORGE_MAX_PUSH_MB`` (256 MiB); collected by a one-shot
exec it was held in the server's memory, for every pull request at once. Here the command
runs as a streaming exec and its stdout goes to ``dest`` as it arrives, a chunk at a time
(the stream pulls: a slow disk slows the command, it does not grow Den). stderr is kept, cut
at ``STDERR_MAX`` bytes. The command counts as one of the server's long calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from server.runtime.base import ExecRequest
from server.workspaces.service import WorkspaceService

STDERR_MAX = 64 * 1024


@dataclass(frozen=True)
class Spooled:
    exit_code: int
    size: int  # bytes written to the file
    stderr: bytes
    too_large: bool = False  # stdout passed the limit: the command was killed
    timed_out: bool = False


async def spool_stdout(svc: WorkspaceService, ws_id: str, req: ExecRequest, *, dest: Path,
                       limit: int, timeout_s: float, actor: str) -> Spooled:
    """Run ``req`` in the workspace with its stdout written to ``dest`` (mode 0600), at most
    ``limit`` bytes; past that, or past ``timeout_s``, the command is killed."""
    async with svc.long_calls.enter():
        stream = await svc.exec_stream(ws_id, req, actor=actor)
        size, err = 0, bytearray()
        too_large = timed_out = False
        try:
            with dest.open("xb") as out:
                dest.chmod(0o600)
                try:
                    async with asyncio.timeout(timeout_s):
                        async for chunk in stream.output():
                            if chunk.stream == "stderr":
                                err += chunk.data[:max(0, STDERR_MAX - len(err))]
                                continue
                            size += len(chunk.data)
                            if size > limit:
                                too_large = True
                                break
                            await asyncio.to_thread(_write, out, chunk.data)
                        code = -1 if too_large else await stream.wait()
                except TimeoutError:
                    timed_out, code = True, -1
        finally:
            with contextlib.suppress(Exception):
                await stream.kill()  # only closes the stream of a command that has exited
        svc.touch(ws_id)
        return Spooled(code, size, bytes(err), too_large=too_large, timed_out=timed_out)


def _write(out: BinaryIO, data: bytes) -> None:
    out.write(data)
