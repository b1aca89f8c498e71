"""Cloning over the network: git's smart HTTP protocol from a real server on loopback."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from tests.conftest import ApiClient, users
from tests.forge_server import http_backend

pytestmark = pytest.mark.engine


def _git_http_server(root: Path) -> ThreadingHTTPServer:
    """``git http-backend`` (git's own smart HTTP CGI) behind a small HTTP server."""

    class Handler(BaseHTTPRequestHandler):
        def _cgi(self) -> None:
            path, _, query = self.path.partition("?")
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "GIT_PROJECT_ROOT": str(root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "REQUEST_METHOD": self.command,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(length),
                "REMOTE_ADDR": "127.0.0.1",
            }
            status, payload, headers = http_backend(body, env)
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _cgi

        def log_message(self, *args: object) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


@pytest.fixture
def http_api(engine: None, make_settings: Callable[..., Settings]) -> Iterator[ApiClient]:
    app = create_app(make_settings(allowed_git_schemes=["http", "https"], local_repo_roots=[]))
    with TestClient(app) as client:
        api = ApiClient(client, users(app))
        yield api
        for ws in api.get("/api/v1/workspaces").json()["workspaces"]:
            api.delete(f"/api/v1/workspaces/{ws['id']}")


def test_clone_over_smart_http(http_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    repo = make_repo("web", {"index.html": "<h1>hi</h1>\n"}, branch="trunk")
    server = _git_http_server(repo.parent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/web.git"
        ws = http_api.create(url, name="web")
        assert ws["state"] == "running", ws
        assert ws["repo"] == {"url": url, "branch": "trunk", "path": "/workspace/web"}
        out = http_api.exec(ws["id"], "cat index.html; git remote get-url origin")
        assert out["stdout"] == f"<h1>hi</h1>\n{url}\n"
        # Local paths stay refused on this server: no roots are configured.
        r = http_api.post("/api/v1/workspaces", json={"name": "x", "repo": {"url": str(repo)}})
        assert r.status_code == 422 and "local repositories are disabled" in r.text
    finally:
        server.shutdown()
