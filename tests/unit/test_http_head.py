"""A request's head is bounded before Den sees the request (uvicorn's httptools protocol keeps
an endless header in memory): the real server process answers 431 in Den's error shape and
closes the connection, while a large but sane head is served."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from server.http_head import MAX_HEAD_BYTES
from tests.server_process import DenServer


def _send_head(port: int, header_bytes: int) -> bytes:
    """GET /healthz with one header of ``header_bytes``; what the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * 65536
        sent = 0
        try:
            while sent < header_bytes:
                s.sendall(chunk[:header_bytes - sent])
                sent += min(len(chunk), header_bytes - sent)
            s.sendall(b"\r\nConnection: close\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-way: the answer is already there
        answer = b""
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
        return answer


def test_an_endless_header_is_refused_and_a_large_one_is_served(
        tmp_path: Path, repos_root: Path) -> None:
    srv = DenServer(tmp_path / "data", repos_root, "dentest-head", user="alice",
                    module="tests.fake_serve", ssh_port=0)
    srv.start()
    try:
        ok = _send_head(srv.port, MAX_HEAD_BYTES // 2)
        assert ok.startswith(b"HTTP/1.1 200 "), ok[:200]
        # 64 MiB of header: refused once the bound is passed, not read to the end.
        big = _send_head(srv.port, 64 * 2**20)
        head, _, body = big.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 "), big[:200]
        assert json.loads(body)["error"]["code"] == "headers_too_large"
        # The server is fine afterwards.
        assert srv.http.get("/healthz").status_code == 200
    finally:
        srv.stop()
