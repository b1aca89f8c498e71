"""A bound on a request's head (request line and headers) before Den sees the request.

uvicorn's httptools protocol keeps every byte of a head until the head is complete, with no
limit on headers: one unauthenticated connection sending an endless header grew ``den
serve`` by hundreds of megabytes (measured: 400 MB after 300 MB sent). This protocol counts
what arrives while a head is incomplete and answers ``431`` in Den's error shape, closing the
connection, once it passes ``MAX_HEAD_BYTES``. Bodies are bounded elsewhere
(server/api/guard.py).
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Well above what a browser sends (cookies included) and above the 64 KiB request line that
# httptools allows; far below what would hurt the server.
MAX_HEAD_BYTES = 256 * 1024


def _refusal() -> bytes:
    body = json.dumps({"error": {
        "code": "headers_too_large",
        "message": f"the request line and headers exceed {MAX_HEAD_BYTES // 1024} KiB"}}
    ).encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with ``MAX_HEAD_BYTES`` on each request's head."""

    _head_bytes = 0
    _in_body = False

    def data_received(self, data: bytes) -> None:
        if not self._in_body:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.logger.warning("request head over %d bytes from %s: refused with 431",
                                    MAX_HEAD_BYTES, self.client)
                if not self.transport.is_closing():
                    self.transport.write(_refusal())
                    self.transport.close()
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_body = True
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()
