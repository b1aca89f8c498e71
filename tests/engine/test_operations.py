"""What an operator sees on the real engine: a workspace's CPU and memory, the metrics of a
pause (its checkpoint on disk included), and shedding when the exec queue is full while files
calls still pass."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from tests.conftest import ApiClient, users
from tests.unit.test_api_fake import assert_error
from tests.unit.test_metrics import parse, value

pytestmark = pytest.mark.engine
WS = "/api/v1/workspaces"


def _wait_for(cond: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_a_pause_shows_in_the_metrics_with_its_checkpoint_on_disk(
        real_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    ws = real_api.create(make_repo())
    assert ws["state"] == "running", ws
    # 64 MiB in a file of the sandbox's memory-backed root: the workspace's memory, as the
    # agent reports it through the reaper's measurement.
    assert real_api.exec(ws["id"], ["sh", "-c", "head -c 67108864 /dev/urandom > /tmp/m"]
                         )["exit_code"] == 0
    assert real_api.call(real_api.app.state.reaper.run_once) == []
    m = parse(real_api.get("/metrics", user="root").text)
    assert (value(m, "den_workspace_cpu_seconds_total", workspace=ws["id"]) or 0) > 0
    assert (value(m, "den_workspace_memory_bytes", workspace=ws["id"]) or 0) > 64 * 2**20
    assert real_api.post(f"{WS}/{ws['id']}/pause").json()["state"] == "paused"
    m = parse(real_api.get("/metrics", user="root").text)
    assert value(m, "den_workspaces", state="paused") == 1
    assert value(m, "den_operation_duration_seconds_count", operation="pause", result="ok") == 1
    assert value(m, "den_operation_duration_seconds_count", operation="create",
                 result="ok") == 1
    assert value(m, "den_exec_duration_seconds_count", kind="exec", outcome="ok") == 1
    assert (value(m, "den_checkpoint_bytes", kind="pause") or 0) > 1024 * 1024


@pytest.fixture
def small_api(engine: None, make_settings: Callable[..., Settings]) -> Iterator[ApiClient]:
    """Two execs at a time, one more waiting."""
    app = create_app(make_settings(exec_concurrency=2, exec_queue_max=1))
    with TestClient(app) as client:
        api = ApiClient(client, users(app))
        yield api
        for ws in app.state.workspaces.list_for(_root(app)):
            with contextlib.suppress(Exception):
                client.delete(f"{WS}/{ws.id}", headers=api.h("root"))


def _root(app: Any) -> Any:
    from server.auth.tokens import ensure_user

    with app.state.sessions.begin() as s:
        user = ensure_user(s, "root", admin=True)
        s.expunge(user)
        return user


def test_a_full_exec_queue_is_shed_while_files_calls_pass(
        small_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    ws_id = small_api.create(make_repo())["id"]
    gate = small_api.app.state.workspaces.long_calls
    wait_for_go = "while [ ! -e /workspace/go ]; do sleep 0.05; done; echo went"
    results: list[Any] = []

    def blocked() -> None:
        results.append(small_api.post(f"{WS}/{ws_id}/exec",
                                      json={"cmd": wait_for_go, "timeout_s": 120}))

    threads = [threading.Thread(target=blocked) for _ in range(3)]
    for t in threads[:2]:
        t.start()
    _wait_for(lambda: gate.running == 2)
    threads[2].start()
    _wait_for(lambda: gate.waiting == 1)
    try:
        r = small_api.post(f"{WS}/{ws_id}/exec", json={"cmd": ["true"]})
        assert_error(r, 503, "overloaded")
        assert r.headers["retry-after"] == "2"
        # Short calls pass: a state read, and the files call that releases the waiting ones.
        assert small_api.get(f"{WS}/{ws_id}").json()["state"] == "running"
        put = small_api.put(f"{WS}/{ws_id}/files", params={"path": "go"}, content=b"")
        assert put.status_code == 200, put.text
    finally:
        with contextlib.suppress(Exception):
            small_api.put(f"{WS}/{ws_id}/files", params={"path": "go"}, content=b"")
        for t in threads:
            t.join(timeout=150)
    assert [x.status_code for x in results] == [200, 200, 200]
    assert all(x.json()["stdout"] == "went\n" for x in results)
    assert gate.counts() == (0, 0, 1)
