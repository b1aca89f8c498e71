"""The one-shot exec's answer, encoded as it is sent (issue 11, finding 6).

An exec's stdout and stderr are up to ``DEN_EXEC_MAX_OUTPUT_BYTES`` (16 MiB) each. Built as
a model and then a JSON document, they were held three and four times over (the bytes, the
decoded text, the JSON text, its encoding) for every call at once. Here the JSON body is
produced a slice at a time from the runtime's captured output (in memory when small, else
in its spool file: ``server/runtime/output.py``), decoded incrementally so that a character
split between slices arrives whole: the same document ``ExecOut`` describes. The spool files
are removed when the answer has been sent, or when sending it fails or is cancelled (the
client went away).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.runtime.base import ExecRequest, ExecResult
from server.runtime.output import Captured

SLICE = 64 * 1024


def spooled(req: ExecRequest, data_dir: Path) -> ExecRequest:
    """``req`` with its output past 256 KiB per stream spooled under ``data_dir``'s tmp
    (removed at startup with whatever a previous run left there)."""
    return dataclasses.replace(req, spool_dir=data_dir / "tmp" / "exec")


async def _text(data: Captured) -> AsyncIterator[bytes]:
    """``data`` decoded as UTF-8 (bad bytes replaced), as the inside of a JSON string."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    async for chunk in data.chunks():
        view = memoryview(chunk)
        for start in range(0, len(view), SLICE):
            text = decoder.decode(view[start:start + SLICE])
            if text:
                yield json.dumps(text, ensure_ascii=False)[1:-1].encode()
    if tail := decoder.decode(b"", final=True):
        yield json.dumps(tail, ensure_ascii=False)[1:-1].encode()


async def exec_document(result: ExecResult) -> AsyncIterator[bytes]:
    """The JSON of ``ExecOut`` for ``result``, in slices."""
    yield b'{"exit_code":%d,"stdout":"' % result.exit_code
    async for piece in _text(result.out):
        yield piece
    yield b'","stderr":"'
    async for piece in _text(result.err):
        yield piece
    tail = {"timed_out": result.timed_out, "duration_ms": result.duration_ms,
            "truncated": result.truncated}
    yield b'",' + json.dumps(tail, separators=(",", ":"))[1:].encode()


class ExecResponse(StreamingResponse):
    """The answer to one exec; its output's spool files go when the answer is done with."""

    def __init__(self, result: ExecResult) -> None:
        super().__init__(exec_document(result), media_type="application/json")
        self._result = result

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._result.close()


def exec_response(result: ExecResult) -> StreamingResponse:
    return ExecResponse(result)
