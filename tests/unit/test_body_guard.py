"""Issue 11, finding 4: bodies are read only after authentication, and never past a cap.

Against a real ``den serve`` (``tests.fake_serve``: the same server on the fake runtime) over
raw sockets, because what matters is what the HTTP server reads: each test sends a request's
headers and less than the body it announces, then waits for the answer. A server that read
the body before answering would never answer (the test fails on its socket timeout).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.api.guard import body_limit
from server.config import Settings
from tests.server_process import DenServer

MAX_BODY = 4096
WAIT_S = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DenServer]:
    base = tmp_path_factory.mktemp("guard")
    (base / "repos").mkdir()
    srv = DenServer(base / "data", base / "repos", "dentest-guard", user="alice",
                    module="tests.fake_serve", ssh_port=0, max_body_bytes=MAX_BODY)
    try:
        srv.start()
        yield srv
    finally:
        srv.close()


def _connect(srv: DenServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT_S)
    return sock


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read until the server closes the connection: status, headers, body."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _head(path: str, *extra: str) -> bytes:
    return ("\r\n".join([f"POST {path} HTTP/1.1", "Host: den", "Content-Type: application/json",
                         *extra]) + "\r\n\r\n").encode()


def test_an_unauthenticated_100_mb_post_is_refused_before_its_body(server: DenServer) -> None:
    with _connect(server) as sock:
        sock.sendall(_head("/api/v1/workspaces", "Content-Length: 104857600"))
        sock.sendall(b'{"name": "x", "padding": "' + b"a" * 1000)  # then nothing more
        status, headers, body = _response(sock)  # the server closes: it will not read more
    assert status == 401, body
    assert b'"unauthorized"' in body
    assert headers.get("connection") == "close"


def test_a_chunked_post_without_a_token_is_refused_before_its_body(server: DenServer) -> None:
    with _connect(server) as sock:
        sock.sendall(_head("/api/v1/workspaces/x/exec", "Transfer-Encoding: chunked",
                           "Authorization: Bearer den_not-a-token"))
        sock.sendall(b"10\r\n" + b"a" * 16 + b"\r\n")
        status, headers, body = _response(sock)
    assert status == 401, body
    assert headers.get("connection") == "close"


def test_a_declared_length_over_the_cap_is_413_before_the_body(server: DenServer) -> None:
    with _connect(server) as sock:
        sock.sendall(_head("/api/v1/workspaces", f"Content-Length: {MAX_BODY + 1}",
                           f"Authorization: Bearer {server.token}"))
        status, headers, body = _response(sock)
    assert status == 413, body
    assert b'"too_large"' in body
    assert headers.get("connection") == "close"


def test_a_chunked_body_is_cut_at_the_cap(server: DenServer) -> None:
    with _connect(server) as sock:
        sock.sendall(_head("/api/v1/workspaces", "Transfer-Encoding: chunked",
                           f"Authorization: Bearer {server.token}"))
        chunk = b"a" * 1024
        for _ in range(MAX_BODY // len(chunk) + 1):  # past the cap, and never a last chunk
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        status, _, body = _response(sock)
    assert status == 413, body
    assert b'"too_large"' in body


def test_a_body_under_the_cap_passes(server: DenServer) -> None:
    r = server.http.post("/api/v1/workspaces", json={"name": "nothing", "repo": {"url": "-x"}})
    assert r.status_code == 422, r.text  # read and judged by the route
    assert r.json()["error"]["code"] == "invalid"


def test_the_exec_stdin_is_bounded_by_the_cap(server: DenServer) -> None:
    r = server.http.post("/api/v1/workspaces/x/exec",
                         json={"cmd": "cat", "stdin": "a" * (MAX_BODY + 1)})
    assert r.status_code == 413, r.text


def test_the_file_upload_has_the_file_cap(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_body_bytes=2048, file_max_bytes=10_000)
    assert body_limit("PUT", "/api/v1/workspaces/api/files", settings) == 10_000
    assert body_limit("POST", "/api/v1/workspaces/api/files", settings) == 2048
    assert body_limit("POST", "/api/v1/workspaces/api/exec", settings) == 2048
    assert body_limit("POST", "/login", settings) == 2048
