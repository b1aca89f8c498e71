"""The HTTP API on the fake runtime: auth, input validation, isolation between users, tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from starlette.websockets import WebSocketDisconnect

from tests.conftest import ApiClient

WS = "/api/v1/workspaces"


def assert_error(r: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    # limit and value: which per-user limit a quota_exceeded passed
    assert {"code", "message"} <= set(body["error"]) <= {"code", "message", "limit", "value"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]  # type: ignore[no-any-return]


@pytest.fixture
def running(fake_api: ApiClient, make_repo: Callable[..., Path]) -> dict[str, Any]:
    """Alice's running workspace "api"."""
    ws = fake_api.create(make_repo("api"), name="api")
    assert ws["state"] == "running", ws
    return ws


# --- authentication -------------------------------------------------------------------------


BAD_AUTH = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer den_not-a-real-token"},
    {"Authorization": "Bearer not-even-den-shaped"},
    {"Authorization": "Bearer den_" + "x" * 300},
    {"Authorization": "Basic YWxpY2U6cHc="},
    {"Authorization": "Token den_whatever"},
]


def test_requests_without_a_valid_token_are_401(fake_api: ApiClient) -> None:
    for headers in BAD_AUTH:
        for path in (WS, "/api/v1/users/me", "/api/v1/users/me/tokens", f"{WS}/api"):
            assert_error(fake_api.client.get(path, headers=headers), 401, "unauthorized")
        r = fake_api.client.post(WS, headers=headers, json={"repo": {"url": "x"}})
        assert_error(r, 401, "unauthorized")


def test_a_token_of_another_user_is_not_accepted_with_a_changed_character(
        fake_api: ApiClient) -> None:
    token = fake_api.tokens["alice"]
    forged = token[:-1] + ("A" if token[-1] != "A" else "B")
    r = fake_api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {forged}"})
    assert_error(r, 401, "unauthorized")


def test_me(fake_api: ApiClient) -> None:
    assert fake_api.get("/api/v1/users/me").json()["name"] == "alice"
    assert fake_api.get("/api/v1/users/me", user="root").json()["is_admin"] is True
    assert fake_api.get("/api/v1/users/me", user="bob").json()["is_admin"] is False
    r = fake_api.client.get("/api/v1/users/me",
                            headers={"Authorization": f"bearer {fake_api.tokens['bob']}"})
    assert r.json()["name"] == "bob"


# --- input validation -----------------------------------------------------------------------


def test_malformed_json_is_422_invalid(fake_api: ApiClient) -> None:
    r = fake_api.client.post(WS, content=b'{"name": "x", "repo": ', headers={
        **fake_api.h(), "Content-Type": "application/json"})
    assert_error(r, 422, "invalid")


def test_a_body_that_is_not_an_object_is_422(fake_api: ApiClient) -> None:
    assert_error(fake_api.post(WS, json=["name"]), 422, "invalid")
    assert_error(fake_api.post(WS, json={}), 422, "invalid")


def test_unknown_fields_are_422(fake_api: ApiClient) -> None:
    for body in (
        {"name": "x", "repo": {"url": "https://f/a.git"}, "colour": "blue"},
        {"name": "x", "repo": {"url": "https://f/a.git", "depth": 1}},
        {"name": "x", "repo": {"url": "https://f/a.git"}, "resources": {"disk": 3}},
    ):
        err = assert_error(fake_api.post(WS, json=body), 422, "invalid")
        assert "xtra" in err["message"] or "not permitted" in err["message"], body


BAD_CREATES: list[tuple[dict[str, Any], int, str, str]] = [
    ({"name": "Bad_Name"}, 422, "invalid", "workspace name"),
    ({"name": "-x"}, 422, "invalid", "workspace name"),
    ({"name": "x" * 41}, 422, "invalid", "workspace name"),
    ({"name": "x" * 65}, 422, "invalid", "name"),
    ({"resources": {"cpus": 1000}}, 422, "invalid", "cpus"),
    ({"resources": {"cpus": -1}}, 422, "invalid", "cpus"),
    ({"resources": {"memory_mb": 1}}, 422, "invalid", "memory_mb"),
    ({"resources": {"memory_mb": 10**9}}, 422, "invalid", "memory_mb"),
    ({"resources": {"disk_gb": 0}}, 422, "invalid", "disk_gb"),
    ({"resources": {"cpus": "lots"}}, 422, "invalid", "cpus"),
    ({"resources": {"gpus": 1}}, 422, "no_gpus", "no GPUs"),
    ({"resources": {"gpus": 8}}, 422, "no_gpus", "no GPUs"),
    ({"resources": {"gpu_model": "A100"}}, 422, "invalid", "gpu_model"),
    ({"resources": {"gpus": -1}}, 422, "invalid", "gpus"),
    ({"runtime": "runc"}, 422, "invalid", "runc"),
    ({"image": "docker.io/evil:latest"}, 422, "invalid", "image"),
    ({"env": {"BAD NAME": "x"}}, 422, "invalid", "env"),
    ({"idle_timeout_s": -5}, 422, "invalid", "idle_timeout_s"),
    ({"repo": {"url": "ext::sh -c touch% /tmp/pwned"}}, 422, "invalid", "transport"),
    ({"repo": {"url": "--upload-pack=touch /tmp/pwned"}}, 422, "invalid", "'-'"),
    ({"repo": {"url": "http://forge.example/a.git"}}, 422, "invalid", "scheme"),
    ({"repo": {"url": "https://u:pw@forge.example/a.git"}}, 422, "invalid", "password"),
    ({"repo": {"url": "/etc"}}, 422, "invalid", "outside the allowed roots"),
]


def test_bad_create_requests_are_clear_4xx(fake_api: ApiClient, make_repo: Callable[..., Path],
                                           fake_runtime: Any) -> None:
    repo = str(make_repo())
    for extra, status, code, words in BAD_CREATES:
        body = {"name": "api", "repo": {"url": repo}, **extra}
        err = assert_error(fake_api.post(WS, json=body), status, code)
        assert words in err["message"], (extra, err)
    assert fake_api.get(WS).json()["workspaces"] == []
    assert fake_runtime.containers == {}
    assert "create" not in fake_runtime.calls


def test_create_of_a_taken_name_is_409(fake_api: ApiClient, running: dict[str, Any],
                                       make_repo: Callable[..., Path]) -> None:
    body = {"name": "api", "repo": {"url": str(make_repo("other"))}}
    assert_error(fake_api.post(WS, json=body), 409, "name_taken")


# --- create, read, lifecycle on the fake -------------------------------------------------------


def test_create_read_stop_start_delete(fake_api: ApiClient, make_repo: Callable[..., Path],
                                       fake_runtime: Any) -> None:
    r = fake_api.post(WS, json={"name": "api", "repo": {"url": str(make_repo())}})
    assert r.status_code == 202
    assert r.json()["state"] == "creating"
    ws = fake_api.wait_state(r.json()["id"])
    assert ws["state"] == "running"
    assert ws["owner"] == "alice"
    assert ws["repo"]["path"] == "/workspace/api"
    assert ws["repo"]["branch"] == "main"
    assert fake_api.get(f"{WS}/api").json()["id"] == ws["id"]

    assert fake_api.post(f"{WS}/api/stop").json()["state"] == "stopped"
    again = fake_api.post(f"{WS}/api/stop")
    assert (again.status_code, again.json()["state"]) == (200, "stopped")
    assert fake_api.post(f"{WS}/api/start").json()["state"] == "running"
    assert fake_api.post(f"{WS}/api/start").status_code == 200

    out = fake_api.exec(ws["id"], ["echo", "hi"])
    assert (out["exit_code"], out["stdout"], out["stderr"]) == (0, "hi\n", "")

    events = fake_api.get(f"{WS}/api/events").json()["events"]
    assert [(e["from_state"], e["to_state"]) for e in events if e["kind"] == "state"] == [
        (None, "creating"), ("creating", "running"), ("running", "stopping"),
        ("stopping", "stopped"), ("stopped", "starting"), ("starting", "running")]

    assert fake_api.delete(f"{WS}/api").status_code == 204
    assert_error(fake_api.get(f"{WS}/{ws['id']}"), 404, "not_found")
    assert fake_runtime.containers == {} and fake_runtime.volumes == {}


def test_lifecycle_during_a_transition_is_409(fake_api: ApiClient,
                                              running: dict[str, Any]) -> None:
    svc = fake_api.app.state.workspaces
    with svc.sessions.begin() as s:
        s.execute(text("UPDATE workspaces SET state='stopping' WHERE id=:id"),
                  {"id": running["id"]})
    assert_error(fake_api.post(f"{WS}/api/start"), 409, "conflict")
    assert_error(fake_api.post(f"{WS}/api/stop"), 409, "conflict")
    assert_error(fake_api.post(f"{WS}/api/exec", json={"cmd": "true"}), 409, "conflict")
    assert fake_api.get(f"{WS}/api").json()["state"] == "stopping"


def test_bad_exec_requests_are_422(fake_api: ApiClient, running: dict[str, Any],
                                   fake_runtime: Any) -> None:
    url = f"{WS}/api/exec"
    for body, words in [
        ({"cmd": ""}, "empty"),
        ({"cmd": "   "}, "empty"),
        ({"cmd": []}, "empty"),
        ({"cmd": [""]}, "empty"),
        ({"cmd": ["echo", "a\u0000b"]}, "NUL"),
        ({"cmd": "true", "timeout_s": 0}, "timeout_s"),
        ({"cmd": "true", "timeout_s": -1}, "timeout_s"),
        ({"cmd": "true", "timeout_s": 10**9}, "timeout_s"),
        ({"cmd": "true", "env": {"A B": "x"}}, "env"),
        ({"cmd": "true", "user": "root"}, "user"),
        ({"cmd": 42}, "cmd"),
        ({}, "cmd"),
    ]:
        err = assert_error(fake_api.post(url, json=body), 422, "invalid")
        assert words in err["message"], (body, err)
    assert "exec" not in fake_runtime.calls


def test_exec_runs_in_the_repo_directory(fake_api: ApiClient, running: dict[str, Any]) -> None:
    assert fake_api.exec(running["id"], "pwd")["stdout"] == "/workspace/api\n"
    assert fake_api.exec(running["id"], ["pwd"], cwd="src")["stdout"] == "/workspace/api/src\n"
    assert fake_api.exec(running["id"], ["cat"], stdin="in")["stdout"] == "in"
    out = fake_api.exec(running["id"], "exit 3")
    assert out["exit_code"] == 3


def test_engine_down_is_503(fake_api: ApiClient, make_repo: Callable[..., Path],
                            fake_runtime: Any) -> None:
    fake_runtime.available = False
    r = fake_api.post(WS, json={"name": "api", "repo": {"url": str(make_repo())}})
    assert_error(r, 503, "runtime_unavailable")
    assert fake_api.get(WS).json()["workspaces"] == []


def test_delete_of_a_workspace_already_being_deleted_is_202(
        fake_api: ApiClient, running: dict[str, Any]) -> None:
    with fake_api.app.state.sessions.begin() as s:
        s.execute(text("UPDATE workspaces SET state='deleting' WHERE id=:id"),
                  {"id": running["id"]})
    assert fake_api.delete(f"{WS}/api").status_code == 202
    assert fake_api.get(f"{WS}/api").json()["state"] == "deleting"


def test_create_failure_shows_the_reason(fake_api: ApiClient, make_repo: Callable[..., Path],
                                         fake_runtime: Any) -> None:
    from server.runtime.errors import EngineError

    fake_runtime.fail_next["start"] = EngineError("boom")
    ws = fake_api.create(make_repo())
    assert ws["state"] == "error"
    assert "boom" in ws["state_reason"]
    assert fake_runtime.containers == {} and fake_runtime.volumes == {}


def test_workspace_limit_is_409(make_settings: Callable[..., Any],
                                make_repo: Callable[..., Path]) -> None:
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.auth.tokens import ensure_user, issue_token
    from server.runtime.fake import FakeRuntime

    app = create_app(make_settings(max_workspaces_per_user=1), runtime=FakeRuntime())
    with TestClient(app) as client:
        with app.state.sessions.begin() as s:
            token = issue_token(s, ensure_user(s, "carol"))[1]
        api = ApiClient(client, {"carol": token})
        repo = make_repo()
        api.create(repo, name="one", user="carol")
        r = api.post(WS, user="carol", json={"name": "two", "repo": {"url": str(repo)}})
        body = assert_error(r, 409, "quota_exceeded")
        assert (body["limit"], body["value"]) == ("workspaces", 1)


# --- isolation between users -----------------------------------------------------------------


def _requests(ref: str) -> list[tuple[str, str, dict[str, Any]]]:
    base = f"{WS}/{ref}"
    return [
        ("GET", base, {}),
        ("GET", f"{base}/events", {}),
        ("POST", f"{base}/exec", {"json": {"cmd": ["echo", "hi"]}}),
        ("GET", f"{base}/files", {"params": {"path": "api/README.md"}}),
        ("GET", f"{base}/files/list", {"params": {"path": "api"}}),
        ("PUT", f"{base}/files", {"params": {"path": "api/x.txt"}, "content": b"x"}),
        ("DELETE", f"{base}/files", {"params": {"path": "api/README.md"}}),
        ("GET", f"{base}/files/stat", {"params": {"path": "api/README.md"}}),
        ("POST", f"{base}/files/mkdir", {"params": {"path": "api/new", "parents": "true"}}),
        ("POST", f"{base}/files/rename", {"json": {"from": "api/README.md", "to": "x.md"}}),
        ("POST", f"{base}/start", {}),
        ("POST", f"{base}/stop", {}),
        ("DELETE", base, {}),
    ]


@pytest.mark.parametrize("by", ["id", "name"])
def test_another_user_gets_404_on_every_endpoint(fake_api: ApiClient, running: dict[str, Any],
                                                 fake_runtime: Any, by: str) -> None:
    ref = running["id"] if by == "id" else running["name"]
    events_before = fake_api.get(f"{WS}/{ref}/events").json()["events"]
    calls_before = list(fake_runtime.calls)
    missing = "wsffffffffffff" if by == "id" else "nope"
    for method, url, kw in _requests(ref):
        r = fake_api.client.request(method, url, headers=fake_api.h("bob"), **kw)
        assert_error(r, 404, "not_found")
        # indistinguishable from a workspace that does not exist
        absent = fake_api.client.request(method, url.replace(f"{WS}/{ref}", f"{WS}/{missing}"),
                                         headers=fake_api.h("bob"), **kw)
        assert r.text == absent.text.replace(missing, ref)
    with fake_api.client.websocket_connect(f"{WS}/{ref}/exec/stream",
                                           headers=fake_api.h("bob")) as ws:
        ws.send_json({"cmd": ["echo", "hi"]})
        msg = ws.receive_json()
        assert msg["type"] == "error"
        assert msg["error"]["code"] == "not_found"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4404

    # nothing of alice's changed, and the engine was not touched on bob's behalf
    after = fake_api.get(f"{WS}/{ref}")
    assert after.json()["state"] == "running"
    assert fake_api.get(f"{WS}/{ref}/events").json()["events"] == events_before
    assert [c for c in fake_runtime.calls[len(calls_before):] if c != "status"] == []

    # the same requests from alice reach the workspace (none is a 404), delete last
    for method, url, kw in _requests(ref):
        r = fake_api.client.request(method, url, headers=fake_api.h("alice"), **kw)
        assert r.status_code != 404, (method, url, r.text)
    assert fake_api.get(WS).json()["workspaces"] == []


def test_websocket_exec_stream_for_the_owner(fake_api: ApiClient,
                                             running: dict[str, Any]) -> None:
    with fake_api.client.websocket_connect(f"{WS}/api/exec/stream",
                                           headers=fake_api.h()) as ws:
        ws.send_json({"cmd": ["echo", "hi"]})
        assert ws.receive_json() == {"type": "stdout", "data": "hi\n"}
        assert ws.receive_json() == {"type": "exit", "exit_code": 0}


def test_websocket_without_a_token_is_refused(fake_api: ApiClient,
                                              running: dict[str, Any]) -> None:
    with fake_api.client.websocket_connect(f"{WS}/api/exec/stream") as ws:
        msg = ws.receive_json()
        assert msg["type"] == "error"
        assert msg["error"]["code"] == "unauthorized"


def test_websocket_bad_first_message_is_invalid(fake_api: ApiClient,
                                                running: dict[str, Any]) -> None:
    with fake_api.client.websocket_connect(f"{WS}/api/exec/stream",
                                           headers=fake_api.h()) as ws:
        ws.send_json({"cmd": ["echo"], "shell": True})
        msg = ws.receive_json()
        assert (msg["type"], msg["error"]["code"]) == ("error", "invalid")


def test_a_nonexistent_workspace_is_404_like_another_users(fake_api: ApiClient) -> None:
    for method, url, kw in _requests("nope"):
        r = fake_api.client.request(method, url, headers=fake_api.h("alice"), **kw)
        assert_error(r, 404, "not_found")


def test_admin_sees_every_workspace(fake_api: ApiClient, running: dict[str, Any]) -> None:
    r = fake_api.get(f"{WS}/{running['id']}", user="root")
    assert r.status_code == 200
    assert r.json()["owner"] == "alice"
    listed = fake_api.get(WS, user="root").json()["workspaces"]
    assert [w["id"] for w in listed] == [running["id"]]
    events = fake_api.get(f"{WS}/{running['id']}/events", user="root")
    assert events.status_code == 200


def test_list_shows_only_your_own(fake_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    repo = make_repo()
    mine = fake_api.create(repo, name="mine", user="alice")
    theirs = fake_api.create(repo, name="theirs", user="bob")
    assert [w["id"] for w in fake_api.get(WS).json()["workspaces"]] == [mine["id"]]
    assert [w["id"] for w in fake_api.get(WS, user="bob").json()["workspaces"]] == [
        theirs["id"]]
    assert {w["id"] for w in fake_api.get(WS, user="root").json()["workspaces"]} == {
        mine["id"], theirs["id"]}


# --- tokens ------------------------------------------------------------------------------------


def test_tokens_are_shown_once_stored_hashed_and_revocable(fake_api: ApiClient) -> None:
    r = fake_api.post("/api/v1/users/me/tokens", json={"name": "laptop"})
    assert r.status_code == 201
    created = r.json()
    token = created["token"]
    assert token.startswith("den_") and len(token) > 40
    assert created["name"] == "laptop"

    me = fake_api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"})
    assert me.json()["name"] == "alice"

    listed = fake_api.get("/api/v1/users/me/tokens")
    assert token not in listed.text
    rows = listed.json()["tokens"]
    assert all("token" not in t for t in rows)
    assert created["id"] in [t["id"] for t in rows]
    assert [t["name"] for t in rows if t["id"] == created["id"]] == ["laptop"]
    assert created["id"] not in [t["id"] for t in
                                 fake_api.get("/api/v1/users/me/tokens", user="bob")
                                 .json()["tokens"]]

    with fake_api.app.state.sessions() as s:
        raw = [tuple(row) for row in s.execute(text("SELECT * FROM api_tokens"))]
        hashes = list(s.scalars(text("SELECT token_hash FROM api_tokens WHERE id=:id"),
                                {"id": created["id"]}))
    assert raw
    assert not any(token in str(v) for row in raw for v in row)
    assert hashes == [hashlib.sha256(token.encode()).hexdigest()]

    # bob cannot revoke alice's token
    r = fake_api.delete(f"/api/v1/users/me/tokens/{created['id']}", user="bob")
    assert_error(r, 404, "not_found")
    assert fake_api.client.get("/api/v1/users/me", headers={
        "Authorization": f"Bearer {token}"}).status_code == 200

    assert fake_api.delete(f"/api/v1/users/me/tokens/{created['id']}").status_code == 204
    r = fake_api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"})
    assert_error(r, 401, "unauthorized")
    assert_error(fake_api.delete(f"/api/v1/users/me/tokens/{created['id']}"), 404)
    assert fake_api.get("/api/v1/users/me").status_code == 200  # the other token still works


def test_token_create_refuses_unknown_fields(fake_api: ApiClient) -> None:
    assert_error(fake_api.post("/api/v1/users/me/tokens", json={"name": "x", "admin": True}),
                 422, "invalid")


# --- health, metrics, OpenAPI, unknown routes ---------------------------------------------------


def test_healthz(fake_api: ApiClient) -> None:
    r = fake_api.client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["engine"]["ok"] and body["engine"]["reconciled"] and body["database"]["ok"]
    assert body["ssh"] == {"ok": True, "enabled": False, "error": ""}  # ssh_port 0 in tests


def test_metrics_count_workspaces_by_state(fake_api: ApiClient,
                                           running: dict[str, Any]) -> None:
    r = fake_api.get("/metrics", user="root")  # an admin's token (tests/unit/test_metrics.py)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "# TYPE den_workspaces gauge" in r.text
    assert 'den_workspaces{state="running"} 1.0' in r.text.splitlines()


def test_openapi_documents_the_stable_paths(fake_api: ApiClient) -> None:
    r = fake_api.client.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for path, verbs in {
        "/api/v1/workspaces": {"get", "post"},
        "/api/v1/workspaces/{ref}": {"get", "delete"},
        "/api/v1/workspaces/{ref}/start": {"post"},
        "/api/v1/workspaces/{ref}/stop": {"post"},
        "/api/v1/workspaces/{ref}/exec": {"post"},
        "/api/v1/workspaces/{ref}/events": {"get"},
        "/api/v1/workspaces/{ref}/files": {"get", "put", "delete"},
        "/api/v1/workspaces/{ref}/files/list": {"get"},
        "/api/v1/users/me/tokens": {"get", "post"},
        "/healthz": {"get"},
    }.items():
        assert verbs <= set(paths.get(path, {})), path


def test_unknown_routes_are_json_errors(fake_api: ApiClient) -> None:
    assert_error(fake_api.get("/api/v1/nothing-here"), 404, "not_found")
    assert_error(fake_api.client.put("/healthz"), 405, "method_not_allowed")
