"""Background processes on the fake runtime: the HTTP and WebSocket routes, the service's
capability check, and the Python client and CLI verbs against the real app."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import pytest
import uvicorn
from starlette.websockets import WebSocketDisconnect

from server.api.processes import decode_chunks
from server.api.schemas import SignalName
from server.app import create_app
from server.client import Den, DenAPIError, LogChunk, Process
from server.client.commands import add_client_commands
from server.client.config import ClientConfig, save_config
from server.config import Settings
from server.runtime.base import SIGNALS, StreamChunk
from server.runtime.fake import FakeRuntime
from server.workspaces.processes import command_word
from tests.conftest import ApiClient, users
from tests.unit.test_api_fake import assert_error

WS = "/api/v1/workspaces"


@pytest.fixture
def running(fake_api: ApiClient, make_repo: Callable[..., Path]) -> dict[str, Any]:
    """Alice's running workspace "api"."""
    ws = fake_api.create(make_repo("api"), name="api")
    assert ws["state"] == "running", ws
    return ws


def spawn(api: ApiClient, cmd: Any, user: str = "alice", **kw: Any) -> dict[str, Any]:
    r = api.post(f"{WS}/api/processes", user=user, json={"cmd": cmd, **kw})
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


# --- pure parts -----------------------------------------------------------------------------


def test_the_api_signal_names_are_the_runtime_s() -> None:
    assert get_args(SignalName) == SIGNALS


@pytest.mark.parametrize(("argv", "word"), [
    (["npm", "run", "dev"], "npm"),
    (["bash", "-c", "API_KEY=s3cret ./serve --port 3000"], "./serve"),
    (["bash", "-c", "'unterminated"], "'unterminated"),
    (["bash", "-c", "A=1 B=2"], "?"),
    (["TOKEN=x"], "TOKEN"),
    (["sh", "-c", "exec python -m http.server"], "exec"),
])
def test_command_word_never_shows_an_assignment(argv: list[str], word: str) -> None:
    assert command_word(argv) == word


def test_decode_chunks_joins_neighbours_and_keeps_characters_whole() -> None:
    snow = "☃".encode()
    chunks = [StreamChunk("stdout", b"a" + snow[:1]), StreamChunk("stdout", snow[1:] + b"b"),
              StreamChunk("stderr", b"e\xff"), StreamChunk("stdout", b"c" + snow[:2])]
    assert [(c.stream, c.data) for c in decode_chunks(chunks)] == [
        ("stdout", "a☃b"), ("stderr", "e\ufffd"), ("stdout", "c\ufffd")]


# --- routes ---------------------------------------------------------------------------------


def test_spawn_list_logs_signal(fake_api: ApiClient, running: dict[str, Any]) -> None:
    started = spawn(fake_api, ["echo", "hello"], cwd="sub", env={"SECRET": "hunter2"})
    pid = started["pid"]
    assert started["cmd"] == ["echo", "hello"]
    assert (started["cwd"], started["user"], started["running"]) == (
        "/workspace/api/sub", "dev", True)
    assert started["started_at"].endswith("Z")

    listed = fake_api.get(f"{WS}/api/processes").json()["processes"]
    assert [(p["pid"], p["cmd"], p["running"], p["exit_code"], p["signal"]) for p in listed] == [
        (pid, ["echo", "hello"], True, None, None)]
    assert listed[0]["started_at"].endswith("Z")

    logs = fake_api.get(f"{WS}/api/processes/{pid}/logs").json()
    assert logs == {"pid": pid, "running": True, "exit_code": None, "signal": None,
                    "chunks": [{"stream": "stdout", "data": "hello\n"}]}

    r = fake_api.post(f"{WS}/api/processes/{pid}/signal", json={"signal": "TERM"})
    assert r.status_code == 204, r.text
    logs = fake_api.get(f"{WS}/api/processes/{pid}/logs").json()
    assert (logs["running"], logs["exit_code"], logs["signal"]) == (False, 143, "TERM")

    events = fake_api.get(f"{WS}/api/events").json()["events"]
    process_events = [(e["kind"], e["actor"], e["message"]) for e in events
                      if e["kind"] == "process"]
    assert process_events == [("process", "alice", f"process {pid} (echo) started"),
                              ("process", "alice", f"process {pid} (echo) sent TERM")]
    assert not any("hunter2" in e["message"] for e in events)


def test_a_shell_string_and_the_default_signal(fake_api: ApiClient,
                                               running: dict[str, Any]) -> None:
    started = spawn(fake_api, "TOKEN=abc echo hi there", log_bytes=4096)
    assert started["cmd"] == ["bash", "-c", "TOKEN=abc echo hi there"]
    pid = started["pid"]
    assert fake_api.post(f"{WS}/api/processes/{pid}/signal", json={}).status_code == 204
    listed = fake_api.get(f"{WS}/api/processes").json()["processes"]
    assert (listed[0]["exit_code"], listed[0]["signal"]) == (143, "TERM")
    messages = [e["message"] for e in fake_api.get(f"{WS}/api/events").json()["events"]]
    assert f"process {pid} (echo) started" in messages
    assert not any("abc" in m for m in messages)


def test_a_signal_that_does_not_end_the_process(fake_api: ApiClient,
                                                running: dict[str, Any]) -> None:
    pid = spawn(fake_api, ["true"])["pid"]
    assert fake_api.post(f"{WS}/api/processes/{pid}/signal",
                         json={"signal": "WINCH"}).status_code == 204
    assert fake_api.get(f"{WS}/api/processes").json()["processes"][0]["running"] is True


def test_unknown_pid_is_404(fake_api: ApiClient, running: dict[str, Any]) -> None:
    assert_error(fake_api.get(f"{WS}/api/processes/4242/logs"), 404, "not_found")
    assert_error(fake_api.post(f"{WS}/api/processes/4242/signal", json={"signal": "KILL"}),
                 404, "not_found")
    kinds = [e["kind"] for e in fake_api.get(f"{WS}/api/events").json()["events"]]
    assert "process" not in kinds


@pytest.mark.parametrize("pid", ["0", "-1", str(2**31), "abc", "1.5"])
def test_a_bad_pid_is_422(fake_api: ApiClient, running: dict[str, Any], pid: str) -> None:
    assert_error(fake_api.get(f"{WS}/api/processes/{pid}/logs"), 422, "invalid")
    assert_error(fake_api.post(f"{WS}/api/processes/{pid}/signal", json={"signal": "TERM"}),
                 422, "invalid")


@pytest.mark.parametrize("body", [
    {"signal": "SIGTERM"}, {"signal": "term"}, {"signal": 15}, {"signal": None},
    {"signal": "TERM", "pid": 1},
])
def test_a_bad_signal_is_422(fake_api: ApiClient, running: dict[str, Any],
                             body: dict[str, Any]) -> None:
    pid = spawn(fake_api, ["true"])["pid"]
    assert_error(fake_api.post(f"{WS}/api/processes/{pid}/signal", json=body), 422, "invalid")


@pytest.mark.parametrize("body", [
    {"cmd": []}, {"cmd": ""}, {"cmd": "  "}, {"cmd": ["a\x00b"]}, {},
    {"cmd": ["true"], "timeout_s": 5}, {"cmd": ["true"], "log_bytes": "1024"},
    {"cmd": ["true"], "log_bytes": 10}, {"cmd": ["true"], "log_bytes": 2**30},
    {"cmd": ["true"], "env": {"BAD NAME": "x"}},
])
def test_a_bad_spawn_is_422(fake_api: ApiClient, running: dict[str, Any],
                            body: dict[str, Any]) -> None:
    assert_error(fake_api.post(f"{WS}/api/processes", json=body), 422)
    assert fake_api.get(f"{WS}/api/processes").json()["processes"] == []


@pytest.mark.parametrize("by", ["id", "name"])
def test_another_users_workspace_is_404(fake_api: ApiClient, running: dict[str, Any],
                                        fake_runtime: FakeRuntime, by: str) -> None:
    pid = spawn(fake_api, ["true"])["pid"]
    ref = running["id"] if by == "id" else running["name"]
    calls = list(fake_runtime.calls)
    calls_by_bob: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "processes", {"json": {"cmd": ["true"]}}),
        ("GET", "processes", {}),
        ("GET", f"processes/{pid}/logs", {}),
        ("POST", f"processes/{pid}/signal", {"json": {"signal": "KILL"}}),
    ]
    for method, path, kw in calls_by_bob:
        r = fake_api.client.request(method, f"{WS}/{ref}/{path}", headers=fake_api.h("bob"),
                                    **kw)
        assert_error(r, 404, "not_found")
    with fake_api.client.websocket_connect(f"{WS}/{ref}/processes/{pid}/logs",
                                           headers=fake_api.h("bob")) as ws:
        assert ws.receive_json()["error"]["code"] == "not_found"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4404
    assert fake_runtime.calls == calls
    # An admin reaches it by id.
    listed = fake_api.get(f"{WS}/{running['id']}/processes", user="root").json()
    assert [p["pid"] for p in listed["processes"]] == [pid]


def test_a_paused_workspace_is_woken_and_its_processes_survive(
        fake_api: ApiClient, running: dict[str, Any]) -> None:
    pid = spawn(fake_api, ["echo", "up"])["pid"]
    assert fake_api.post(f"{WS}/api/pause").json()["state"] == "paused"
    listed = fake_api.get(f"{WS}/api/processes").json()["processes"]
    assert [(p["pid"], p["running"]) for p in listed] == [(pid, True)]
    assert fake_api.get(f"{WS}/api").json()["state"] == "running"
    # A stop ends them.
    fake_api.post(f"{WS}/api/stop")
    assert fake_api.get(f"{WS}/api/processes").json()["processes"] == []


def test_a_runtime_without_an_agent_answers_501(
        make_settings: Callable[..., Settings], make_repo: Callable[..., Path]) -> None:
    from fastapi.testclient import TestClient

    class NoAgentRuntime(FakeRuntime):
        spawn = None  # type: ignore[assignment]

    app = create_app(make_settings(), runtime=NoAgentRuntime())
    with TestClient(app) as client:
        api = ApiClient(client, users(app))
        api.create(make_repo("api"), name="api")
        api.post(f"{WS}/api/pause")
        for r in (api.post(f"{WS}/api/processes", json={"cmd": ["true"]}),
                  api.get(f"{WS}/api/processes"),
                  api.get(f"{WS}/api/processes/5/logs"),
                  api.post(f"{WS}/api/processes/5/signal", json={"signal": "TERM"})):
            assert_error(r, 501, "no_agent")
        assert api.get(f"{WS}/api").json()["state"] == "paused"  # not woken for nothing
        assert_error(api.get(f"{WS}/api/processes", user="bob"), 404, "not_found")


# --- following over the WebSocket -----------------------------------------------------------


def test_follow_until_the_process_exits(fake_api: ApiClient, running: dict[str, Any]) -> None:
    pid = spawn(fake_api, ["echo", "hi"])["pid"]
    svc = fake_api.app.state.workspaces
    with fake_api.client.websocket_connect(f"{WS}/api/processes/{pid}/logs?follow=true",
                                           headers=fake_api.h()) as ws:
        assert ws.receive_json() == {"type": "stdout", "data": "hi\n"}
        assert svc.activity.busy(running["id"])
        r = fake_api.post(f"{WS}/api/processes/{pid}/signal", json={"signal": "KILL"})
        assert r.status_code == 204
        assert ws.receive_json() == {"type": "exit", "exit_code": 137, "signal": "KILL"}
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1000
    assert not svc.activity.busy(running["id"])


def test_follow_an_exited_process_ends_at_once(fake_api: ApiClient,
                                               running: dict[str, Any]) -> None:
    pid = spawn(fake_api, "echo done")["pid"]
    fake_api.post(f"{WS}/api/processes/{pid}/signal", json={"signal": "INT"})
    with fake_api.client.websocket_connect(f"{WS}/api/processes/{pid}/logs",
                                           headers=fake_api.h()) as ws:
        assert ws.receive_json() == {"type": "stdout", "data": "done\n"}
        assert ws.receive_json() == {"type": "exit", "exit_code": 130, "signal": "INT"}


def test_leaving_a_follow_releases_the_workspace(fake_api: ApiClient,
                                                 running: dict[str, Any]) -> None:
    pid = spawn(fake_api, ["echo", "hi"])["pid"]
    svc = fake_api.app.state.workspaces
    with fake_api.client.websocket_connect(f"{WS}/api/processes/{pid}/logs",
                                           headers=fake_api.h()) as ws:
        assert ws.receive_json()["type"] == "stdout"
        assert svc.activity.busy(running["id"])
    deadline = 200
    while svc.activity.busy(running["id"]) and deadline:
        fake_api.get(f"{WS}/api")  # lets the server notice the disconnect
        deadline -= 1
    assert not svc.activity.busy(running["id"])
    listed = fake_api.get(f"{WS}/api/processes").json()["processes"]
    assert listed[0]["running"] is True  # the process runs on


@pytest.mark.parametrize(("path", "code", "close"), [
    ("processes/4242/logs", "not_found", 4404),
    ("processes/0/logs", "invalid", 4422),
    ("processes/abc/logs", "invalid", 4422),
])
def test_follow_errors(fake_api: ApiClient, running: dict[str, Any], path: str, code: str,
                       close: int) -> None:
    with fake_api.client.websocket_connect(f"{WS}/api/{path}", headers=fake_api.h()) as ws:
        msg = ws.receive_json()
        assert (msg["type"], msg["error"]["code"]) == ("error", code)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == close


def test_follow_without_a_token(fake_api: ApiClient, running: dict[str, Any]) -> None:
    with fake_api.client.websocket_connect(f"{WS}/api/processes/1/logs") as ws:
        assert ws.receive_json()["error"]["code"] == "unauthorized"


def test_openapi_documents_the_process_paths(fake_api: ApiClient) -> None:
    paths = fake_api.client.get("/openapi.json").json()["paths"]
    assert {"get", "post"} <= set(paths[f"{WS}/{{ref}}/processes"])
    assert "get" in paths[f"{WS}/{{ref}}/processes/{{pid}}/logs"]
    assert "post" in paths[f"{WS}/{{ref}}/processes/{{pid}}/signal"]


# --- the Python client and the CLI against the app on a real socket -------------------------


@dataclass
class Live:
    url: str
    tokens: dict[str, str]

    def den(self, user: str = "alice") -> Den:
        return Den(self.url, self.tokens[user], poll_interval_s=0.01)


@pytest.fixture
def live(make_settings: Callable[..., Settings], make_repo: Callable[..., Path]
         ) -> Iterator[Live]:
    """The app under uvicorn on a free loopback port (the client's WebSockets need one),
    with alice's running workspace "api"."""
    app = create_app(make_settings(), runtime=FakeRuntime())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    live = Live(f"http://127.0.0.1:{port}", users(app))
    with live.den() as den:
        den.create(str(make_repo("api")), name="api", timeout_s=30)
    yield live
    server.should_exit = True
    thread.join(timeout=30)


def test_client(live: Live) -> None:
    with live.den() as den:
        procs = den.workspace("api").processes
        p = procs.start(["echo", "hi"], env={"A": "1"}, log_bytes=4096)
        assert isinstance(p, Process)
        assert (p.cmd, p.cwd, p.user, p.running, p.exit_code) == (
            ("echo", "hi"), "/workspace/api", "dev", True, None)
        assert [(q.pid, q.running) for q in procs.list()] == [(p.pid, True)]
        assert procs.logs(p.pid) == "hi\n"
        logs = procs.read_logs(p.pid)
        assert (logs.running, logs.chunks) == (True, (LogChunk("stdout", "hi\n"),))

        following = procs.logs(p.pid, follow=True)
        assert next(following) == LogChunk("stdout", "hi\n")
        procs.kill(p.pid, "KILL")
        assert list(following) == []  # ends at the exit message
        (after,) = procs.list()
        assert (after.running, after.exit_code, after.signal) == (False, 137, "KILL")

        sh = procs.start("echo from a shell", cwd="/tmp")
        assert (sh.cmd, sh.cwd) == (("bash", "-c", "echo from a shell"), "/tmp")


def test_client_errors(live: Live) -> None:
    with live.den() as den:
        procs = den.workspace("api").processes
        for call in (lambda: procs.kill(4242), lambda: procs.logs(4242),
                     lambda: list(procs.logs(4242, follow=True))):
            with pytest.raises(DenAPIError) as info:
                call()
            assert info.value.code == "not_found"
        with pytest.raises(DenAPIError) as info:
            procs.start([])
        assert (info.value.status, info.value.code) == (422, "invalid")
        with pytest.raises(DenAPIError) as info:
            procs.kill(procs.start(["true"]).pid, "SIGTERM")
        assert (info.value.status, info.value.code) == (422, "invalid")
        ws_id = den.workspace("api").id
    with live.den("bob") as den, pytest.raises(DenAPIError) as info:
        den.request_json("GET", f"/api/v1/workspaces/{ws_id}/processes")
    assert (info.value.status, info.value.code) == (404, "not_found")


@pytest.fixture
def cli(live: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    for var in ("DEN_URL", "DEN_TOKEN", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DEN_CONFIG", str(tmp_path / "den-config.json"))
    save_config(ClientConfig(live.url, live.tokens["alice"]))
    parser = argparse.ArgumentParser(prog="den")
    add_client_commands(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        code: int = args.func(args)
        return code

    return run


def test_cli_spawn_ps_logs_kill(cli: Callable[..., int],
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("spawn", "api", "--cwd", "sub", "--", "echo", "hi") == 0
    pid = int(capsys.readouterr().out)
    assert cli("spawn", "api", "--", "sh", "-c", "nope") == 0
    other = int(capsys.readouterr().out)

    assert cli("ps", "api") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["PID", "STATE", "STARTED", "COMMAND"]
    assert lines[1].split()[:2] == [str(pid), "running"]
    assert lines[1].endswith("echo hi")

    assert cli("logs", "api", str(other)) == 0
    out = capsys.readouterr()
    assert (out.out, out.err) == ("", "fake runtime: nope: command not found\n")

    assert cli("kill", "api", str(pid), "-s", "sigint") == 0
    assert capsys.readouterr().out == f"sent INT to process {pid}\n"
    assert cli("logs", "api", str(pid), "-f") == 0
    assert capsys.readouterr().out == "hi\n"

    assert cli("ps", "api") == 0
    assert "killed (INT)" in capsys.readouterr().out


def test_cli_errors(cli: Callable[..., int], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("kill", "api", "4242") == 1
    assert capsys.readouterr().err.startswith("den: no process 4242")
    assert cli("logs", "api", "4242", "-f") == 1
    assert capsys.readouterr().err.startswith("den: no process 4242")
    assert cli("spawn", "api") == 2
    assert "no command given; usage: den spawn NAME -- CMD..." in capsys.readouterr().err
