"""Preview URLs on the fake runtime: the proxy against a real HTTP and WebSocket server on the
test machine (the fake's ``connect`` dials it), access, share levels and links, the API."""

from __future__ import annotations

import hashlib
import html
import json
import re
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from starlette.websockets import WebSocketDisconnect
from websockets.sync.server import ServerConnection, serve

from server.app import create_app
from server.auth import tokens as auth_tokens
from server.config import Settings
from server.db.models import User, Workspace
from server.preview import tokens
from server.runtime.fake import FakeRuntime
from tests.conftest import ApiClient, users
from tests.unit.test_api_fake import assert_error
from tests.web.test_web_fake import csrf_of, login

BIG = bytes(range(256)) * 4096 * 3  # 3 MiB


class _App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    entered = threading.Event()
    release = threading.Event()

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/":
            self._send(200, b"<h1>hello from the app</h1>", {"Content-Type": "text/html"})
        elif self.path.startswith("/headers"):
            seen = {"path": self.path, "headers": [[k.lower(), v] for k, v in self.headers.items()]}
            self._send(200, json.dumps(seen).encode(), {"Content-Type": "application/json"})
        elif self.path == "/big":
            self._send(200, BIG, {"Content-Type": "application/octet-stream"})
        elif self.path == "/redirect":
            self._send(302, b"", {"Location": "/there", "Set-Cookie": "app=1; Path=/"})
        elif self.path == "/evil-cookie":
            self._send(200, b"x", {"Set-Cookie": "den_session=forged; Path=/"})
        elif self.path == "/events":  # chunked, like a server-sent event stream
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                data = f"data: {i}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/hold":
            type(self).entered.set()
            type(self).release.wait(30)
            self._send(200, b"released")
        elif self.path == "/then-close":  # keep-alive offered, then closed anyway
            self._send(200, b"bye")
            self.close_connection = True
        elif self.path == "/close-delimited":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until the end")
            self.close_connection = True
        else:
            self._send(404, b"no")

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = bytearray()
            while (size := int(self.rfile.readline().strip(), 16)) > 0:
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = bytearray(self.rfile.read(n))
        self._send(200, hashlib.sha256(body).hexdigest().encode())


@pytest.fixture(scope="module")
def app_server() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _App)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    _App.release.set()
    httpd.shutdown()


def _echo(conn: ServerConnection) -> None:
    for message in conn:
        conn.send(message)


@pytest.fixture(scope="module")
def ws_server() -> Iterator[int]:
    with serve(_echo, "127.0.0.1", 0, subprotocols=["chat"]) as server:  # type: ignore[list-item]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield server.socket.getsockname()[1]
        server.shutdown()


class _Hostile(socketserver.BaseRequestHandler):
    """Reads the request head, then answers with what ``ANSWERS[port]`` says."""

    ANSWERS: dict[int, bytes] = {}

    def handle(self) -> None:
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            more = self.request.recv(4096)
            if not more:
                return
            data += more
        port = int(self.server.server_address[1])  # type: ignore[index]
        self.request.sendall(self.ANSWERS[port])


@pytest.fixture(scope="module")
def hostile() -> Iterator[dict[str, int]]:
    """Apps that answer garbage, or a response head larger than Den takes (64 KiB)."""
    servers = {}
    for name, answer in (("garbage", b"SSH-2.0-OpenSSH\r\n\x00\x01\x02\r\n\r\n"),
                         ("huge_head", b"HTTP/1.1 200 OK\r\n"
                                       + b"X-Big: " + b"a" * 200_000 + b"\r\n\r\n")):
        srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Hostile)
        srv.daemon_threads = True
        _Hostile.ANSWERS[srv.server_address[1]] = answer
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers[name] = srv
    yield {name: srv.server_address[1] for name, srv in servers.items()}
    for srv in servers.values():
        srv.shutdown()


@pytest.fixture
def den(make_settings: Callable[..., Settings], app_server: int, ws_server: int,
        hostile: dict[str, int], tmp_path: Path) -> Iterator[Callable[..., ApiClient]]:
    clients: list[TestClient] = []

    def start(**overrides: Any) -> ApiClient:
        runtime = FakeRuntime()
        runtime.listening = {8000: ("127.0.0.1", app_server), 8001: ("127.0.0.1", ws_server),
                             8002: ("127.0.0.1", hostile["garbage"]),
                             8003: ("127.0.0.1", hostile["huge_head"])}
        overrides.setdefault("data_dir", tmp_path / f"den{len(clients)}")
        app = create_app(make_settings(**overrides), runtime=runtime)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return ApiClient(client, users(app))

    yield start
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def api(den: Callable[..., ApiClient], make_repo: Callable[..., Path]) -> ApiClient:
    a = den(preview_public_sharing=True)
    a.ws = a.create(make_repo("api"), name="api")  # type: ignore[attr-defined]
    return a


def wsid(api: ApiClient) -> str:
    return api.ws["id"]  # type: ignore[attr-defined, no-any-return]


# --- the proxy -------------------------------------------------------------------------------


def test_the_owner_opens_a_page_by_workspace_name_and_id(api: ApiClient) -> None:
    for ref in ("api", wsid(api)):
        r = api.client.get(f"/preview/{ref}/8000/", headers=api.h())
        assert r.status_code == 200, r.text
        assert r.text == "<h1>hello from the app</h1>"
    r = api.client.get("/preview/api/8000", headers=api.h(), follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/preview/api/8000/"


def test_forwarded_headers_host_and_den_credentials(api: ApiClient) -> None:
    r = api.client.get("/preview/api/8000/headers?a=1&b=%2F", headers={
        **api.h(), "Cookie": "den_session=x; app=1", "X-Forwarded-For": "6.6.6.6",
        "Connection": "keep-alive, X-Hop", "X-Hop": "1"})
    assert r.status_code == 200, r.text
    seen = r.json()
    got = dict((k, v) for k, v in seen["headers"])
    assert seen["path"] == "/headers?a=1&b=%2F"  # the prefix is gone, the query as sent
    assert got["host"] == "testserver"
    assert got["x-forwarded-for"] == "testclient"
    assert got["x-forwarded-proto"] == "http" and got["x-forwarded-host"] == "testserver"
    assert got["x-forwarded-prefix"] == "/preview/api/8000"
    assert got["forwarded"] == 'for=testclient;proto=http;host="testserver"'
    assert got["cookie"] == "app=1"
    assert "authorization" not in got and "x-hop" not in got


def test_bodies_stream_both_ways(api: ApiClient) -> None:
    r = api.client.get("/preview/api/8000/big", headers=api.h())
    assert r.status_code == 200 and r.content == BIG
    r = api.client.post("/preview/api/8000/upload", headers=api.h(), content=BIG)
    assert r.text == hashlib.sha256(BIG).hexdigest()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(BIG), 100_000):
            yield BIG[i:i + 100_000]

    r = api.client.post("/preview/api/8000/upload", headers=api.h(), content=chunks())
    assert r.text == hashlib.sha256(BIG).hexdigest()  # chunked from the browser as well


def test_streaming_redirects_and_close_delimited_responses(api: ApiClient) -> None:
    r = api.client.get("/preview/api/8000/events", headers=api.h())
    assert r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert r.headers["content-type"] == "text/event-stream"
    r = api.client.get("/preview/api/8000/redirect", headers=api.h(), follow_redirects=False)
    assert r.status_code == 302
    assert r.headers["location"] == "/preview/api/8000/there"  # kept under the prefix
    assert r.headers["set-cookie"] == "app=1; Path=/preview/api/8000/"
    r = api.client.get("/preview/api/8000/close-delimited", headers=api.h())
    assert r.text == "until the end"
    r = api.client.get("/preview/api/8000/evil-cookie", headers=api.h())
    assert r.status_code == 200 and "den_session" not in r.headers.get("set-cookie", "")


def test_websocket_echo_with_subprotocol(api: ApiClient) -> None:
    with api.client.websocket_connect("/preview/api/8001/", headers=api.h(),
                                      subprotocols=["chat"]) as ws:
        assert ws.accepted_subprotocol == "chat"
        ws.send_text("hello")
        assert ws.receive_text() == "hello"
        ws.send_bytes(b"\x00\x01" * 50_000)
        assert ws.receive_bytes() == b"\x00\x01" * 50_000


def test_a_port_where_nothing_listens_is_a_502_naming_it(api: ApiClient) -> None:
    r = api.client.get("/preview/api/9999/", headers={**api.h(), "Accept": "text/html"})
    assert r.status_code == 502 and "9999" in r.text
    err = assert_error(api.client.get("/preview/api/9999/", headers=api.h()), 502, "port_closed")
    assert "port 9999" in err["message"]
    r = api.client.get("/preview/api/8001/", headers=api.h())  # not HTTP: the WebSocket server
    assert r.status_code in (400, 426, 502), r.text  # the app's own refusal, or Den's 502


def test_an_app_that_does_not_speak_http_or_floods_its_head_is_a_502(api: ApiClient) -> None:
    for port in (8002, 8003):
        err = assert_error(api.client.get(f"/preview/api/{port}/", headers=api.h()), 502,
                           "bad_gateway")
        assert f"port {port}" in err["message"]


def test_bad_ports_and_other_users_are_404_alike(api: ApiClient) -> None:
    for path in ("/preview/api/0/", "/preview/api/65536/", "/preview/api/http/",
                 "/preview/nope/8000/", "/preview/api/-1/", "/preview/api/"):
        assert_error(api.client.get(path, headers=api.h()), 404, "not_found")
    nope = api.client.get("/preview/wsffffffffffff/8000/", headers=api.h("bob"))
    theirs = api.client.get(f"/preview/{wsid(api)}/8000/", headers=api.h("bob"))
    assert nope.status_code == theirs.status_code == 404
    assert nope.json() == theirs.json()
    assert api.client.get("/preview/api/8000/", headers=api.h("bob")).status_code == 404
    assert api.client.get(f"/preview/{wsid(api)}/8000/", headers=api.h("root")).status_code \
        == 200  # an admin


def test_anonymous_is_sent_to_sign_in_without_learning_anything(api: ApiClient) -> None:
    html = {"Accept": "text/html"}
    for ref in (wsid(api), "wsffffffffffff"):
        r = api.client.get(f"/preview/{ref}/8000/x?y=1", headers=html, follow_redirects=False)
        assert r.status_code == 303
        assert r.headers["location"] == f"/login?next=%2Fpreview%2F{ref}%2F8000%2Fx%3Fy%3D1"
        assert_error(api.client.get(f"/preview/{ref}/8000/"), 401, "unauthorized")


def test_signed_in_browser_uses_den_session_on_the_path_form(api: ApiClient) -> None:
    login(api.client, api.tokens["alice"])
    r = api.client.get("/preview/api/8000/headers")
    assert r.status_code == 200
    assert "den_session" not in json.dumps(r.json())  # Den's cookie never reaches the app
    api.client.cookies.clear()


def test_share_levels(api: ApiClient) -> None:
    url = f"/preview/{wsid(api)}/8000/"
    ports = "/api/v1/workspaces/api/ports"
    assert api.client.get(url, headers=api.h("bob")).status_code == 404
    r = api.put(f"{ports}/8000", json={"share": "users"})
    assert r.status_code == 200, r.text
    assert r.json()["share"] == "users"
    assert api.client.get(url, headers=api.h("bob")).status_code == 200
    assert api.client.get(url).status_code == 401
    api.put(f"{ports}/8000", json={"share": "public"})
    assert api.client.get(url).status_code == 200  # no sign-in at all
    with pytest.raises(WebSocketDisconnect) as refused:  # port 8001 is still private
        api.client.websocket_connect(f"/preview/{wsid(api)}/8001/").__enter__()
    assert refused.value.code == 1008
    api.put(f"{ports}/8000", json={"share": "private"})
    assert api.client.get(url).status_code == 401
    assert api.client.get(url, headers=api.h("bob")).status_code == 404
    log = [e["message"] for e in api.get("/api/v1/workspaces/api/events").json()["events"]
           if e["kind"] == "share"]
    assert log == ["port 8000: share private -> users",
                   "port 8000: share users -> public (public: anyone with its URL can open it, "
                   "without signing in)",
                   "port 8000: share public -> private"]


def test_share_level_input(api: ApiClient, den: Callable[..., ApiClient],
                           make_repo: Callable[..., Path]) -> None:
    # (a second server, with its own data directory, shares the repos)
    ports = "/api/v1/workspaces/api/ports"
    for port in ("0", "65536", "abc", "-1", "1.5"):
        assert_error(api.put(f"{ports}/{port}", json={"share": "users"}), 404, "not_found")
    bodies: list[Any] = [{"share": "everyone"}, {}, {"share": None}, {"share": "users", "x": 1},
                         []]
    for body in bodies:
        assert_error(api.put(f"{ports}/8000", json=body), 422, "invalid")
    assert_error(api.put(f"{ports}/8000", user="bob", json={"share": "users"}), 404)
    assert_error(api.get(ports, user="bob"), 404)
    closed = den()  # public sharing off (the default)
    closed.create(make_repo("api2"), name="api")
    r = closed.put(f"{ports}/8000", json={"share": "public"})
    assert_error(r, 403, "public_sharing_off")


def test_port_list(api: ApiClient) -> None:
    api.put("/api/v1/workspaces/api/ports/5173", json={"share": "users"})
    r = api.get("/api/v1/workspaces/api/ports")
    assert r.status_code == 200, r.text
    got = {p["port"]: p for p in r.json()["ports"]}
    assert set(got) == {5173, 8000, 8001, 8002, 8003}
    assert got[8000] == {"port": 8000, "listening": True, "share": "private", "url": None,
                         "path_url": f"http://testserver/preview/{wsid(api)}/8000/", "label": ""}
    assert got[5173]["listening"] is False and got[5173]["share"] == "users"
    api.post("/api/v1/workspaces/api/stop")
    stopped = {p["port"]: p for p in api.get("/api/v1/workspaces/api/ports").json()["ports"]}
    assert stopped == {5173: {**got[5173], "listening": None}}  # not woken to find out


def test_changing_a_share_level_answers_the_ports_label(api: ApiClient) -> None:
    from server.db.models import PreviewPort

    with api.client.app.state.sessions.begin() as s:  # type: ignore[attr-defined]
        s.add(PreviewPort(workspace_id=wsid(api), port=5173, share="private", label="web"))
    r = api.put("/api/v1/workspaces/api/ports/5173", json={"share": "users"})
    assert r.status_code == 200, r.text
    listed = {p["port"]: p for p in api.get("/api/v1/workspaces/api/ports").json()["ports"]}
    assert r.json() == {**listed[5173], "listening": None}
    assert r.json()["label"] == "web" and r.json()["share"] == "users"


def test_a_paused_workspace_wakes_on_a_preview_request(api: ApiClient) -> None:
    assert api.post("/api/v1/workspaces/api/pause").json()["state"] == "paused"
    r = api.client.get("/preview/api/8000/", headers=api.h())
    assert r.status_code == 200
    assert api.get("/api/v1/workspaces/api").json()["state"] == "running"
    events = api.get("/api/v1/workspaces/api/events").json()["events"]
    assert any(e["kind"] == "wake" and e["actor"] == "alice" for e in events)


def test_preview_traffic_is_activity(api: ApiClient) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from server.db.models import Workspace as Row

    sessions = api.client.app.state.sessions  # type: ignore[attr-defined]
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    with sessions.begin() as s:
        s.execute(update(Row).where(Row.id == wsid(api)).values(last_activity_at=long_ago))
    before = api.get("/api/v1/workspaces/api").json()["last_activity_at"]
    assert api.client.get("/preview/api/8000/", headers=api.h()).status_code == 200
    after = api.get("/api/v1/workspaces/api").json()["last_activity_at"]
    assert datetime.fromisoformat(after) - datetime.fromisoformat(before) > timedelta(minutes=59)


def test_a_stopped_workspace_shows_a_browser_a_waking_page_then_the_app(
        api: ApiClient) -> None:
    assert api.post("/api/v1/workspaces/api/stop").json()["state"] == "stopped"
    html_nav = {**api.h(), "Accept": "text/html"}
    r = api.client.get("/preview/api/8000/", headers=html_nav)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "<meta http-equiv=refresh content=1>" in r.text and "Starting workspace api" in r.text
    assert api.wait_state(wsid(api), settled=("running", "error"))["state"] == "running"
    r = api.client.get("/preview/api/8000/", headers=html_nav)
    assert r.status_code == 200 and "hello from the app" in r.text
    assert api.post("/api/v1/workspaces/api/stop").json()["state"] == "stopped"
    r = api.client.get("/preview/api/8000/", headers=api.h())  # a script's request waits
    assert r.status_code == 200 and "hello from the app" in r.text


def test_share_links(api: ApiClient) -> None:
    r = api.post("/api/v1/workspaces/api/ports/8000/links", json={"ttl_s": 600})
    assert r.status_code == 201, r.text
    link, link_id = r.json()["path_url"], r.json()["id"]
    path = link.removeprefix("http://testserver")
    r = api.client.get(path, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/preview/{wsid(api)}/8000/"
    assert "den_share=" in r.headers["set-cookie"]
    assert f"Path=/preview/{wsid(api)}/8000/" in r.headers["set-cookie"]
    assert api.client.get(f"/preview/{wsid(api)}/8000/").status_code == 200  # the cookie
    assert api.client.get(f"/preview/{wsid(api)}/8001/").status_code == 401  # not that port
    api.client.cookies.clear()
    key = api.client.app.state.previews.key  # type: ignore[attr-defined]
    expired = tokens.share_link(key, workspace_id=wsid(api), port=8000, link_id=link_id,
                                expires_at=int(time.time()) - 1)
    token = path.split("den_share=")[1]
    tampered = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
    other = tokens.share_link(key, workspace_id=wsid(api), port=8001, link_id=link_id,
                              expires_at=int(time.time()) + 60)
    unknown = tokens.share_link(key, workspace_id=wsid(api), port=8000, link_id="lk0",
                                expires_at=int(time.time()) + 60)
    for ref, bad in ((wsid(api), expired), (wsid(api), tampered), ("wsffffffffffff", token),
                     ("wsffffffffffff", tampered), (wsid(api), other), (wsid(api), unknown)):
        r = api.client.get(f"/preview/{ref}/8000/?den_share={bad}")
        assert_error(r, 403, "forbidden")
        assert "invalid or has expired" in r.json()["error"]["message"]
    for ttl in (0, 59, 10**9):
        assert_error(api.post("/api/v1/workspaces/api/ports/8000/links", json={"ttl_s": ttl}),
                     422, "invalid")
    assert_error(api.post("/api/v1/workspaces/api/ports/8000/links", user="bob", json={}), 404)


def test_connection_cap_and_idle_timeout(den: Callable[..., ApiClient],
                                         make_repo: Callable[..., Path]) -> None:
    api = den(preview_max_connections=1, preview_idle_timeout_s=0.5)
    api.create(make_repo("api"), name="api")
    _App.entered.clear()
    _App.release.clear()
    results: list[int] = []
    held = threading.Thread(target=lambda: results.append(
        api.client.get("/preview/api/8000/hold", headers=api.h()).status_code))
    # the idle timeout (0.5 s) ends /hold with a 504 unless released: release it only
    # after the second request was refused, which needs the first one in the app
    held.start()
    assert _App.entered.wait(10)
    svc = api.client.app.state.workspaces  # type: ignore[attr-defined]
    ws_id = api.get("/api/v1/workspaces/api").json()["id"]
    assert svc.activity.busy(ws_id)  # a request in progress keeps the workspace from idling
    r = api.client.get("/preview/api/8000/", headers=api.h())
    _App.release.set()
    held.join(30)
    assert_error(r, 503, "too_many_connections")
    assert results and results[0] in (200, 504)
    _App.entered.clear()
    _App.release.clear()
    r = api.client.get("/preview/api/8000/hold", headers=api.h())  # never released: idle
    _App.release.set()
    assert_error(r, 504, "preview_timeout")


# --- the subdomain form ----------------------------------------------------------------------

HOST = "8000--api--alice.preview.test"


def test_subdomain_form_signs_in_through_den_without_den_cookie(
        den: Callable[..., ApiClient], make_repo: Callable[..., Path]) -> None:
    api = den(preview_domain="preview.test", public_url="http://testserver")
    api.create(make_repo("api"), name="api")
    c = api.client
    ports = api.get("/api/v1/workspaces/api/ports").json()["ports"]
    assert {p["port"]: p["url"] for p in ports}[8000] == f"http://{HOST}/"
    r = c.get(f"http://{HOST}/headers", headers=api.h())  # a token works here too
    assert r.status_code == 200 and dict(r.json()["headers"])["host"] == HOST
    for host in ("0--api--alice.preview.test", "8000--nope--alice.preview.test",
                 "8000--api--bob.preview.test", "junk.preview.test"):
        assert c.get(f"http://{host}/", headers=api.h()).status_code == 404, host
    # a browser: sent to Den, signed in there, back with a grant, then its own cookie
    r = c.get(f"http://{HOST}/headers?q=1", headers={"Accept": "text/html"},
              follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == ("http://testserver/preview-auth?to=http%3A%2F%2F"
                                     "8000--api--alice.preview.test%2Fheaders%3Fq%3D1")
    r = c.get(r.headers["location"], follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    login(c, api.tokens["alice"])
    r = c.get("/preview-auth?to=http%3A%2F%2F8000--api--alice.preview.test%2Fheaders%3Fq%3D1",
              follow_redirects=False)
    assert r.status_code == 200  # a page that goes on (a redirect would break after login)
    m = re.search(r'http-equiv="refresh" content="0;url=([^"]+)"', r.text)
    assert m is not None, r.text
    back = html.unescape(m.group(1))
    assert back.startswith(f"http://{HOST}/_den/auth?grant=")
    r = c.get(back, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/headers?q=1"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("den_preview=") and "HttpOnly" in cookie
    assert "Domain" not in cookie  # host-only: no other preview origin gets it
    r = c.get(f"http://{HOST}/headers?q=1")
    assert r.status_code == 200, r.text
    assert "den_" not in dict(r.json()["headers"]).get("cookie", "")
    # the grant is for that origin only, and a cookie of one origin does not open another
    other = "8001--api--alice.preview.test"
    assert c.get(back.replace(HOST, other), follow_redirects=False).status_code == 403
    r = c.get(f"http://{other}/", headers={"Accept": "text/html",
                                           "Cookie": f"den_preview={cookie.split(';')[0][12:]}"},
              follow_redirects=False)
    assert r.status_code == 303 and "preview-auth" in r.headers["location"]
    # the Den session's logout ends the preview origin's sign-in too
    home = c.get("/workspaces")
    c.post("/logout", data={"csrf_token": csrf_of(home.text)})
    r = c.get(f"http://{HOST}/headers", headers={"Accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303 and "preview-auth" in r.headers["location"]


def test_grants_only_go_to_preview_origins(den: Callable[..., ApiClient]) -> None:
    api = den(preview_domain="preview.test", public_url="http://testserver")
    login(api.client, api.tokens["alice"])
    for to in ("http://evil.test/", "javascript:alert(1)", "", "http://preview.test/",
               "ftp://8000--api--alice.preview.test/"):
        r = api.client.get("/preview-auth", params={"to": to}, follow_redirects=False)
        assert r.status_code == 400, to


# --- the dashboard ---------------------------------------------------------------------------


def test_the_workspace_page_lists_ports_with_links_and_shares_them(api: ApiClient) -> None:

    c = api.client
    token = login(c, api.tokens["alice"])
    page = c.get(f"/workspaces/{wsid(api)}")
    assert page.status_code == 200
    link = f"http://testserver/preview/{wsid(api)}/8000/"
    assert f'href="{link}"' in page.text and 'rel="noopener noreferrer"' in page.text
    assert 'value="public"' in page.text  # public sharing is on for this server
    assert "vscode://" not in page.text  # the SSH gateway is off in unit tests
    r = c.post(f"/workspaces/{wsid(api)}/ports",
               data={"csrf_token": token, "port": "8000", "share": "users"})
    assert r.status_code == 200 and "Port 8000 of api is users." in r.text
    assert api.client.get(link, headers=api.h("bob")).status_code == 200
    for port, share in (("0", "users"), ("x", "users"), ("8000", "everyone")):
        r = c.post(f"/workspaces/{wsid(api)}/ports",
                   data={"csrf_token": csrf_of(r.text), "port": port, "share": share})
        assert r.status_code == 200 and "Could not share port" in r.text
    r = c.post(f"/workspaces/{wsid(api)}/ports", data={"port": "8000", "share": "public"})
    assert r.status_code == 403  # no CSRF token
    ports = {p["port"]: p for p in api.get("/api/v1/workspaces/api/ports").json()["ports"]}
    assert ports[8000]["share"] == "users"
    c.cookies.clear()
    login(c, api.tokens["bob"])
    assert c.get(f"/workspaces/{wsid(api)}").status_code == 404
    c.cookies.clear()


def test_the_workspace_page_opens_vs_code_through_the_ssh_config_host(
        den: Callable[..., ApiClient], make_repo: Callable[..., Path]) -> None:
    from tests.conftest import free_port

    api = den(ssh_port=free_port())
    api.create(make_repo("api"), name="api")
    login(api.client, api.tokens["alice"])
    page = api.client.get("/workspaces/api")
    assert 'href="vscode://vscode-remote/ssh-remote+den-api/workspace/api"' in page.text


def test_connections_to_the_app_are_reused_across_requests_and_users(
        api: ApiClient) -> None:
    runtime = api.client.app.state.workspaces.runtime  # type: ignore[attr-defined]

    def connects() -> int:
        return runtime.calls.count("connect")  # type: ignore[no-any-return]

    before = connects()
    seen = []
    for i in range(5):
        r = api.client.get(f"/preview/api/8000/headers?n={i}", headers=api.h())
        assert r.status_code == 200, r.text
        seen.append(dict((k, v) for k, v in r.json()["headers"]))
    assert connects() - before == 1  # one connection served all five
    # Each request on it carries only its own head: no credential of Den's, ever.
    assert all("authorization" not in h and "cookie" not in h for h in seen)
    pool = api.client.app.state.previews.pool  # type: ignore[attr-defined]
    assert len(pool) == 1
    # A response the app ends by closing (Connection: close) is not put back.
    r = api.client.get("/preview/api/8000/close-delimited", headers=api.h())
    assert r.status_code == 200 and r.text == "until the end"
    assert len(pool) == 0 and connects() - before == 1  # it went on the parked one
    r = api.client.get("/preview/api/8000/", headers=api.h())
    assert r.status_code == 200 and connects() - before == 2 and len(pool) == 1


def test_a_kept_connection_the_app_closed_is_never_a_failed_request(api: ApiClient) -> None:
    # The app closes right after answering: the close reaches Den while the connection is
    # parked (dropped) or just as the next request goes out on it (sent again on a new one).
    for _ in range(10):
        assert api.client.get("/preview/api/8000/then-close", headers=api.h()).text == "bye"
        r = api.client.get("/preview/api/8000/", headers=api.h())
        assert r.status_code == 200 and r.text == "<h1>hello from the app</h1>"


def test_a_share_link_is_listed_and_revoked_before_it_expires(api: ApiClient) -> None:
    links = "/api/v1/workspaces/api/ports/8000/links"
    made = [api.post(links, json={"ttl_s": 600}).json() for _ in range(2)]
    listed = api.get(links).json()["links"]
    assert [x["id"] for x in listed] == [m["id"] for m in made]
    assert listed[0]["port"] == 8000 and listed[0]["created_by"] == "alice"
    assert "url" not in listed[0]  # the link itself is shown once, when made
    assert api.get("/api/v1/workspaces/api/ports/8001/links").json() == {"links": []}
    path = made[0]["path_url"].removeprefix("http://testserver")
    assert api.client.get(path, follow_redirects=False).status_code == 303  # cookie set
    page = f"/preview/{wsid(api)}/8000/"
    assert api.client.get(page).status_code == 200
    # Another user can neither list nor revoke it (404: the workspace is not theirs).
    assert_error(api.get(links, user="bob"), 404)
    assert_error(api.delete(f"{links}/{made[0]['id']}", user="bob"), 404)
    r = api.delete(f"{links}/{made[0]['id']}")
    assert r.status_code == 204, r.text
    # Refused as a tampered link is; the cookie it left opens nothing either.
    r = api.client.get(path, follow_redirects=False)
    assert_error(r, 403, "forbidden")
    assert "invalid or has expired" in r.json()["error"]["message"]
    assert api.client.get(page).status_code == 401
    # The other link still works; the list and the event log say what happened.
    api.client.cookies.clear()
    other = made[1]["path_url"].removeprefix("http://testserver")
    assert api.client.get(other, follow_redirects=False).status_code == 303
    assert [x["id"] for x in api.get(links).json()["links"]] == [made[1]["id"]]
    events = api.get("/api/v1/workspaces/api/events").json()["events"]
    assert any(f"share link {made[0]['id']} revoked" in e["message"] for e in events)
    assert_error(api.delete(f"{links}/{made[0]['id']}"), 404)  # already gone
    assert_error(api.delete(f"{links}/lk0"), 404)
    assert_error(api.delete(f"/api/v1/workspaces/api/ports/8001/links/{made[1]['id']}"), 404)


# --- the access decision's cache: every revocation stops a preview with the next request ----


def _warm(api: ApiClient, url: str, *, status: int = 200, **kw: Any) -> None:
    """Open ``url`` until its decision comes from the cache."""
    cache = api.client.app.state.previews.cache  # type: ignore[attr-defined]
    hits = cache.hits
    for _ in range(3):
        assert api.client.get(url, **kw).status_code == status
    assert cache.hits > hits


def test_cached_a_share_set_back_to_private_stops_at_once(api: ApiClient) -> None:
    url, port = f"/preview/{wsid(api)}/8000/", "/api/v1/workspaces/api/ports/8000"
    assert api.put(port, json={"share": "public"}).status_code == 200
    _warm(api, url)
    assert api.put(port, json={"share": "private"}).status_code == 200
    assert api.client.get(url).status_code == 401


def test_a_bearer_token_is_checked_through_the_token_cache_and_revoking_it_stops_at_once(
        api: ApiClient) -> None:
    url = f"/preview/{wsid(api)}/8000/"
    with api.client.app.state.sessions.begin() as s:  # type: ignore[attr-defined]
        user = s.scalar(select(User).where(User.name == "alice"))
        row, secret = auth_tokens.issue_token(s, user)
        token_id = row.id
    auth = {"Authorization": f"Bearer {secret}"}
    cache = api.client.app.state.token_cache  # type: ignore[attr-defined]
    assert api.client.get(url, headers=auth).status_code == 200
    assert auth_tokens.hash_token(secret) in cache._entries  # the preview put it there
    assert api.client.get(url, headers=auth).status_code == 200
    assert api.delete(f"/api/v1/users/me/tokens/{token_id}").status_code == 204
    assert api.client.get(url, headers=auth, follow_redirects=False).status_code == 401


def test_cached_a_deleted_workspace_stops_at_once(api: ApiClient) -> None:
    url = "/preview/api/8000/"
    _warm(api, url, headers=api.h())
    assert api.delete("/api/v1/workspaces/api").status_code == 204
    assert_error(api.client.get(url, headers=api.h()), 404, "not_found")


def test_cached_a_revoked_or_expired_share_link_stops_at_once(api: ApiClient) -> None:
    links = "/api/v1/workspaces/api/ports/8000/links"
    made = [api.post(links, json={"ttl_s": 600}).json() for _ in range(2)]
    page = f"/preview/{wsid(api)}/8000/"
    path = made[0]["path_url"].removeprefix("http://testserver")
    assert api.client.get(path, follow_redirects=False).status_code == 303  # the cookie
    _warm(api, page)
    assert api.delete(f"{links}/{made[0]['id']}").status_code == 204
    assert api.client.get(page).status_code == 401
    api.client.cookies.clear()
    # The other one, until its row's expiry passes (the token's own is checked apart).
    path = made[1]["path_url"].removeprefix("http://testserver")
    assert api.client.get(path, follow_redirects=False).status_code == 303
    _warm(api, page)
    previews = api.client.app.state.previews  # type: ignore[attr-defined]
    previews.clock = lambda: datetime.now(UTC) + timedelta(seconds=601)
    assert api.client.get(page).status_code == 401
    api.client.cookies.clear()


def test_cached_a_logout_or_an_expired_session_stops_at_once(
        den: Callable[..., ApiClient], make_repo: Callable[..., Path]) -> None:
    api = den()
    api.create(make_repo("api"), name="api")
    c = api.client
    login(c, api.tokens["alice"])
    _warm(api, "/preview/api/8000/")
    previews = c.app.state.previews  # type: ignore[attr-defined]
    previews.clock = lambda: datetime.now(UTC) + timedelta(days=400)
    assert c.get("/preview/api/8000/", follow_redirects=False).status_code == 401
    previews.clock = lambda: datetime.now(UTC)
    _warm(api, "/preview/api/8000/")
    c.post("/logout", data={"csrf_token": csrf_of(c.get("/workspaces").text)})
    assert c.get("/preview/api/8000/", follow_redirects=False).status_code == 401


def test_cached_decisions_are_forgotten_on_any_write_they_read(api: ApiClient) -> None:
    previews = api.client.app.state.previews  # type: ignore[attr-defined]
    _warm(api, "/preview/api/8000/", headers=api.h())
    previews.workspaces.touch(wsid(api))  # activity only: nothing the decision reads
    assert len(previews.cache) > 0
    with previews.workspaces.sessions.begin() as s:  # e.g. an admin flag, a state
        s.execute(update(User).where(User.name == "bob").values(is_admin=False))
    assert len(previews.cache) == 0
    _warm(api, "/preview/api/8000/", headers=api.h())
    with previews.workspaces.sessions() as s:  # nothing committed: nothing forgotten
        s.execute(update(Workspace).where(Workspace.name == "api").values(state="stopped"))
        s.rollback()
    assert len(previews.cache) > 0
