"""Ownership, bad input and resource limits on the real engine."""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.errors import DenError
from tests.conftest import ApiClient, engine_objects, users

pytestmark = pytest.mark.engine


def _calls(wid: str) -> list[tuple[str, str, dict[str, Any]]]:
    base = f"/api/v1/workspaces/{wid}"
    return [
        ("GET", base, {}),
        ("POST", f"{base}/start", {}),
        ("POST", f"{base}/stop", {}),
        ("POST", f"{base}/exec", {"json": {"cmd": "id"}}),
        ("GET", f"{base}/events", {}),
        ("GET", f"{base}/files", {"params": {"path": "api/README.md"}}),
        ("PUT", f"{base}/files", {"params": {"path": "x"}, "content": b"x"}),
        ("DELETE", f"{base}/files", {"params": {"path": "api/README.md"}}),
        ("GET", f"{base}/files/list", {"params": {"path": "."}}),
        ("DELETE", base, {}),
    ]


def test_another_user_gets_404_on_every_endpoint(
    real_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    ws = real_api.create(make_repo())
    for ref in (ws["id"], ws["name"]):
        for method, url, kw in _calls(ref):
            r = real_api.client.request(method, url, headers=real_api.h("bob"), **kw)
            assert r.status_code == 404, (method, url, r.text)
            assert r.json()["error"]["code"] == "not_found"
        with real_api.client.websocket_connect(
            f"/api/v1/workspaces/{ref}/exec/stream", headers=real_api.h("bob")
        ) as sock:
            assert sock.receive_json()["error"]["code"] == "not_found"
    # Nothing bob tried changed alice's workspace.
    after = real_api.get(f"/api/v1/workspaces/{ws['id']}").json()
    assert after["state"] == "running"
    assert real_api.exec(ws["id"], "cat README.md; ls /workspace")["stdout"] == "# api\napi\n"
    assert [w["id"] for w in real_api.get("/api/v1/workspaces", user="bob").json()[
        "workspaces"]] == []
    # An admin sees it; no token is a 401.
    assert real_api.get(f"/api/v1/workspaces/{ws['id']}", user="root").status_code == 200
    assert real_api.client.get(f"/api/v1/workspaces/{ws['id']}").status_code == 401


def _no_objects_for(api: ApiClient) -> bool:
    return engine_objects(str(api.app.state.settings.engine_prefix)) == []


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"name": "Bad_Name", "repo": {"url": "REPO"}}, 422, "invalid"),
        ({"name": "x" * 41, "repo": {"url": "REPO"}}, 422, "invalid"),
        ({"name": "ok", "repo": {"url": "ext::sh -c touch% /tmp/pwned"}}, 422, "invalid"),
        ({"name": "ok", "repo": {"url": "/etc"}}, 422, "invalid"),
        ({"name": "ok", "repo": {"url": "file:///root/secret.git"}}, 422, "invalid"),
        ({"name": "ok", "repo": {"url": "-uhttps://x"}}, 422, "invalid"),
        ({"name": "ok", "repo": {"url": "REPO"}, "resources": {"cpus": 512}}, 422, "invalid"),
        ({"name": "ok", "repo": {"url": "REPO"}, "resources": {"memory_mb": 10**9}}, 422,
         "invalid"),
        ({"name": "ok", "repo": {"url": "REPO"}, "resources": {"memory_mb": -5}}, 422, "invalid"),
        # This host has no GPU: refused, and no engine object made (the test's end checks).
        ({"name": "ok", "repo": {"url": "REPO"}, "resources": {"gpus": 4}}, 422, "no_gpus"),
        ({"name": "ok", "repo": {"url": "REPO"}, "runtime": "runc"}, 422, "invalid"),
        ({"name": "ok", "repo": {"url": "REPO"}, "image": "evil/image"}, 422, "invalid"),
        ({"name": "ok", "repo": {"url": "REPO"}, "image": "den/nope:1"}, 422, "image_missing"),
        ({"name": "ok", "repo": {"url": "REPO"}, "env": {"1BAD": "x"}}, 422, "invalid"),
        ({"name": "ok", "repo": {"url": "REPO"}, "surprise": 1}, 422, "invalid"),
        ({"name": "ok"}, 422, "invalid"),
    ],
)
def test_bad_create_requests_are_refused_before_anything_exists(
    real_api: ApiClient, make_repo: Callable[..., Path], body: dict[str, Any], status: int,
    code: str,
) -> None:
    repo = str(make_repo())
    if "repo" in body and body["repo"]["url"] == "REPO":
        body = {**body, "repo": {"url": repo}}
    r = real_api.post("/api/v1/workspaces", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    assert real_api.get("/api/v1/workspaces").json()["workspaces"] == []
    assert _no_objects_for(real_api)


def test_malformed_json_is_a_422(real_api: ApiClient) -> None:
    r = real_api.client.post("/api/v1/workspaces", content=b"{not json",
                             headers={**real_api.h(), "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid"
    r = real_api.post("/api/v1/workspaces/nope/exec", json={"cmd": []})
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("url", "branch", "reason"),
    [
        ("REPOS/missing.git", None, "does not exist"),
        ("REPO", "no-such-branch", "no-such-branch"),
    ],
)
def test_clone_failures_end_in_error_with_reason_and_nothing_left(
    real_api: ApiClient, make_repo: Callable[..., Path], url: str, branch: str | None,
    reason: str,
) -> None:
    repo = make_repo()
    url = url.replace("REPOS", str(repo.parent)).replace("REPO", str(repo))
    r = real_api.post("/api/v1/workspaces",
                      json={"name": "broken", "repo": {"url": url, "branch": branch}})
    if r.status_code == 422:  # refused up front: also fine, as long as it says why
        assert reason in r.json()["error"]["message"]
    else:
        ws = real_api.wait_state(r.json()["id"])
        assert ws["state"] == "error" and reason in ws["state_reason"], ws
    assert _no_objects_for(real_api)


def test_same_name_twice_is_a_conflict(real_api: ApiClient, make_repo: Callable[..., Path]
                                       ) -> None:
    repo = make_repo()
    real_api.create(repo, wait=False)
    r = real_api.post("/api/v1/workspaces", json={"name": "api", "repo": {"url": str(repo)}})
    assert (r.status_code, r.json()["error"]["code"]) == (409, "name_taken")


FORK_UNTIL_REFUSED = """
import os, signal, time
kids = []
try:
    while True:
        pid = os.fork()
        if pid == 0:
            time.sleep(120)
            os._exit(0)
        kids.append(pid)
except OSError as exc:
    print(len(kids), exc.errno)
for pid in kids:
    os.kill(pid, signal.SIGKILL)
"""


@pytest.fixture
def small_pids_api(engine: None, make_settings: Callable[..., Settings]) -> Iterator[ApiClient]:
    """An app whose workspaces may run 200 processes (a bomb at 1024 needs GBs of memory)."""
    app = create_app(make_settings(default_pids=200))
    with TestClient(app) as client:
        api = ApiClient(client, users(app))
        yield api
        for ws in api.get("/api/v1/workspaces").json()["workspaces"]:
            api.delete(f"/api/v1/workspaces/{ws['id']}")


def test_fork_bomb_hits_the_pids_limit_and_the_server_keeps_serving(
    small_pids_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    api = small_pids_api
    # Memory to spare: each process costs the sandbox about 2 MiB of host memory.
    ws = api.create(make_repo(), resources={"memory_mb": 2048})
    # Forking stops at the workspace's limit with EAGAIN, inside the sandbox.
    forks = api.exec(ws["id"], ["python3", "-c", FORK_UNTIL_REFUSED], timeout_s=120)
    assert len(forks["stdout"].split()) == 2, forks
    count, errno = forks["stdout"].split()
    assert errno == "11" and 150 < int(count) < 200, forks

    bomb = api.exec(ws["id"], "bomb() { bomb | bomb & }; bomb; sleep 5; echo survived",
                    timeout_s=8)
    assert bomb["exit_code"] in (0, 124, 137), bomb
    assert api.client.get("/healthz").json()["status"] == "ok"
    assert api.get(f"/api/v1/workspaces/{ws['id']}").json()["state"] == "running"
    # What is left of the bomb holds dev's process slots; a stop and start clears it.
    assert api.post(f"/api/v1/workspaces/{ws['id']}/stop").json()["state"] == "stopped"
    assert api.post(f"/api/v1/workspaces/{ws['id']}/start").json()["state"] == "running"
    assert api.exec(ws["id"], "echo alive", timeout_s=60)["stdout"] == "alive\n"


def test_memory_hog_is_killed_inside_its_workspace_only(
    real_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    ws = real_api.create(make_repo(), resources={"memory_mb": 256})
    other = real_api.create(make_repo("other"), name="other")
    hog = real_api.exec(ws["id"], ["python3", "-c", "b = bytearray(1024**3); print('fit')"],
                        timeout_s=60)
    assert hog["exit_code"] != 0 and "fit" not in hog["stdout"], hog
    assert real_api.exec(ws["id"], "echo still-here")["stdout"] == "still-here\n"
    assert real_api.exec(other["id"], "echo fine")["stdout"] == "fine\n"
    assert real_api.get(f"/api/v1/workspaces/{ws['id']}").json()["state"] == "running"
    # Den's memory guard (on the host, not a poller inside) ended it and says so.
    deadline = time.monotonic() + 30
    while not (said := [e["message"] for e in real_api.get(
            f"/api/v1/workspaces/{ws['id']}/events").json()["events"] if e["kind"] == "memory"]):
        assert time.monotonic() < deadline, "no memory event"
        time.sleep(0.1)
    assert re.match(r"memory guard: the workspace used \d+ MiB, past its limit of 256 MiB: "
                    r"sent SIG(TERM|KILL) to process \d+ \(python3, \d+ MiB\)", said[0]), said
    assert not [e for e in real_api.get(f"/api/v1/workspaces/{other['id']}/events").json()[
        "events"] if e["kind"] == "memory"]


async def _stalled_body(first: bytes, pulled: asyncio.Event, go: asyncio.Event
                        ) -> AsyncIterator[bytes]:
    yield first
    pulled.set()  # the write is under way: it asks for more
    await go.wait()
    yield b"rest"


def test_bad_exec_and_files_input_has_the_right_meaning(
        real_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    """Issue 16 §3 on one workspace: what a shell answers for a command that cannot run,
    422 for an unusable cwd, a command at the size limits runs, a PUT cut by a stop is 409."""
    env = {"V0": "x" * 30000, "V1": "y" * 30000}  # near the env limit: every exec carries it
    ws = real_api.create(make_repo(), env=env)
    assert ws["state"] == "running", ws
    url = f"/api/v1/workspaces/{ws['id']}/exec"
    seen: dict[str, Any] = {}
    for label, body in [
        ("not found", {"cmd": ["no-such-command-x"]}),
        ("a directory", {"cmd": ["/workspace"]}),
        ("not executable", {"cmd": ["./README.md"]}),
        ("empty PATH", {"cmd": ["ls"], "env": {"PATH": ""}}),
        ("shell not found", {"cmd": "no-such-command-x"}),
    ]:
        r = real_api.post(url, json=body)
        seen[label] = (r.status_code, r.json())
    assert seen["not found"][0] == 200 and seen["not found"][1]["exit_code"] == 127, seen
    assert seen["a directory"][0] == 200 and seen["a directory"][1]["exit_code"] == 126, seen
    assert seen["not executable"][0] == 200
    assert seen["not executable"][1]["exit_code"] == 126, seen
    assert seen["shell not found"][1]["exit_code"] == 127, seen
    # An empty PATH searches the working directory only, as a shell's does: no `ls` there.
    assert seen["empty PATH"][0] == 200 and seen["empty PATH"][1]["exit_code"] == 127, seen
    for cwd in ("no-such-dir", "README.md", "/nonexistent/deeper"):
        r = real_api.post(url, json={"cmd": "pwd", "cwd": cwd})
        assert r.status_code == 422 and r.json()["error"]["code"] == "bad_cwd", r.text
    # At the limits, the command still runs: argv of 120,000 bytes with 60 KB of env.
    big = "z" * 120_000
    r = real_api.post(url, json={"cmd": ["sh", "-c", 'echo ${#V0} ${#V1} ${#1}', "sh", big]})
    assert r.status_code == 200 and r.json()["stdout"] == "30000 30000 120000\n", r.text[:300]
    # A PUT cut short by a stop: 409, and the workspace works afterwards. The write goes
    # through the host (a plain file), which the stop does not reach: the answer is the same.
    app = real_api.app
    portal = real_api.client.portal
    assert portal is not None
    host_before = app.state.files.transfers["host"]
    pulled, go = portal.call(asyncio.Event), portal.call(asyncio.Event)
    write = portal.start_task_soon(functools.partial(
        app.state.files.write, ws["id"], "cut.txt", _stalled_body(b"first", pulled, go),
        actor="alice"))
    portal.call(pulled.wait)
    r = real_api.post(f"/api/v1/workspaces/{ws['id']}/stop")
    assert r.status_code == 200, r.text
    portal.call(go.set)
    with pytest.raises(DenError) as info:
        write.result(timeout=120)
    assert info.value.status_code == 409, (info.value.code, info.value.message)
    assert app.state.files.transfers["host"] == host_before + 1
    after = real_api.exec(ws["id"], "cat README.md; ls -A /workspace | grep -c -e cut.txt "
                                    "-e .den-write-")
    assert after["stdout"] == "# api\n0\n", after
