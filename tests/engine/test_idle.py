"""The idle reaper on the real engine: idle workspaces sleep, busy ones do not."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from tests.conftest import ApiClient, users

pytestmark = pytest.mark.engine


@pytest.fixture
def reaping_api(engine: None, make_settings: Callable[..., Settings]) -> Iterator[ApiClient]:
    app = create_app(make_settings(reaper_interval_s=0.5))
    with TestClient(app) as client:
        api = ApiClient(client, users(app))
        yield api
        for ws in api.get("/api/v1/workspaces").json()["workspaces"]:
            api.delete(f"/api/v1/workspaces/{ws['id']}")


def _state_within(api: ApiClient, wid: str, state: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if api.get(f"/api/v1/workspaces/{wid}").json()["state"] == state:
            return True
        time.sleep(0.2)
    return False


def test_an_idle_workspace_is_paused_and_an_exec_wakes_it(
    reaping_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    api = reaping_api
    wid = api.create(make_repo(), idle_timeout_s=2)["id"]
    api.exec(wid, "tmux new-session -d -s bg 'echo started > /tmp/bg; sleep 1000'")
    assert _state_within(api, wid, "paused", 30)
    events = api.get(f"/api/v1/workspaces/{wid}/events").json()["events"]
    assert [e["actor"] for e in events if e["to_state"] == "paused"] == ["reaper"]
    out = api.exec(wid, "cat /tmp/bg")
    assert out["stdout"] == "started\n"  # woken with its memory
    assert api.get(f"/api/v1/workspaces/{wid}").json()["state"] == "running"


def test_a_cpu_busy_workspace_is_not_paused(
    reaping_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    api = reaping_api
    wid = api.create(make_repo(), idle_timeout_s=2)["id"]
    api.exec(wid, "tmux new-session -d -s spin 'while :; do :; done'")
    time.sleep(6)  # three idle timeouts, a dozen reaper passes
    assert api.get(f"/api/v1/workspaces/{wid}").json()["state"] == "running"


def test_a_keepalive_lease_holds_it_awake_and_its_expiry_lets_it_sleep(
    reaping_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    api = reaping_api
    wid = api.create(make_repo(), idle_timeout_s=1)["id"]
    r = api.post(f"/api/v1/workspaces/{wid}/keepalive", json={"ttl_s": 5})
    assert r.status_code == 200 and r.json()["keepalive_until"], r.text
    time.sleep(3.5)
    assert api.get(f"/api/v1/workspaces/{wid}").json()["state"] == "running"
    assert _state_within(api, wid, "paused", 30)
    bad = api.post(f"/api/v1/workspaces/{wid}/keepalive", json={"ttl_s": 10**9})
    assert bad.status_code == 422
