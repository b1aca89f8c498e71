"""Unit tests for the Python client and the client verbs of the den CLI (no server needed)."""

from __future__ import annotations

import argparse
import io
import json
import socket
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest
from websockets.http11 import Request, Response
from websockets.sync.server import ServerConnection, serve

from server.client import Den, DenAPIError, ExecResult, FileEntry, Workspace
from server.client.api import Snapshot, default_name
from server.client.commands import _size, add_client_commands
from server.client.config import ClientConfig, config_path, load_config, save_config
from server.ssh import proof

URL = "http://den.test"
TOKEN = "den_secret"
NOW = datetime(2026, 11, 29, 12, 40, 3, 500000, tzinfo=UTC)  # the fake server's clock
MAX_KEEPALIVE_S = 86400


def _ws_json(name: str, state: str = "running", **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": f"id-{name}",
        "name": name,
        "owner": "alice",
        "state": state,
        "state_reason": None,
        "repo": {"url": f"https://forge/acme/{name}.git", "branch": None,
                 "path": f"/workspace/{name}"},
        "image": "den/base",
        "runtime": "gvisor",
        "resources": {"cpus": 2.0, "memory_mb": 4096, "disk_gb": 10, "gpus": 0, "pids": 512},
        "env": {},
        "idle_timeout_s": 900,
        "stop_after_s": None,
        "keep_alive": False,
        "keepalive_until": None,
        "created_at": "2024-05-01T12:30:45+00:00",
        "updated_at": "2024-05-01T12:30:45+00:00",
        "last_activity_at": None,
        "ssh": None,
    }
    data.update(extra)
    return data


def _error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


@dataclass
class FakeServer:
    """A tiny in-memory Den API behind httpx.MockTransport."""

    workspaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    # states a GET returns in turn after a create, before the final one
    create_states: list[str] = field(default_factory=lambda: ["creating", "running"])
    create_reason: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    exec_reply: dict[str, Any] = field(default_factory=lambda: {
        "exit_code": 0, "stdout": "ok\n", "stderr": "", "timed_out": False, "duration_ms": 12})
    overrides: dict[tuple[str, str], httpx.Response] = field(default_factory=dict)
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def den(self) -> Den:
        return Den(URL, token=TOKEN, transport=self.transport(), poll_interval_s=0)

    def add(self, name: str, state: str = "running", **extra: Any) -> dict[str, Any]:
        self.workspaces[name] = _ws_json(name, state, **extra)
        return self.workspaces[name]

    def find(self, key: str) -> dict[str, Any] | None:
        for ws in self.workspaces.values():
            if key in (ws["id"], ws["name"]):
                return ws
        return None

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return _error(401, "unauthorized", "invalid token")
        path = request.url.path
        key = (request.method, path)
        if key in self.overrides:
            return self.overrides[key]
        if path == "/healthz":
            return httpx.Response(200, json={"status": "ok"})
        if path == "/api/v1/users/me":
            return httpx.Response(200, json={"id": "u1", "name": "alice", "is_admin": False})
        if path.startswith("/api/v1/users/me/tokens"):
            return self.handle_tokens(request)
        if path.startswith("/api/v1/snapshots/"):
            return self.handle_snapshot(request, path.removeprefix("/api/v1/snapshots/"))
        if path == "/api/v1/workspaces":
            if request.method == "POST":
                return self.handle_create(json.loads(request.content))
            return self.handle_list(request)
        parts = path.removeprefix("/api/v1/workspaces/").split("/", 1)
        ws = self.find(parts[0])
        if ws is None:
            return _error(404, "not_found", f"workspace {parts[0]} not found")
        rest = parts[1] if len(parts) > 1 else ""
        return self.handle_workspace(request, ws, rest)

    def handle_list(self, request: httpx.Request) -> httpx.Response:
        """The list, in pages when asked (``limit``; the cursor here is an index)."""
        rows = list(self.workspaces.values())
        if "limit" not in request.url.params:
            return httpx.Response(200, json={"workspaces": rows, "next": None})
        start, limit = int(request.url.params.get("after", 0)), int(request.url.params["limit"])
        more = start + limit < len(rows)
        return httpx.Response(200, json={"workspaces": rows[start:start + limit],
                                         "next": str(start + limit) if more else None})

    def handle_tokens(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            name = json.loads(request.content)["name"]
            return httpx.Response(201, json={"id": "t1", "name": name, "token": "den_new",
                                             "created_at": "2024-05-01T00:00:00Z"})
        if request.method == "GET":
            return httpx.Response(200, json={"tokens": [{"id": "t1", "name": "ci",
                                                         "created_at": "x", "last_used_at": None}]})
        return httpx.Response(204)

    def handle_create(self, body: dict[str, Any]) -> httpx.Response:
        if "from_snapshot" in body:
            snap = self.snapshots.get(body["from_snapshot"])
            if snap is None:
                return _error(404, "not_found", f"no snapshot {body['from_snapshot']!r}")
            ws = self.add(body.get("name") or f"{snap['name']}-fork", "creating")
            return httpx.Response(202, json=ws)
        ws = self.add(body["name"], "creating")
        ws["repo"]["url"] = body["repo"]["url"]
        return httpx.Response(202, json=ws)

    def add_snapshot(self, ws: dict[str, Any], name: str, *, memory: bool = False,
                     size_bytes: int = 0) -> dict[str, Any]:
        sid = f"sn{len(self.snapshots) + 1:012x}"
        self.snapshots[sid] = {"id": sid, "name": name, "workspace_id": ws["id"],
                               "memory": memory, "size_bytes": size_bytes,
                               "created_at": "2026-11-29T14:05:09.123456Z"}
        return self.snapshots[sid]

    def handle_snapshots(self, request: httpx.Request, ws: dict[str, Any]) -> httpx.Response:
        if request.method == "GET":
            mine = [s for s in self.snapshots.values() if s["workspace_id"] == ws["id"]]
            return httpx.Response(200, json={"snapshots": mine})
        body = json.loads(request.content)
        if body["memory"] and ws["state"] not in ("running", "paused"):
            return _error(409, "conflict", f"workspace is {ws['state']}; a memory snapshot "
                                           "needs it running or paused")
        snap = self.add_snapshot(ws, body["name"], memory=body["memory"], size_bytes=123456789)
        return httpx.Response(201, json=snap)

    def handle_snapshot(self, request: httpx.Request, rest: str) -> httpx.Response:
        sid, _, action = rest.partition("/")
        snap = self.snapshots.get(sid)
        if snap is None:
            return _error(404, "not_found", f"no snapshot {sid!r}")
        if request.method == "DELETE" and action == "":
            del self.snapshots[sid]
            return httpx.Response(204)
        if request.method == "POST" and action == "restore":
            ws = self.find(snap["workspace_id"] or "")
            if ws is None:
                return _error(409, "workspace_gone",
                              "the snapshot's workspace is deleted; fork the snapshot instead")
            ws["state"] = "running"
            return httpx.Response(200, json=ws)
        return _error(405, "method_not_allowed", f"{request.method} {rest}")

    def handle_workspace(self, request: httpx.Request, ws: dict[str, Any], rest: str
                         ) -> httpx.Response:
        method = request.method
        if rest == "" and method == "GET":
            if ws["state"] == "creating" and self.create_states:
                ws["state"] = self.create_states.pop(0)
                if ws["state"] == "error":
                    ws["state_reason"] = self.create_reason
            return httpx.Response(200, json=ws)
        if rest == "" and method == "DELETE":
            del self.workspaces[ws["name"]]
            drop = request.url.params.get("snapshots") == "true"
            for sid, snap in list(self.snapshots.items()):
                if snap["workspace_id"] == ws["id"]:
                    if drop:
                        del self.snapshots[sid]
                    else:
                        snap["workspace_id"] = None
            return httpx.Response(204)
        if rest == "snapshots":
            return self.handle_snapshots(request, ws)
        targets = {"start": "running", "stop": "stopped", "pause": "paused", "resume": "running"}
        if rest in targets and method == "POST":
            ws["state"] = targets[rest]
            return httpx.Response(200, json=ws)
        if rest == "keepalive" and method == "POST":
            return self.handle_keepalive(request, ws)
        if rest == "" and method == "PATCH":
            ws["network"] = {"allow": [], **json.loads(request.content)["network"]}
            return httpx.Response(200, json=ws)
        if rest == "exec":
            return httpx.Response(200, json=self.exec_reply)
        if rest == "events":
            return httpx.Response(200, json={"events": [
                {"id": 1, "at": "2024-05-01T12:00:00+00:00", "kind": "state",
                 "from_state": None, "to_state": "creating", "actor": "alice",
                 "message": "created"},
                {"id": 2, "at": "2024-05-01T12:01:00+00:00", "kind": "state",
                 "from_state": "creating", "to_state": "running", "actor": "system",
                 "message": ""},
            ]})
        if rest == "files/list":
            return httpx.Response(200, json={"path": request.url.params["path"], "entries": [
                {"name": "a.txt", "type": "file", "size": 2, "mtime": 1.5, "mode": "-rw-r--r--"},
                {"name": "src", "type": "dir", "size": 0, "mtime": 2.0, "mode": "drwxr-xr-x"},
            ]})
        if rest == "files":
            path = request.url.params["path"]
            if method == "GET":
                if path not in self.files:
                    return _error(404, "not_found", f"{path}: no such file")
                return httpx.Response(200, content=self.files[path])
            if method == "PUT":
                self.files[path] = request.content
                return httpx.Response(200, json={"path": path, "size": len(request.content)})
            if method == "DELETE":
                self.files.pop(path, None)
                return httpx.Response(204)
        return _error(405, "method_not_allowed", f"{method} {rest}")

    def handle_keepalive(self, request: httpx.Request, ws: dict[str, Any]) -> httpx.Response:
        """Like the server: validate ttl_s, wake the workspace, set or clear the lease."""
        ttl = json.loads(request.content).get("ttl_s")
        if not isinstance(ttl, int) or not 0 <= ttl <= MAX_KEEPALIVE_S:
            return _error(422, "invalid", f"ttl_s must be between 0 and {MAX_KEEPALIVE_S}")
        if ws["state"] not in ("running", "paused", "stopped"):
            return _error(409, "conflict", f"workspace is {ws['state']}")
        ws["state"] = "running"
        until = NOW + timedelta(seconds=ttl)
        ws["keepalive_until"] = until.isoformat().replace("+00:00", "Z") if ttl else None
        return httpx.Response(200, json=ws)

    def last(self, method: str, suffix: str) -> httpx.Request:
        for request in reversed(self.requests):
            if request.method == method and request.url.path.endswith(suffix):
                return request
        raise AssertionError(f"no {method} *{suffix} among {self.requests}")


@pytest.fixture
def fake() -> FakeServer:
    return FakeServer()


@pytest.fixture
def den(fake: FakeServer) -> Iterator[Den]:
    with fake.den() as client:
        yield client


# --- values and helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(("url", "name"), [
    ("https://forge/acme/api.git", "api"),
    ("https://forge/acme/My_API.git/", "my-api"),
    ("git@forge.example:acme/Web.App.git", "web-app"),
    ("https://forge/acme/" + "x" * 60, "x" * 40),
    ("https://forge/acme/___", "workspace"),
])
def test_default_name(url: str, name: str) -> None:
    assert default_name(url) == name


def test_error_str() -> None:
    err = DenAPIError(409, "conflict", "workspace api is stopping")
    assert str(err) == "workspace api is stopping (conflict, HTTP 409)"
    assert (err.status, err.code, err.message) == (409, "conflict", "workspace api is stopping")


def test_exec_result_ok_and_check() -> None:
    good = ExecResult(0, "out", "", False, 5)
    assert good.ok and good.check() is good
    with pytest.raises(DenAPIError) as info:
        ExecResult(2, "", "boom\n", False, 5).check()
    assert info.value.code == "exec_failed" and "exited with 2: boom" in info.value.message
    timed_out = ExecResult(0, "", "", True, 5)
    assert not timed_out.ok
    with pytest.raises(DenAPIError, match="timed out"):
        timed_out.check()


# --- Den --------------------------------------------------------------------------------------


def test_me_health_and_auth_header(den: Den, fake: FakeServer) -> None:
    assert den.me() == {"id": "u1", "name": "alice", "is_admin": False}
    assert den.health() == {"status": "ok"}
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in fake.requests)


def test_tokens(den: Den, fake: FakeServer) -> None:
    assert den.create_token("ci")["token"] == "den_new"
    assert json.loads(fake.last("POST", "/tokens").content) == {"name": "ci"}
    assert [t["name"] for t in den.tokens()] == ["ci"]
    den.delete_token("t1")
    assert fake.last("DELETE", "/tokens/t1")


def test_create_waits_until_running(den: Den, fake: FakeServer) -> None:
    fake.create_states = ["creating", "creating", "running"]
    ws = den.create("https://forge/acme/API.git", branch="main", cpus=1.5, memory_mb=2048,
                    env={"A": "1"}, keep_alive=True)
    assert isinstance(ws, Workspace)
    assert (ws.name, ws.state, ws.id) == ("api", "running", "id-api")
    assert ws.repo_path == "/workspace/api" and ws.repo_url == "https://forge/acme/API.git"
    body = json.loads(fake.last("POST", "/api/v1/workspaces").content)
    assert body == {
        "name": "api",
        "repo": {"url": "https://forge/acme/API.git", "branch": "main"},
        "resources": {"cpus": 1.5, "memory_mb": 2048},
        "env": {"A": "1"},
        "keep_alive": True,
    }
    assert sum(r.method == "GET" for r in fake.requests) == 3


def test_create_no_wait(den: Den, fake: FakeServer) -> None:
    ws = den.create("https://forge/acme/api.git", name="mine", image="den/py", wait=False)
    assert ws.state == "creating"
    body = json.loads(fake.last("POST", "/api/v1/workspaces").content)
    assert body == {"name": "mine", "repo": {"url": "https://forge/acme/api.git", "branch": None},
                    "image": "den/py"}
    assert not any(r.method == "GET" for r in fake.requests)


def test_create_ending_in_error(den: Den, fake: FakeServer) -> None:
    fake.create_states = ["error"]
    fake.create_reason = "clone failed: repository not found"
    with pytest.raises(DenAPIError) as info:
        den.create("https://forge/acme/api.git")
    assert info.value.code == "workspace_error"
    assert info.value.message == "clone failed: repository not found"


def test_create_timeout(den: Den, fake: FakeServer) -> None:
    fake.create_states = []
    with pytest.raises(DenAPIError) as info:
        den.create("https://forge/acme/api.git", timeout_s=0)
    assert (info.value.status, info.value.code) == (0, "timeout")


def test_wait_for_unexpected_state(den: Den, fake: FakeServer) -> None:
    fake.add("api", "stopped")
    with pytest.raises(DenAPIError) as info:
        den.workspace("api").wait_for("running")
    assert info.value.code == "unexpected_state"


def test_workspaces_and_lookup(den: Den, fake: FakeServer) -> None:
    fake.add("api")
    fake.add("web", "paused")
    assert [(w.name, w.state) for w in den.workspaces()] == [("api", "running"), ("web", "paused")]
    fake.add("db")
    fake.requests.clear()
    assert [w.name for w in den.workspaces(page_size=2)] == ["api", "web", "db"]
    assert [dict(r.url.params) for r in fake.requests] == [
        {"limit": "2"}, {"limit": "2", "after": "2"}]
    ws = den.workspace("web")
    assert ws.raw["runtime"] == "gvisor" and ws.state_reason is None
    ws.raw["state"] = "mutated"  # raw is a copy
    assert ws.state == "paused"
    with pytest.raises(DenAPIError) as info:
        den.workspace("a/b")
    assert info.value.status == 404 and info.value.code == "not_found"
    assert fake.requests[-1].url.raw_path == b"/api/v1/workspaces/a%2Fb"


def test_lifecycle(den: Den, fake: FakeServer) -> None:
    fake.add("api")
    ws = den.workspace("api")
    assert ws.stop().state == "stopped"
    assert fake.last("POST", "/stop").url.path == "/api/v1/workspaces/id-api/stop"
    assert ws.start().state == "running"
    assert ws.pause().state == "paused"
    assert ws.resume().state == "running"
    fake.workspaces["api"]["state"] = "stopped"
    assert ws.refresh().state == "stopped"


def test_pause_and_resume_take_the_server_answer(den: Den, fake: FakeServer) -> None:
    fake.add("api")
    ws = den.workspace("api")
    paused = ws.pause()
    assert paused is ws and ws.state == "paused"
    assert fake.last("POST", "/pause").url.path == "/api/v1/workspaces/id-api/pause"
    assert fake.last("POST", "/pause").content == b""
    fake.overrides[("POST", "/api/v1/workspaces/id-api/resume")] = httpx.Response(
        200, json={**fake.workspaces["api"], "state": "running", "last_activity_at": "x"})
    assert ws.resume().state == "running" and ws.raw["last_activity_at"] == "x"
    fake.overrides[("POST", "/api/v1/workspaces/id-api/resume")] = _error(
        409, "conflict", "cannot resume a workspace that is stopped")
    with pytest.raises(DenAPIError) as info:
        ws.resume()
    assert (info.value.status, info.value.code) == (409, "conflict")


def test_keepalive(den: Den, fake: FakeServer) -> None:
    fake.add("api", "paused")
    ws = den.workspace("api")
    assert ws.keepalive_until is None
    assert ws.keepalive(600) is ws
    request = fake.last("POST", "/keepalive")
    assert request.url.path == "/api/v1/workspaces/id-api/keepalive"
    assert json.loads(request.content) == {"ttl_s": 600}
    assert ws.state == "running"  # a paused workspace is woken
    assert ws.keepalive_until == "2026-11-29T12:50:03.500000Z"
    assert ws.keepalive(0).keepalive_until is None  # 0 ends the lease
    assert json.loads(fake.last("POST", "/keepalive").content) == {"ttl_s": 0}
    with pytest.raises(DenAPIError) as info:
        ws.keepalive(MAX_KEEPALIVE_S + 1)
    assert (info.value.status, info.value.code) == (422, "invalid")
    assert ws.state == "running"  # unchanged by the failed call


def test_create_with_idle_policy(den: Den, fake: FakeServer) -> None:
    den.create("https://forge/acme/api.git", idle_timeout_s=0, stop_after_s=3600, wait=False)
    body = json.loads(fake.last("POST", "/api/v1/workspaces").content)
    assert (body["idle_timeout_s"], body["stop_after_s"]) == (0, 3600)
    assert "keep_alive" not in body


def test_conflict_is_translated(den: Den, fake: FakeServer) -> None:
    fake.add("api", "stopping")
    fake.overrides[("POST", "/api/v1/workspaces/id-api/start")] = _error(
        409, "conflict", "workspace api is stopping")
    with pytest.raises(DenAPIError) as info:
        den.workspace("api").start()
    assert (info.value.status, info.value.code) == (409, "conflict")
    assert str(info.value) == "workspace api is stopping (conflict, HTTP 409)"


def test_delete(den: Den, fake: FakeServer) -> None:
    fake.add("api")
    fake.add("web")
    assert den.workspace("api").delete() is True
    assert "api" not in fake.workspaces
    fake.overrides[("DELETE", "/api/v1/workspaces/id-web")] = httpx.Response(202)
    ws = den.workspace("web")
    assert ws.delete() is False and ws.state == "deleting"


def test_snapshot_and_list(den: Den, fake: FakeServer) -> None:
    fake.add("api")
    ws = den.workspace("api")
    snap = ws.snapshot("before")
    assert isinstance(snap, Snapshot)
    assert (snap.name, snap.workspace_id, snap.memory, snap.size_bytes) == (
        "before", "id-api", False, 123456789)
    assert snap.created_at == "2026-11-29T14:05:09.123456Z" and snap.raw["id"] == snap.id
    request = fake.last("POST", "/snapshots")
    assert request.url.path == "/api/v1/workspaces/id-api/snapshots"
    assert json.loads(request.content) == {"name": "before", "memory": False}
    with_memory = ws.snapshot("mem", memory=True)
    assert with_memory.memory is True
    assert json.loads(fake.last("POST", "/snapshots").content) == {"name": "mem", "memory": True}
    assert ws.snapshots() == [snap, with_memory]
    assert fake.last("GET", "/snapshots").url.path == "/api/v1/workspaces/id-api/snapshots"


def test_memory_snapshot_of_a_stopped_workspace_is_409(den: Den, fake: FakeServer) -> None:
    fake.add("api", "stopped")
    with pytest.raises(DenAPIError) as info:
        den.workspace("api").snapshot("m", memory=True)
    assert (info.value.status, info.value.code) == (409, "conflict")


def test_snapshot_from_json_defaults() -> None:
    snap = Snapshot.from_json({"id": "sn1", "name": "x", "workspace_id": None})
    assert snap == Snapshot("sn1", "x", None, False, 0, "")
    assert snap.raw == {"id": "sn1", "name": "x", "workspace_id": None}
    assert hash(snap) == hash(Snapshot("sn1", "x", None, False, 0, "", raw={"other": 1}))


def test_fork_waits_until_running(den: Den, fake: FakeServer) -> None:
    snap = fake.add_snapshot(fake.add("api"), "before")
    fake.create_states = ["creating", "running"]
    ws = den.fork(snap["id"], name="trial")
    assert (ws.name, ws.state) == ("trial", "running")
    body = json.loads(fake.last("POST", "/api/v1/workspaces").content)
    assert body == {"from_snapshot": snap["id"], "name": "trial"}
    assert sum(r.method == "GET" for r in fake.requests) == 2


def test_fork_no_wait_default_name_and_snapshot_object(den: Den, fake: FakeServer) -> None:
    fake.add("api")
    snap = den.workspace("api").snapshot("before")
    ws = den.fork(snap, wait=False)  # a Snapshot works as well as its id
    assert (ws.name, ws.state) == ("before-fork", "creating")
    assert json.loads(fake.last("POST", "/api/v1/workspaces").content) == {
        "from_snapshot": snap.id}
    with pytest.raises(DenAPIError) as info:
        den.fork("sngone")
    assert (info.value.status, info.value.code) == (404, "not_found")


def test_fork_ending_in_error(den: Den, fake: FakeServer) -> None:
    snap = fake.add_snapshot(fake.add("api"), "before")
    fake.create_states = ["error"]
    fake.create_reason = "copying the workspace's files failed"
    with pytest.raises(DenAPIError) as info:
        den.fork(snap["id"], name="trial")
    assert (info.value.code, info.value.message) == (
        "workspace_error", "copying the workspace's files failed")


def test_restore_and_delete_snapshot(den: Den, fake: FakeServer) -> None:
    fake.add("api", "stopped")
    snap = fake.add_snapshot(fake.workspaces["api"], "before")
    ws = den.restore_snapshot(snap["id"])
    assert isinstance(ws, Workspace) and (ws.name, ws.state) == ("api", "running")
    assert fake.last("POST", "/restore").url.path == f"/api/v1/snapshots/{snap['id']}/restore"
    den.delete_snapshot(Snapshot.from_json(snap))
    assert fake.last("DELETE", snap["id"]).url.path == f"/api/v1/snapshots/{snap['id']}"
    assert fake.snapshots == {}
    with pytest.raises(DenAPIError) as info:
        den.delete_snapshot("a/b")
    assert info.value.status == 404
    assert fake.requests[-1].url.raw_path == b"/api/v1/snapshots/a%2Fb"


def test_restore_of_a_deleted_workspaces_snapshot(den: Den, fake: FakeServer) -> None:
    snap = fake.add_snapshot(fake.add("api"), "before")
    den.workspace("api").delete()
    assert fake.snapshots[snap["id"]]["workspace_id"] is None  # kept
    assert "snapshots" not in fake.last("DELETE", "/id-api").url.params
    with pytest.raises(DenAPIError) as info:
        den.restore_snapshot(snap["id"])
    assert (info.value.status, info.value.code) == (409, "workspace_gone")
    assert den.fork(snap["id"], name="again").state == "running"  # still forkable


def test_delete_with_snapshots(den: Den, fake: FakeServer) -> None:
    fake.add_snapshot(fake.add("api"), "before")
    other = fake.add_snapshot(fake.add("web"), "keep")
    assert den.workspace("api").delete(snapshots=True) is True
    assert fake.last("DELETE", "/id-api").url.params["snapshots"] == "true"
    assert list(fake.snapshots) == [other["id"]]


def test_exec(den: Den, fake: FakeServer) -> None:
    fake.add("api")
    ws = den.workspace("api")
    result = ws.exec(["pytest", "-q"], cwd="/workspace/api", env={"X": "1"}, timeout_s=60,
                     stdin=b"input")
    assert result == ExecResult(0, "ok\n", "", False, 12) and result.ok
    body = json.loads(fake.last("POST", "/exec").content)
    assert body == {"cmd": ["pytest", "-q"], "cwd": "/workspace/api", "env": {"X": "1"},
                    "timeout_s": 60, "stdin": "input"}
    ws.exec("echo hi | wc -c")
    assert json.loads(fake.last("POST", "/exec").content) == {"cmd": "echo hi | wc -c"}
    fake.exec_reply = {"exit_code": 3, "stdout": "", "stderr": "bad", "timed_out": False,
                       "duration_ms": 1}
    assert ws.exec("false").exit_code == 3
    with pytest.raises(DenAPIError, match="exited with 3"):
        ws.exec("false", check=True)


def test_files(den: Den, fake: FakeServer) -> None:
    fake.add("api")
    ws = den.workspace("api")
    assert ws.write_file("notes/a.txt", b"hi") == 2
    put = fake.last("PUT", "/files")
    assert put.url.params["path"] == "notes/a.txt"
    assert put.headers["Content-Type"] == "application/octet-stream"
    assert ws.read_file("notes/a.txt") == b"hi"
    assert ws.write_file("b.txt", "é") == 2
    assert fake.files["b.txt"] == "é".encode()
    entries = ws.list_files("notes")
    assert entries[0] == FileEntry("a.txt", "file", 2, 1.5, "-rw-r--r--")
    assert entries[1].type == "dir"
    assert fake.last("GET", "/files/list").url.params["path"] == "notes"
    ws.delete_file("notes", recursive=True)
    assert fake.last("DELETE", "/files").url.params["recursive"] == "true"
    ws.delete_file("b.txt")
    assert fake.last("DELETE", "/files").url.params["recursive"] == "false"
    with pytest.raises(DenAPIError) as info:
        ws.read_file("missing")
    assert info.value.status == 404


def test_stat_make_dir_rename(den: Den, fake: FakeServer) -> None:
    fake.add("api")
    ws = den.workspace("api")
    base = "/api/v1/workspaces/id-api/files"
    entry = {"name": "d", "type": "dir", "size": 4096, "mtime": 2.5, "mode": "755"}
    fake.overrides[("GET", f"{base}/stat")] = httpx.Response(200, json=entry)
    fake.overrides[("POST", f"{base}/mkdir")] = httpx.Response(201, json=entry)
    fake.overrides[("POST", f"{base}/rename")] = httpx.Response(200, json={**entry, "name": "e"})
    assert ws.stat_file("d") == FileEntry("d", "dir", 4096, 2.5, "755")
    assert fake.last("GET", "/files/stat").url.params["path"] == "d"
    assert ws.make_dir("a/d").name == "d"
    assert dict(fake.last("POST", "/files/mkdir").url.params) == {"path": "a/d",
                                                                  "parents": "true"}
    ws.make_dir("d", parents=False)
    assert fake.last("POST", "/files/mkdir").url.params["parents"] == "false"
    assert ws.rename_file("d", "e").name == "e"
    assert json.loads(fake.last("POST", "/files/rename").content) == {"from": "d", "to": "e"}
    fake.overrides[("POST", f"{base}/rename")] = _error(403, "path_outside", "outside")
    with pytest.raises(DenAPIError) as info:
        ws.rename_file("d", "/etc/d")
    assert (info.value.status, info.value.code) == (403, "path_outside")


def test_events(den: Den, fake: FakeServer) -> None:
    fake.add("api")
    events = den.workspace("api").events()
    assert [e["to_state"] for e in events] == ["creating", "running"]


def test_non_json_error_and_bad_response(den: Den, fake: FakeServer) -> None:
    fake.overrides[("GET", "/api/v1/users/me")] = httpx.Response(502, text="<html>bad gw</html>")
    with pytest.raises(DenAPIError) as info:
        den.me()
    assert (info.value.status, info.value.code) == (502, "http_error")
    assert "bad gw" in info.value.message
    fake.overrides[("GET", "/healthz")] = httpx.Response(200, text="not json")
    with pytest.raises(DenAPIError) as info2:
        den.health()
    assert info2.value.code == "bad_response"


def _raising(exc: Exception) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return httpx.MockTransport(handler)


def test_unreachable_and_timeout() -> None:
    den = Den(URL, TOKEN, transport=_raising(httpx.ConnectError("connection refused")))
    with pytest.raises(DenAPIError) as info:
        den.me()
    assert (info.value.status, info.value.code) == (0, "unreachable")
    assert URL in info.value.message
    den = Den(URL, TOKEN, transport=_raising(httpx.ReadTimeout("slow")))
    with pytest.raises(DenAPIError) as info:
        den.me()
    assert (info.value.status, info.value.code) == (0, "timeout")


def test_http_client_argument(fake: FakeServer) -> None:
    with httpx.Client(transport=fake.transport()) as http:
        den = Den(URL + "/", TOKEN, http_client=http)
        assert den.url == URL
        assert den.me()["name"] == "alice"
        den.close()  # not ours: stays open
        assert not http.is_closed


def test_unauthorized(fake: FakeServer) -> None:
    den = Den(URL, "wrong", transport=fake.transport())
    with pytest.raises(DenAPIError) as info:
        den.me()
    assert (info.value.status, info.value.code) == (401, "unauthorized")


# --- config -----------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for var in ("DEN_URL", "DEN_TOKEN", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "conf" / "config.json"
    monkeypatch.setenv("DEN_CONFIG", str(path))
    return path


def test_config_path_resolution(tmp_path: Path) -> None:
    assert config_path({"DEN_CONFIG": str(tmp_path / "c.json")}) == tmp_path / "c.json"
    assert config_path({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "den" / "config.json"
    assert config_path({}) == Path.home() / ".config" / "den" / "config.json"


def test_config_save_and_load(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert load_config(env) is None
    path = save_config(ClientConfig("http://den.test/", TOKEN), env)
    assert path == tmp_path / "xdg" / "den" / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_config(env) == ClientConfig("http://den.test", TOKEN)
    assert TOKEN not in repr(load_config(env))
    assert load_config({**env, "DEN_TOKEN": "other"}) == ClientConfig("http://den.test", "other")
    assert load_config({**env, "DEN_URL": "http://x/"}) == ClientConfig("http://x", TOKEN)
    assert load_config({"DEN_URL": "http://x", "DEN_TOKEN": "t",
                        "DEN_CONFIG": str(tmp_path / "none.json")}) == ClientConfig("http://x", "t")
    path.write_text("[1]")
    with pytest.raises(ValueError, match="not a JSON object"):
        load_config(env)


def test_from_config(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DenAPIError) as info:
        Den.from_config()
    assert info.value.code == "not_logged_in"
    save_config(ClientConfig(URL, TOKEN))
    den = Den.from_config(poll_interval_s=0)
    assert (den.url, den.token, den.poll_interval_s) == (URL, TOKEN, 0)


# --- exec_stream over a real WebSocket server -------------------------------------------------


@dataclass
class StreamServer:
    url: str
    received: list[Any]
    headers: dict[str, str]
    path: list[str]


@pytest.fixture
def stream_server() -> Iterator[Callable[..., StreamServer]]:
    servers: list[Any] = []

    def start(script: Callable[[ServerConnection, list[Any]], None],
              reject: tuple[int, str] | None = None) -> StreamServer:
        received: list[Any] = []
        headers: dict[str, str] = {}
        path: list[str] = []

        def process_request(conn: ServerConnection, request: Request) -> Response | None:
            headers.update({k: v for k, v in request.headers.raw_items()})
            path.append(request.path)
            if reject is not None:
                return conn.respond(HTTPStatus(reject[0]), reject[1])
            return None

        def handler(conn: ServerConnection) -> None:
            received.append(json.loads(conn.recv()))
            script(conn, received)

        server = serve(handler, "127.0.0.1", 0, process_request=process_request)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        return StreamServer(f"http://127.0.0.1:{port}", received, headers, path)

    yield start
    for server in servers:
        server.shutdown()


def _echo_script(conn: ServerConnection, received: list[Any]) -> None:
    """Binary frames as Den sends them with ``"binary": true``: stdin back in upper case on
    stdout, one character split across two frames, then stderr."""
    while True:
        msg = conn.recv()
        if isinstance(msg, bytes):
            received.append(msg)
            conn.send(b"\x01" + msg.upper())
            continue
        received.append(json.loads(msg))
        if received[-1]["type"] == "close_stdin":
            break
    euro = "\u20ac".encode()
    conn.send(b"\x01" + euro[:1])
    conn.send(b"\x01" + euro[1:] + b"\xff")
    conn.send(b"\x02warn")
    conn.send(json.dumps({"type": "exit", "exit_code": 7}))


def _workspace_at(url: str) -> Workspace:
    return Workspace(Den(url, TOKEN), _ws_json("api"))


def test_exec_stream(stream_server: Callable[..., StreamServer]) -> None:
    srv = stream_server(_echo_script)
    out: list[str] = []
    err: list[str] = []
    code = _workspace_at(srv.url).exec_stream(
        ["cat"], cwd="/workspace", env={"A": "b"}, stdin=b"hello",
        on_stdout=out.append, on_stderr=err.append,
    )
    assert code == 7
    assert (out, err) == (["HELLO", "\u20ac\ufffd"], ["warn"])
    assert srv.received == [
        {"cmd": ["cat"], "tty": False, "binary": True, "cwd": "/workspace", "env": {"A": "b"}},
        b"hello",
        {"type": "close_stdin"},
    ]
    assert "permessage-deflate" not in srv.headers.get("Sec-WebSocket-Extensions", "")
    assert srv.headers["Authorization"] == f"Bearer {TOKEN}"
    assert srv.path == ["/api/v1/workspaces/id-api/exec/stream"]


def test_exec_stream_without_stdin_and_error(stream_server: Callable[..., StreamServer]) -> None:
    def script(conn: ServerConnection, received: list[Any]) -> None:
        received.append(json.loads(conn.recv()))
        conn.send(json.dumps({"type": "error",
                              "error": {"code": "not_running", "message": "workspace stopped"}}))

    srv = stream_server(script)
    with pytest.raises(DenAPIError) as info:
        _workspace_at(srv.url).exec_stream("ls -l")
    assert (info.value.code, info.value.message) == ("not_running", "workspace stopped")
    assert srv.received == [{"cmd": "ls -l", "tty": False, "binary": True},
                            {"type": "close_stdin"}]


def test_exec_stream_closed_early(stream_server: Callable[..., StreamServer]) -> None:
    srv = stream_server(lambda conn, received: None)
    with pytest.raises(DenAPIError) as info:
        _workspace_at(srv.url).exec_stream(["true"])
    assert info.value.code == "stream_closed"


def test_exec_stream_rejected(stream_server: Callable[..., StreamServer]) -> None:
    body = json.dumps({"error": {"code": "not_found", "message": "workspace api not found"}})
    srv = stream_server(lambda conn, received: None, reject=(404, body))
    with pytest.raises(DenAPIError) as info:
        _workspace_at(srv.url).exec_stream(["true"])
    assert (info.value.status, info.value.code) == (404, "not_found")


def test_exec_stream_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DenAPIError) as info:
        _workspace_at(f"http://127.0.0.1:{port}").exec_stream(["true"])
    assert (info.value.status, info.value.code) == (0, "unreachable")


def test_ws_url() -> None:
    assert _workspace_at("https://den.example/base").ws_url("exec/stream") == (
        "wss://den.example/base/api/v1/workspaces/id-api/exec/stream")
    assert _workspace_at("http://h:8080").ws_url("terminal").startswith("ws://h:8080/api/v1/")


# --- CLI --------------------------------------------------------------------------------------


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def cli(fake: FakeServer, clean_env: Path) -> Callable[..., int]:
    parser = argparse.ArgumentParser(prog="den")
    sub = parser.add_subparsers(dest="command", required=True)
    add_client_commands(sub, client_factory=lambda c: Den(c.url, c.token,
                                                          transport=fake.transport(),
                                                          poll_interval_s=0))

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        code: int = args.func(args)
        return code

    return run


@pytest.fixture
def logged_in(clean_env: Path) -> None:
    save_config(ClientConfig(URL, TOKEN))


def test_cli_login(cli: Callable[..., int], clean_env: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("login", URL + "/", "--token", TOKEN) == 0
    assert capsys.readouterr().out == f"Logged in to {URL} as alice\n"
    assert json.loads(clean_env.read_text()) == {"url": URL, "token": TOKEN}
    assert stat.S_IMODE(clean_env.stat().st_mode) == 0o600
    assert stat.S_IMODE(clean_env.parent.stat().st_mode) == 0o700


def test_cli_login_bad_token(cli: Callable[..., int], clean_env: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("login", URL, "--token", "wrong") == 1
    assert capsys.readouterr().err == "den: invalid token\n"
    assert not clean_env.exists()


def test_cli_login_requires_token_without_tty(cli: Callable[..., int],
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli("login", URL) == 2
    assert "--token is required" in capsys.readouterr().err


def test_cli_not_logged_in(cli: Callable[..., int], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("ls") == 1
    assert capsys.readouterr().err == "den: not logged in; run: den login URL --token TOKEN\n"


@pytest.mark.usefixtures("logged_in")
def test_cli_create(cli: Callable[..., int], fake: FakeServer,
                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("create", "https://forge/acme/api.git", "--branch", "dev", "--cpus", "2",
               "--memory-mb", "1024") == 0
    assert capsys.readouterr().out == "api running\n"
    body = json.loads(fake.last("POST", "/api/v1/workspaces").content)
    assert body["repo"] == {"url": "https://forge/acme/api.git", "branch": "dev"}
    assert body["resources"] == {"cpus": 2.0, "memory_mb": 1024}
    assert "devcontainer" not in body  # the server's default: build from it
    assert cli("create", "https://forge/acme/x.git", "--name", "web", "--image", "py",
               "--no-wait", "--no-devcontainer") == 0
    assert capsys.readouterr().out == "web creating\n"
    assert json.loads(fake.last("POST", "/api/v1/workspaces").content)["devcontainer"] is False


@pytest.mark.usefixtures("logged_in")
def test_cli_create_error(cli: Callable[..., int], fake: FakeServer,
                          capsys: pytest.CaptureFixture[str]) -> None:
    fake.create_states = ["error"]
    fake.create_reason = "clone failed"
    assert cli("create", "https://forge/acme/api.git") == 1
    assert capsys.readouterr().err == "den: clone failed\n"


@pytest.mark.usefixtures("logged_in")
def test_cli_ls(cli: Callable[..., int], fake: FakeServer,
                capsys: pytest.CaptureFixture[str]) -> None:
    fake.add("api")
    fake.add("frontend", "paused")
    assert cli("ls") == 0
    assert capsys.readouterr().out.splitlines() == [
        "NAME      STATE    REPO                             CREATED",
        "api       running  https://forge/acme/api.git       2024-05-01 12:30",
        "frontend  paused   https://forge/acme/frontend.git  2024-05-01 12:30",
    ]
    assert cli("ls", "--json") == 0
    assert [w["name"] for w in json.loads(capsys.readouterr().out)] == ["api", "frontend"]


@pytest.mark.usefixtures("logged_in")
def test_cli_exec(cli: Callable[..., int], fake: FakeServer,
                  capsys: pytest.CaptureFixture[str]) -> None:
    fake.add("api")
    fake.exec_reply = {"exit_code": 3, "stdout": "héllo\n", "stderr": "oops\n",
                       "timed_out": False, "duration_ms": 4}
    assert cli("exec", "api", "--", "ls", "-la", "--cwd", "x") == 3
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("héllo\n", "oops\n")
    assert json.loads(fake.last("POST", "/exec").content) == {"cmd": ["ls", "-la", "--cwd", "x"]}

    fake.exec_reply = {"exit_code": 0, "stdout": "", "stderr": "", "timed_out": False,
                       "duration_ms": 1}
    assert cli("exec", "--cwd", "/tmp", "api", "--", "pwd") == 0
    assert json.loads(fake.last("POST", "/exec").content) == {"cmd": ["pwd"], "cwd": "/tmp"}
    assert cli("exec", "api", "--timeout", "5", "--cwd", "sub", "--", "make", "-j2") == 0
    assert json.loads(fake.last("POST", "/exec").content) == {
        "cmd": ["make", "-j2"], "cwd": "sub", "timeout_s": 5.0}


@pytest.mark.usefixtures("logged_in")
def test_cli_exec_timeout_and_usage(cli: Callable[..., int], fake: FakeServer,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    fake.add("api")
    fake.exec_reply = {"exit_code": -9, "stdout": "", "stderr": "", "timed_out": True,
                       "duration_ms": 1000}
    assert cli("exec", "--timeout", "1", "api", "--", "sleep", "10") == 124
    assert capsys.readouterr().err == "den: command timed out after 1s\n"
    assert cli("exec", "api", "--", "sleep", "10") == 124
    assert capsys.readouterr().err == "den: command timed out\n"
    fake.exec_reply = {**fake.exec_reply, "timed_out": False}
    assert cli("exec", "api", "--", "kill-me") == 137
    assert cli("exec", "api") == 2
    assert "no command given" in capsys.readouterr().err


@pytest.mark.usefixtures("logged_in")
@pytest.mark.parametrize(("verb", "state"), [
    ("stop", "stopped"), ("start", "running"), ("pause", "paused"), ("resume", "running"),
])
def test_cli_lifecycle(cli: Callable[..., int], fake: FakeServer, verb: str, state: str,
                       capsys: pytest.CaptureFixture[str]) -> None:
    fake.add("api")
    assert cli(verb, "api") == 0
    assert capsys.readouterr().out == f"api {state}\n"
    assert fake.last("POST", f"/{verb}").url.path == f"/api/v1/workspaces/id-api/{verb}"


@pytest.mark.usefixtures("logged_in")
def test_cli_keepalive(cli: Callable[..., int], fake: FakeServer,
                       capsys: pytest.CaptureFixture[str]) -> None:
    fake.add("api", "paused")
    assert cli("keepalive", "api") == 0
    assert capsys.readouterr().out == "api keepalive until 2026-11-29 12:55:03 UTC\n"
    assert json.loads(fake.last("POST", "/keepalive").content) == {"ttl_s": 900}
    assert fake.workspaces["api"]["state"] == "running"
    assert cli("keepalive", "id-api", "--ttl", "3600") == 0
    assert capsys.readouterr().out == "api keepalive until 2026-11-29 13:40:03 UTC\n"
    assert cli("keepalive", "api", "--ttl", "0") == 0
    assert capsys.readouterr().out == "api keepalive ended\n"
    assert json.loads(fake.last("POST", "/keepalive").content) == {"ttl_s": 0}
    assert cli("keepalive", "api", "--ttl", "-5") == 1
    assert capsys.readouterr().err == f"den: ttl_s must be between 0 and {MAX_KEEPALIVE_S}\n"
    assert cli("keepalive", "nope") == 1
    assert capsys.readouterr().err == "den: workspace nope not found\n"


@pytest.mark.usefixtures("logged_in")
def test_cli_keepalive_prints_the_lease_end_in_utc(cli: Callable[..., int], fake: FakeServer,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    fake.add("api")
    fake.overrides[("POST", "/api/v1/workspaces/id-api/keepalive")] = httpx.Response(
        200, json={**fake.workspaces["api"], "keepalive_until": "2026-11-29T14:15:00+02:00"})
    assert cli("keepalive", "api") == 0
    assert capsys.readouterr().out == "api keepalive until 2026-11-29 12:15:00 UTC\n"


@pytest.mark.usefixtures("logged_in")
def test_cli_conflict_and_not_found(cli: Callable[..., int], fake: FakeServer,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    fake.add("api", "stopping")
    fake.overrides[("POST", "/api/v1/workspaces/id-api/start")] = _error(
        409, "conflict", "workspace api is stopping")
    assert cli("start", "api") == 1
    assert capsys.readouterr().err == "den: workspace api is stopping\n"
    assert cli("stop", "nope") == 1
    assert capsys.readouterr().err == "den: workspace nope not found\n"


@pytest.mark.usefixtures("logged_in")
def test_cli_rm(cli: Callable[..., int], fake: FakeServer, monkeypatch: pytest.MonkeyPatch,
                capsys: pytest.CaptureFixture[str]) -> None:
    fake.add("api")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli("rm", "api") == 1
    assert "refusing to delete api without --yes" in capsys.readouterr().err
    assert "api" in fake.workspaces

    monkeypatch.setattr("sys.stdin", _TTY("n\n"))
    assert cli("rm", "api") == 1
    assert "den: aborted" in capsys.readouterr().err
    assert "api" in fake.workspaces

    monkeypatch.setattr("sys.stdin", _TTY("yes\n"))
    assert cli("rm", "api") == 0
    assert capsys.readouterr().out == "api deleted\n"
    assert "api" not in fake.workspaces

    fake.add("web")
    assert cli("rm", "--yes", "web") == 0
    assert "web" not in fake.workspaces


@pytest.mark.usefixtures("logged_in")
def test_cli_events(cli: Callable[..., int], fake: FakeServer,
                    capsys: pytest.CaptureFixture[str]) -> None:
    fake.add("api")
    assert cli("events", "api") == 0
    assert capsys.readouterr().out.splitlines() == [
        "AT                KIND   STATE                ACTOR   MESSAGE",
        "2024-05-01 12:00  state  - -> creating        alice   created",
        "2024-05-01 12:01  state  creating -> running  system",
    ]
    assert cli("events", "api", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


@pytest.mark.usefixtures("logged_in")
def test_cli_rm_with_snapshots(cli: Callable[..., int], fake: FakeServer,
                               monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    fake.add_snapshot(fake.add("api"), "one")
    kept = fake.add_snapshot(fake.add("web"), "two")
    monkeypatch.setattr("sys.stdin", _TTY("y\n"))
    assert cli("rm", "api", "--snapshots") == 0
    captured = capsys.readouterr()
    assert "Delete workspace api, its disk and its snapshots?" in captured.err
    assert captured.out == "api deleted\n"
    assert fake.last("DELETE", "/id-api").url.params["snapshots"] == "true"
    assert list(fake.snapshots) == [kept["id"]]
    assert cli("rm", "-y", "web") == 0
    assert "snapshots" not in fake.last("DELETE", "/id-web").url.params
    assert fake.snapshots[kept["id"]]["workspace_id"] is None


@pytest.mark.usefixtures("logged_in")
def test_cli_snapshot(cli: Callable[..., int], fake: FakeServer,
                      monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    fake.add("api")
    assert cli("snapshot", "api", "--name", "before") == 0
    (sid,) = fake.snapshots
    assert capsys.readouterr().out == f"{sid}\n"
    assert json.loads(fake.last("POST", "/snapshots").content) == {"name": "before",
                                                                   "memory": False}

    class _Clock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> _Clock:
            return cls(2026, 11, 29, 14, 5, 59, tzinfo=UTC)

    monkeypatch.setattr("server.client.commands.datetime", _Clock)
    assert cli("snapshot", "id-api", "--memory") == 0
    assert json.loads(fake.last("POST", "/snapshots").content) == {"name": "20261129-1405",
                                                                   "memory": True}
    assert capsys.readouterr().out.strip() in fake.snapshots

    fake.workspaces["api"]["state"] = "stopped"
    assert cli("snapshot", "api", "--memory") == 1
    assert capsys.readouterr().err == (
        "den: workspace is stopped; a memory snapshot needs it running or paused\n")
    assert cli("snapshot", "nope") == 1
    assert capsys.readouterr().err == "den: workspace nope not found\n"


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 1024**2, "5.0 MiB"),
    (3 * 1024**4, "3072.0 GiB"),
])
def test_size(n: int, text: str) -> None:
    assert _size(n) == text


@pytest.mark.usefixtures("logged_in")
def test_cli_snapshots(cli: Callable[..., int], fake: FakeServer,
                       capsys: pytest.CaptureFixture[str]) -> None:
    api = fake.add("api")
    fake.add_snapshot(api, "before", size_bytes=123456789)
    fake.add_snapshot(api, "with-tmux", memory=True, size_bytes=2 * 1024**3 + 1)
    fake.add_snapshot(fake.add("web"), "other")
    assert cli("snapshots", "api") == 0
    assert capsys.readouterr().out.splitlines() == [
        "ID              NAME       MEMORY  SIZE       CREATED",
        "sn000000000001  before     no      117.7 MiB  2026-11-29 14:05",
        "sn000000000002  with-tmux  yes     2.0 GiB    2026-11-29 14:05",
    ]
    assert cli("snapshots", "api", "--json") == 0
    assert [s["name"] for s in json.loads(capsys.readouterr().out)] == ["before", "with-tmux"]
    fake.add("empty")
    assert cli("snapshots", "empty") == 0
    assert capsys.readouterr().out == "ID  NAME  MEMORY  SIZE  CREATED\n"


@pytest.mark.usefixtures("logged_in")
def test_cli_fork(cli: Callable[..., int], fake: FakeServer,
                  capsys: pytest.CaptureFixture[str]) -> None:
    snap = fake.add_snapshot(fake.add("api"), "before")
    assert cli("fork", snap["id"], "--name", "trial") == 0
    assert capsys.readouterr().out == "trial running\n"
    assert json.loads(fake.last("POST", "/api/v1/workspaces").content) == {
        "from_snapshot": snap["id"], "name": "trial"}
    assert cli("fork", snap["id"], "--name", "quick", "--no-wait") == 0
    assert capsys.readouterr().out == "quick creating\n"
    assert cli("fork", "sngone", "--name", "x") == 1
    assert capsys.readouterr().err == "den: no snapshot 'sngone'\n"
    with pytest.raises(SystemExit):  # --name is required
        cli("fork", snap["id"])


@pytest.mark.usefixtures("logged_in")
def test_cli_restore_and_rm_snapshot(cli: Callable[..., int], fake: FakeServer,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    snap = fake.add_snapshot(fake.add("api", "paused"), "before")
    assert cli("restore", snap["id"]) == 0
    assert capsys.readouterr().out == "api running\n"
    assert fake.last("POST", "/restore").url.path == f"/api/v1/snapshots/{snap['id']}/restore"
    assert cli("rm-snapshot", snap["id"]) == 0
    assert capsys.readouterr().out == f"{snap['id']} deleted\n"
    assert fake.snapshots == {}
    assert cli("rm-snapshot", snap["id"]) == 1
    assert capsys.readouterr().err == f"den: no snapshot '{snap['id']}'\n"

    gone = fake.add_snapshot(fake.add("web"), "old")
    gone["workspace_id"] = None  # its workspace was deleted
    assert cli("restore", gone["id"]) == 1
    assert capsys.readouterr().err == (
        "den: the snapshot's workspace is deleted; fork the snapshot instead\n")


def test_cli_unreachable(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_config(ClientConfig(URL, TOKEN))
    parser = argparse.ArgumentParser(prog="den")
    sub = parser.add_subparsers(dest="command", required=True)
    add_client_commands(sub, client_factory=lambda c: Den(
        c.url, c.token, transport=_raising(httpx.ConnectError("refused"))))
    args = parser.parse_args(["ls"])
    assert args.func(args) == 1
    assert capsys.readouterr().err.startswith(f"den: cannot reach Den at {URL}")


# --- ssh verbs --------------------------------------------------------------------------------

_SSH = {"host": "0.0.0.0", "port": 2222, "user": "api", "command": "ssh -p 2222 api@0.0.0.0"}


def test_cli_ssh_runs_openssh_with_the_gateway_address(
        cli: Callable[..., int], fake: FakeServer, logged_in: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake.add("api", ssh=_SSH)
    ran: list[list[str]] = []
    monkeypatch.setattr("os.execvp", lambda file, argv: ran.append(list(argv)))
    assert cli("ssh", "api") == 0
    assert cli("ssh", "-i", "/k", "api", "--", "ls", "-la") == 0
    assert ran == [["ssh", "-p", "2222", "--", "api@den.test"],
                   ["ssh", "-p", "2222", "-i", "/k", "--", "api@den.test", "ls", "-la"]]


def test_cli_ssh_with_the_gateway_off(cli: Callable[..., int], fake: FakeServer,
                                      logged_in: None, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    fake.add("api")
    assert cli("ssh", "api") == 1
    assert "SSH gateway is off" in capsys.readouterr().err


def test_cli_ssh_config(cli: Callable[..., int], fake: FakeServer, logged_in: None,
                        capsys: pytest.CaptureFixture[str]) -> None:
    fake.add("api", ssh=_SSH)
    fake.add("web", ssh={**_SSH, "user": "web", "host": "ssh.example"})
    assert cli("ssh-config") == 0
    out = capsys.readouterr().out
    assert "Host den-api\n  HostName den.test\n  Port 2222\n  User api\n" in out
    assert "Host den-web\n  HostName ssh.example\n  Port 2222\n  User web\n" in out


def test_cli_ssh_key_add_ls_rm(cli: Callable[..., int], fake: FakeServer, logged_in: None,
                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = {"id": 7, "name": "laptop", "type": "ssh-ed25519", "fingerprint": "SHA256:abc",
           "public_key": "ssh-ed25519 AAAA", "created_at": "2024-05-01T00:00:00Z",
           "last_used_at": None}
    path = "/api/v1/users/me/ssh-keys"
    challenge = "den-ssh-key:1:99:abc:def"
    fake.overrides[("POST", path + "/challenge")] = httpx.Response(
        200, json={"challenge": challenge, "namespace": "den-ssh-key",
                   "expires_at": "2024-05-01T00:00:00Z", "command": "x"})
    fake.overrides[("POST", path)] = httpx.Response(201, json=key)
    fake.overrides[("GET", path)] = httpx.Response(200, json={"ssh_keys": [key]})
    fake.overrides[("DELETE", path + "/7")] = httpx.Response(204)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "laptop",
                    "-f", str(tmp_path / "id")], check=True)
    pub = tmp_path / "id.pub"
    assert cli("ssh-key", "add", str(pub)) == 0
    assert capsys.readouterr().out == "7 SHA256:abc laptop\n"
    sent = json.loads(fake.requests[-1].content)
    assert sent["public_key"] == pub.read_text() and sent["challenge"] == challenge
    # signed with the private key next to the .pub file, as ssh-keygen -Y sign does
    assert proof.verify(asyncssh.read_public_key(str(pub)), sent["signature"],
                        challenge.encode())
    assert cli("ssh-key", "ls") == 0
    listed = capsys.readouterr()
    assert "SHA256:abc" in listed.out and "UNVERIFIED" in listed.out  # no "verified": old
    assert "added before Den asked for proof" in listed.err
    assert cli("ssh-key", "rm", "7") == 0
    assert fake.requests[-1].method == "DELETE"
    assert cli("ssh-key", "add", str(tmp_path / "missing.pub")) == 1
    assert "cannot read" in capsys.readouterr().err


def test_cli_net_shows_and_sets_the_policy(cli: Callable[..., int], fake: FakeServer,
                                           logged_in: None,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    fake.add("api", network={"mode": "internet", "allow": []})
    assert cli("net", "api") == 0
    assert capsys.readouterr().out == "api network internet\n"
    assert cli("net", "api", "allowlist", "--allow", "203.0.113.0/24", "--allow",
               "198.51.100.7:443") == 0
    assert json.loads(fake.last("PATCH", "/id-api").content) == {"network": {
        "mode": "allowlist", "allow": ["203.0.113.0/24", "198.51.100.7:443"]}}
    assert capsys.readouterr().out == (
        "api network allowlist allow 203.0.113.0/24 198.51.100.7:443\n")
    assert cli("net", "api", "--allow", "203.0.113.1") == 2
    assert "--allow goes with the mode allowlist" in capsys.readouterr().err
    assert cli("create", "https://forge.example/a/web.git", "--network", "none") == 0
    assert json.loads(fake.last("POST", "/workspaces").content)["network"] == {
        "mode": "none", "allow": []}


# --- preview ports ---------------------------------------------------------------------------

PORTS = "/api/v1/workspaces/id-api/ports"
LISTED = [
    {"port": 5173, "listening": True, "share": "private",
     "url": "https://5173--api--alice.p.test/", "path_url": "https://den.test/preview/ws1/5173/"},
    {"port": 8000, "listening": False, "share": "public", "url": None,
     "path_url": "https://den.test/preview/ws1/8000/"},
]


@pytest.mark.usefixtures("logged_in")
def test_cli_ports(cli: Callable[..., int], fake: FakeServer,
                   capsys: pytest.CaptureFixture[str]) -> None:
    fake.add("api")
    fake.overrides[("GET", PORTS)] = httpx.Response(200, json={"ports": LISTED})
    assert cli("ports", "api") == 0
    assert capsys.readouterr().out.splitlines() == [
        "PORT  LISTENING  SHARE    URL",
        "5173  yes        private  https://5173--api--alice.p.test/",
        "8000  no         public   https://den.test/preview/ws1/8000/",
    ]
    assert cli("ports", "api", "--json") == 0
    assert json.loads(capsys.readouterr().out) == LISTED


@pytest.mark.usefixtures("logged_in")
def test_cli_share(cli: Callable[..., int], fake: FakeServer,
                   capsys: pytest.CaptureFixture[str]) -> None:
    fake.add("api")
    fake.overrides[("PUT", f"{PORTS}/8000")] = httpx.Response(200, json={
        **LISTED[1], "share": "users", "listening": None})
    assert cli("share", "api", "8000", "--users") == 0
    assert json.loads(fake.last("PUT", "/ports/8000").content) == {"share": "users"}
    assert capsys.readouterr().out == \
        "api port 8000: users  https://den.test/preview/ws1/8000/\n"
    for flag, level in (("--public", "public"), ("--private", "private")):
        assert cli("share", "api", "8000", flag) == 0
        assert json.loads(fake.last("PUT", "/ports/8000").content) == {"share": level}
    fake.overrides[("POST", f"{PORTS}/8000/links")] = httpx.Response(201, json={
        "id": "lk1", "url": None,
        "path_url": "https://den.test/preview/ws1/8000/?den_share=t.m",
        "expires_at": "2026-12-06T22:00:00Z"})
    capsys.readouterr()
    assert cli("share", "api", "8000", "--link", "600") == 0
    assert json.loads(fake.last("POST", "/ports/8000/links").content) == {"ttl_s": 600}
    out = capsys.readouterr()
    assert out.out == "https://den.test/preview/ws1/8000/?den_share=t.m\n"
    assert out.err == ("link lk1, valid until 2026-12-06 22:00:00 UTC; "
                       "den share api 8000 --revoke lk1 ends it\n")
    fake.overrides[("GET", f"{PORTS}/8000/links")] = httpx.Response(200, json={"links": [
        {"id": "lk1", "port": 8000, "created_by": "alice",
         "created_at": "2026-12-06T21:00:00Z", "expires_at": "2026-12-06T22:00:00Z"}]})
    assert cli("share", "api", "8000", "--links") == 0
    assert capsys.readouterr().out.splitlines() == [
        "LINK  MADE BY  MADE                     EXPIRES",
        "lk1   alice    2026-12-06 21:00:00 UTC  2026-12-06 22:00:00 UTC",
    ]
    fake.overrides[("DELETE", f"{PORTS}/8000/links/lk1")] = httpx.Response(204)
    assert cli("share", "api", "8000", "--revoke", "lk1") == 0
    assert fake.last("DELETE", "/ports/8000/links/lk1") is not None
    assert capsys.readouterr().out == "api port 8000: share link lk1 revoked\n"
    fake.overrides[("DELETE", f"{PORTS}/8000/links/lk2")] = httpx.Response(404, json={
        "error": {"code": "not_found", "message": "no live share link 'lk2'"}})
    assert cli("share", "api", "8000", "--revoke", "lk2") == 1
    assert capsys.readouterr().err == "den: no live share link 'lk2'\n"
    fake.overrides[("PUT", f"{PORTS}/8000")] = httpx.Response(403, json={"error": {
        "code": "public_sharing_off", "message": "public sharing is turned off"}})
    assert cli("share", "api", "8000", "--public") == 1
    assert capsys.readouterr().err == "den: public sharing is turned off\n"
    with pytest.raises(SystemExit):  # a level is required, and only one
        cli("share", "api", "8000")
    with pytest.raises(SystemExit):
        cli("share", "api", "8000", "--public", "--users")


@pytest.mark.usefixtures("logged_in")
def test_cli_create_with_gpus(cli: Callable[..., int], fake: FakeServer) -> None:
    assert cli("create", "https://forge/acme/api.git", "--gpus", "1", "--gpu-model",
               "A100") == 0
    body = json.loads(fake.last("POST", "/api/v1/workspaces").content)
    assert body["resources"] == {"gpus": 1, "gpu_model": "A100"}


GPUS_ADMIN = {"total": 2, "free": 1, "idle_action": "stop",
              "models": [{"model": "NVIDIA A100-SXM4-40GB", "total": 1, "free": 1},
                         {"model": "NVIDIA L4", "total": 1, "free": 0}],
              "gpus": [{"uuid": "GPU-aaaa", "index": 0, "model": "NVIDIA A100-SXM4-40GB",
                        "memory_mb": 40960, "device": "/dev/nvidia0", "held_by": None,
                        "utilization_percent": None},
                       {"uuid": "GPU-bbbb", "index": 1, "model": "NVIDIA L4",
                        "memory_mb": 23034, "device": "/dev/nvidia1",
                        "held_by": {"workspace_id": "w1", "workspace": "api",
                                    "owner": "alice"},
                        "utilization_percent": 93}]}


@pytest.mark.usefixtures("logged_in")
def test_cli_gpus(cli: Callable[..., int], fake: FakeServer,
                  capsys: pytest.CaptureFixture[str]) -> None:
    fake.overrides[("GET", "/api/v1/gpus")] = httpx.Response(200, json=GPUS_ADMIN)
    assert cli("gpus") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["INDEX", "UUID", "MODEL", "HELD", "BY", "UTIL"]
    assert out[2].split() == ["1", "GPU-bbbb", "NVIDIA", "L4", "alice/api", "93%"]
    assert out[-1] == "1 of 2 free; an idle GPU workspace is stopped"
    fake.overrides[("GET", "/api/v1/gpus")] = httpx.Response(
        200, json={**GPUS_ADMIN, "gpus": None})
    assert cli("gpus") == 0
    assert capsys.readouterr().out.splitlines()[2].split() == ["NVIDIA", "L4", "0", "1"]
    fake.overrides[("GET", "/api/v1/gpus")] = httpx.Response(
        200, json={"total": 0, "free": 0, "models": [], "idle_action": "stop", "gpus": None})
    assert cli("gpus") == 0
    assert capsys.readouterr().out == "this server has no GPUs\n"
    fake.overrides[("POST", "/api/v1/gpus/GPU-bbbb/reclaim")] = httpx.Response(
        200, json={**GPUS_ADMIN["gpus"][1], "held_by": None})  # type: ignore[index]
    assert cli("gpus", "--reclaim", "GPU-bbbb") == 0
    assert capsys.readouterr().out.startswith("GPU-bbbb: free")
