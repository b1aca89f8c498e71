"""The one-shot exec's answer, encoded as it is sent (issue 11, finding 6).

An exec's stdout and stderr are up to ``DEN_EXEC_MAX_OUTPUT_BYTES`` (16 MiB) each. Built as
a model and then a JSON document, they were held three and four times over (the bytes, the
decoded text, the JSON text, its encoding) for every call at once. Here only the runtime's
bytes are held: the JSON body is produced from them a slice at a time (decoded
incrementally, so a character split between slices arrives whole), the same document
``ExecOut`` describes.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from server.runtime.base import ExecResult

SLICE = 64 * 1024


def _text(data: bytes) -> AsyncIterator[bytes]:
    """``data`` decoded as UTF-8 (bad bytes replaced), as the inside of a JSON string."""
    async def gen() -> AsyncIterator[bytes]:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        view = memoryview(data)
        for start in range(0, len(view), SLICE):
            text = decoder.decode(view[start:start + SLICE])
            if text:
                yield json.dumps(text, ensure_ascii=False)[1:-1].encode()
        if tail := decoder.decode(b"", final=True):
            yield json.dumps(tail, ensure_ascii=False)[1:-1].encode()
    return gen()


async def exec_document(result: ExecResult) -> AsyncIterator[bytes]:
    """The JSON of ``ExecOut`` for ``result``, in slices."""
    yield b'{"exit_code":%d,"stdout":"' % result.exit_code
    async for piece in _text(result.stdout):
        yield piece
    yield b'","stderr":"'
    async for piece in _text(result.stderr):
        yield piece
    tail = {"timed_out": result.timed_out, "duration_ms": result.duration_ms,
            "truncated": result.truncated}
    yield b'",' + json.dumps(tail, separators=(",", ":"))[1:].encode()


def exec_response(result: ExecResult) -> StreamingResponse:
    return StreamingResponse(exec_document(result), media_type="application/json")
