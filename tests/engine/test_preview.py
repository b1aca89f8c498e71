"""Preview URLs on the real engine, through a real ``den serve``: ``python3 -m http.server``
inside a gVisor workspace, reached by the path form through the agent's ``connect``. One
workspace for the whole module (making one costs more than all the checks)."""

from __future__ import annotations

import hashlib
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from server.client import Den
from server.client.api import Workspace
from tests.conftest import RUN_PREFIX
from tests.preview_app import APP
from tests.server_process import DenServer

pytestmark = pytest.mark.engine

BIG_MB = 20


@dataclass
class Preview:
    srv: DenServer
    ws: Workspace
    bob: str  # another user's token
    metrics_token: str

    def url(self, path: str = "/", port: int = 8000) -> str:
        return f"/preview/{self.ws.id}/{port}{path}"

    def get(self, path: str = "/", *, token: str | None = None, port: int = 8000
            ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(base_url=f"http://127.0.0.1:{self.srv.port}", timeout=120) as c:
            return c.get(self.url(path, port), headers=headers)


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def preview(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Preview]:
    root = tmp_path_factory.mktemp("preview")
    repos = root / "repos"
    src = root / "src"
    repos.mkdir()
    src.mkdir()
    (src / "index.html").write_text("<h1>served from the workspace</h1>\n")
    (src / "app.py").write_text(APP)
    _git("init", "-q", "-b", "main", cwd=src)
    _git("add", "-A", cwd=src)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "i", cwd=src)
    _git("clone", "-q", "--bare", str(src), str(repos / "site.git"), cwd=root)
    srv = DenServer(root / "data", repos, f"{RUN_PREFIX}-preview", user="alice", ssh_port=0,
                    reaper_interval_s=0, preview_public_sharing="true",
                    metrics_token=(metrics_token := secrets.token_hex(16)))
    bob = srv._cli("admin", "token", "--user", "bob")
    srv.start()
    try:
        with Den(f"http://127.0.0.1:{srv.port}", srv.token) as den:
            ws = den.create(str(repos / "site.git"), name="site").wait_for("running")
            ws.exec(f"head -c {BIG_MB}M /dev/urandom > big.bin").check()
            ws.processes.start("exec python3 -m http.server 8000 --bind 127.0.0.1")
            ws.processes.start("exec python3 app.py 9000")
            deadline = time.monotonic() + 60
            while {8000, 9000} - {p["port"] for p in ws.ports() if p["listening"]}:
                assert time.monotonic() < deadline, "the servers did not start listening"
                time.sleep(0.2)
            yield Preview(srv, ws, bob, metrics_token)
    finally:
        for w in srv.http.get("/api/v1/workspaces").json().get("workspaces", []):
            srv.http.delete(f"/api/v1/workspaces/{w['id']}")
        srv.close()


def test_a_page_and_a_download_through_the_path_form(preview: Preview) -> None:
    r = preview.get("/", token=preview.srv.token)
    assert r.status_code == 200, r.text
    assert r.text == "<h1>served from the workspace</h1>\n"
    r = preview.get("/", token=preview.srv.token)  # by name, as its owner
    with httpx.Client(base_url=f"http://127.0.0.1:{preview.srv.port}", timeout=120) as c:
        assert c.get("/preview/site/8000/index.html", headers={
            "Authorization": f"Bearer {preview.srv.token}"}).status_code == 200
        digest = hashlib.sha256()
        size = 0
        with c.stream("GET", preview.url("/big.bin"),
                      headers={"Authorization": f"Bearer {preview.srv.token}"}) as r:
            assert r.status_code == 200
            for chunk in r.iter_bytes():
                digest.update(chunk)
                size += len(chunk)
    inside = preview.ws.exec("sha256sum big.bin").check().stdout.split()[0]
    assert size == BIG_MB << 20
    assert digest.hexdigest() == inside


def test_server_sent_events_stream_and_a_websocket_echoes(preview: Preview) -> None:
    auth = {"Authorization": f"Bearer {preview.srv.token}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{preview.srv.port}", timeout=60) as c, \
            c.stream("GET", preview.url("/events", 9000), headers=auth) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        lines = r.iter_lines()
        # the first event arrives while the app still holds the stream open: not buffered
        assert next(lines) == "data: tick 0"
        preview.ws.exec("touch /tmp/go").check()
        assert [line for line in lines if line] == ["data: tick 1", "data: tick 2"]
    url = f"ws://127.0.0.1:{preview.srv.port}{preview.url('/ws', 9000)}"
    with ws_connect(url, additional_headers=auth, max_size=None) as ws:
        ws.send("hello")
        assert ws.recv(timeout=30) == "hello"
        blob = bytes(range(256)) * 1000
        ws.send(blob)
        assert ws.recv(timeout=30) == blob
    with pytest.raises(InvalidStatus):  # another user: refused before any upgrade
        ws_connect(url, additional_headers={"Authorization": f"Bearer {preview.bob}"})


def port_connections(preview: Preview) -> dict[str, float]:
    """den_port_connections by path, from /metrics."""
    text = preview.srv.http.get("/metrics", headers={
        "Authorization": f"Bearer {preview.metrics_token}"}).text
    return {m[1]: float(m[2]) for m in
            re.finditer(r'^den_port_connections_total\{path="(\w+)"\} (\S+)$', text, re.M)}


def test_previews_go_over_the_direct_path(preview: Preview) -> None:
    """Each connection into the workspace goes to the agent's listener on the workspace's
    address (server/agent/direct.py), not through the agent session's framed connect."""
    before = port_connections(preview)
    url = f"ws://127.0.0.1:{preview.srv.port}{preview.url('/ws', 9000)}"
    for _ in range(2):  # a WebSocket always has a connection of its own
        with ws_connect(url, additional_headers={
                "Authorization": f"Bearer {preview.srv.token}"}) as ws:
            ws.send("direct?")
            assert ws.recv(timeout=30) == "direct?"
    after = port_connections(preview)
    assert after.get("direct", 0) - before.get("direct", 0) == 2, (before, after)
    assert after.get("relay", 0) == before.get("relay", 0), (before, after)


def test_another_user_and_nobody_are_refused_and_a_closed_port_is_a_502(
        preview: Preview) -> None:
    assert preview.get("/", token=preview.bob).status_code == 404
    assert preview.get("/").status_code == 401
    r = preview.get("/", token=preview.srv.token, port=8999)
    assert r.status_code == 502 and "8999" in r.json()["error"]["message"]


def test_a_public_share_works_without_signing_in_until_set_private(preview: Preview) -> None:
    preview.ws.share_port(8000, "public")
    try:
        r = preview.get("/")
        assert r.status_code == 200 and "served from the workspace" in r.text
    finally:
        preview.ws.share_port(8000, "private")
    assert preview.get("/").status_code == 401
    kinds = [e["message"] for e in preview.ws.events() if e["kind"] == "share"]
    assert kinds[-2:] == ["port 8000: share private -> public (public: anyone with its URL "
                          "can open it, without signing in)", "port 8000: share public -> private"]


def test_a_paused_workspace_wakes_when_its_preview_is_opened(preview: Preview) -> None:
    preview.ws.pause()
    assert preview.ws.refresh().state == "paused"
    before = port_connections(preview)
    r = preview.get("/", token=preview.srv.token)
    assert r.status_code == 200 and "served from the workspace" in r.text
    assert preview.ws.refresh().state == "running"
    # The restored sandbox's listener answers, with the new session's secret: still direct.
    after = port_connections(preview)
    assert after.get("direct", 0) > before.get("direct", 0), (before, after)
    assert after.get("relay", 0) == before.get("relay", 0), (before, after)
