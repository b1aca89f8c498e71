"""A workspace's resource use against its limits: ``GET /api/v1/workspaces/{ref}/usage`` and
the workspace page's ``live.json`` (ports table and usage), on the fake runtime. Neither
wakes a paused workspace nor counts as activity."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from server.runtime.fake import FakeRuntime
from tests.conftest import ApiClient
from tests.unit.test_api_fake import assert_error
from tests.web.test_web_fake import browser_for, login


def test_usage_against_the_limits_and_never_waking(
        fake_api: ApiClient, fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    ws = fake_api.create(make_repo("api"), name="api",
                         resources={"cpus": 1.5, "memory_mb": 512})
    assert ws["resources"]["cpus"] == 1.5
    container = next(iter(fake_runtime.containers.values()))  # the one workspace
    container.cpu_ns, container.memory_bytes = 3_000_000_000, 200 * 1024 * 1024
    r = fake_api.get("/api/v1/workspaces/api/usage")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "running" and body["cpus"] == 1.5
    assert body["cpu_ns"] == 3_000_000_000 and body["memory_bytes"] == 200 * 1024 * 1024
    assert body["memory_limit_bytes"] == 512 * 1024 * 1024 and body["at"]
    assert fake_api.post("/api/v1/workspaces/api/pause").status_code == 200
    activity = fake_api.get("/api/v1/workspaces/api").json()["last_activity_at"]
    calls = fake_runtime.calls.count("usage")
    body = fake_api.get("/api/v1/workspaces/api/usage").json()
    assert body["state"] == "paused" and body["cpu_ns"] is None and body["memory_bytes"] is None
    assert fake_runtime.calls.count("usage") == calls  # not asked, not woken
    after = fake_api.get("/api/v1/workspaces/api").json()
    assert after["state"] == "paused"
    assert after["last_activity_at"] == activity
    assert_error(fake_api.get("/api/v1/workspaces/api/usage", user="bob"), 404)
    assert_error(fake_api.get("/api/v1/workspaces/nope/usage"), 404)


def test_the_workspace_page_refreshes_ports_and_usage(
        fake_api: ApiClient, fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    ws = fake_api.create(make_repo("api"), name="api")
    browser = browser_for(fake_api)
    login(browser, fake_api.tokens["alice"])
    page = browser.get(f"/workspaces/{ws['id']}").text
    assert f'data-live="/workspaces/{ws["id"]}/live.json"' in page
    assert "data-chart-cpu" in page and "data-chart-mem" in page
    live = browser.get(f"/workspaces/{ws['id']}/live.json").json()
    assert "Nothing listens on a TCP port yet" in live["ports_html"]
    assert live["usage"]["cpus"] == ws["resources"]["cpus"] and live["state"] == "running"
    fake_runtime.listening = {8000: ("127.0.0.1", 1)}
    live = browser.get(f"/workspaces/{ws['id']}/live.json").json()
    assert 'data-port="8000"' in live["ports_html"]
    assert 'name="csrf_token"' in live["ports_html"]  # its share form still posts
    assert fake_api.post("/api/v1/workspaces/api/pause").status_code == 200
    calls = len(fake_runtime.calls)
    live = browser.get(f"/workspaces/{ws['id']}/live.json").json()
    assert live["usage"]["cpu_ns"] is None and live["state"] == "paused"
    assert "usage" not in fake_runtime.calls[calls:] and "exec" not in fake_runtime.calls[calls:]
    other = browser_for(fake_api)
    login(other, fake_api.tokens["bob"])
    assert other.get(f"/workspaces/{ws['id']}/live.json").status_code == 404
