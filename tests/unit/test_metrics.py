"""/metrics on the fake runtime: who may read it, and what it says (the exposition text is
parsed with prometheus_client's own parser)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from sqlalchemy import update

from server.app import create_app
from server.config import Settings
from server.db.models import Workspace
from server.metrics import Metrics
from server.runtime.errors import EngineError
from server.runtime.fake import FakeRuntime
from tests.conftest import ApiClient, users
from tests.unit.test_api_fake import assert_error

WS = "/api/v1/workspaces"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample as {(name, labels): value}."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape(api: ApiClient) -> Samples:
    r = api.get("/metrics", user="root")
    assert r.status_code == 200, r.text
    return parse(r.text)


@pytest.fixture
def running(fake_api: ApiClient, make_repo: Callable[..., Path]) -> dict[str, Any]:
    ws = fake_api.create(make_repo("api"), name="api")
    assert ws["state"] == "running", ws
    return ws


# --- who may read it ----------------------------------------------------------------------


def test_metrics_need_an_admin_token(fake_api: ApiClient) -> None:
    assert_error(fake_api.client.get("/metrics"), 401, "unauthorized")
    assert_error(fake_api.client.get("/metrics", headers={"Authorization": "Bearer den_nope"}),
                 401, "unauthorized")
    assert_error(fake_api.get("/metrics", user="alice"), 403, "forbidden")
    r = fake_api.get("/metrics", user="root")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")


def test_the_metrics_token_reads_metrics_and_nothing_else(
        make_settings: Callable[..., Settings], fake_runtime: FakeRuntime) -> None:
    secret = "scrape-me-" + "x" * 20
    app = create_app(make_settings(metrics_token=secret), runtime=fake_runtime)
    with TestClient(app) as client:
        users(app)
        ok = client.get("/metrics", headers={"Authorization": f"Bearer {secret}"})
        assert ok.status_code == 200 and "den_workspaces" in ok.text
        wrong = client.get("/metrics", headers={"Authorization": f"Bearer {secret}x"})
        assert_error(wrong, 401, "unauthorized")
        elsewhere = client.get(WS, headers={"Authorization": f"Bearer {secret}"})
        assert_error(elsewhere, 401, "unauthorized")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_separate_listener_serves_metrics_without_a_token(
        make_settings: Callable[..., Settings], fake_runtime: FakeRuntime) -> None:
    port = _free_port()
    app = create_app(make_settings(metrics_listen=f"127.0.0.1:{port}"), runtime=fake_runtime)
    with TestClient(app) as client:
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert r.status_code == 200
        assert 'den_workspaces{state="running"} 0.0' in r.text.splitlines()
        assert_error(client.get("/metrics"), 401, "unauthorized")  # the main port still asks
    with pytest.raises(httpx.TransportError):  # closed with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


@pytest.mark.parametrize("listen", ["9464", "localhost:", ":9464", "host:99999", "host:x"])
def test_a_bad_metrics_listen_address_is_refused(listen: str) -> None:
    with pytest.raises(ValidationError):
        Settings(metrics_listen=listen)


def test_two_apps_in_one_process_have_their_own_registries(
        make_settings: Callable[..., Settings]) -> None:
    a = create_app(make_settings(), runtime=FakeRuntime())
    b = create_app(make_settings(), runtime=FakeRuntime())
    assert a.state.metrics.registry is not b.state.metrics.registry
    Metrics()  # the same metric names again: no collision with the global registry


# --- what it says -------------------------------------------------------------------------


def test_workspaces_by_state_include_every_state(fake_api: ApiClient,
                                                 running: dict[str, Any]) -> None:
    m = scrape(fake_api)
    assert value(m, "den_workspaces", state="running") == 1
    assert value(m, "den_workspaces", state="paused") == 0
    assert value(m, "den_workspaces", state="error") == 0


def test_files_transfers_by_path(fake_api: ApiClient, running: dict[str, Any]) -> None:
    url = f"/api/v1/workspaces/{running['id']}/files"
    assert value(scrape(fake_api), "den_file_transfers_total", path="exec") is None
    # The fake runtime has no agent: both go through the engine's exec (whose fake does not
    # run the scripts: what is counted is the path taken, not the answer).
    fake_api.put(url, params={"path": "a.txt"}, content=b"x")
    fake_api.get(url, params={"path": "a.txt"})
    m = scrape(fake_api)
    assert value(m, "den_file_transfers_total", path="exec") == 2
    assert value(m, "den_file_transfers_total", path="host") is None


def test_http_latency_is_by_route_template_and_status_class(
        fake_api: ApiClient, running: dict[str, Any]) -> None:
    fake_api.exec(running["id"], ["true"])
    fake_api.get(f"{WS}/api")
    fake_api.get(f"{WS}/no-such-workspace")
    fake_api.get("/no/such/route/at/all")
    m = scrape(fake_api)
    name = "den_http_request_duration_seconds_count"
    assert value(m, name, method="POST", route=f"{WS}/{{ref}}/exec", status="2xx") == 1
    assert value(m, name, method="GET", route=f"{WS}/{{ref}}", status="2xx") is not None
    assert value(m, name, method="GET", route=f"{WS}/{{ref}}", status="4xx") == 1
    assert value(m, name, method="GET", route="unmatched", status="4xx") == 1
    routes = {dict(labels).get("route") for (n, labels) in m if n == name}
    assert not any(running["id"] in r or "no-such" in r for r in routes if r), routes


def test_exec_and_lifecycle_durations_and_failures_by_cause(
        fake_api: ApiClient, fake_runtime: FakeRuntime, running: dict[str, Any]) -> None:
    ws_id = running["id"]
    fake_api.exec(ws_id, ["true"])
    fake_api.exec(ws_id, "exit 3")
    assert fake_api.post(f"{WS}/{ws_id}/pause").status_code == 200
    assert fake_api.post(f"{WS}/{ws_id}/resume").status_code == 200
    fake_runtime.fail_next["pause"] = EngineError("pause workspace: boom")
    assert_error(fake_api.post(f"{WS}/{ws_id}/pause"), 502, "engine_error")
    r = fake_api.post(f"{WS}/{ws_id}/snapshots", json={"name": "s1"})
    assert r.status_code in (200, 201), r.text
    assert fake_api.post(f"{WS}/{ws_id}/stop").status_code == 200
    assert_error(fake_api.post(f"{WS}/{ws_id}/resume"), 409)  # stopped: a conflict, counted
    m = scrape(fake_api)
    assert value(m, "den_exec_duration_seconds_count", kind="exec", outcome="ok") == 2
    ops = "den_operation_duration_seconds_count"
    assert value(m, ops, operation="create", result="ok") == 1
    assert value(m, ops, operation="pause", result="ok") == 1
    assert value(m, ops, operation="pause", result="failed") == 1
    assert value(m, ops, operation="resume", result="failed") == 1
    assert value(m, ops, operation="resume", result="ok") == 1
    assert value(m, ops, operation="snapshot", result="ok") == 1
    assert value(m, ops, operation="stop", result="ok") == 1
    fails = "den_operation_failures_total"
    assert value(m, fails, operation="pause", cause="engine_error") == 1
    assert value(m, fails, operation="resume", cause="conflict") == 1
    assert value(m, "den_engine_errors_total", kind="engine_error") == 1


def test_reaper_actions_and_workspace_usage(fake_api: ApiClient, fake_runtime: FakeRuntime,
                                            running: dict[str, Any]) -> None:
    ws_id = running["id"]
    container = next(iter(fake_runtime.containers.values()))
    container.cpu_ns = 3 * 10**9
    container.memory_bytes = 200 * 2**20
    reaper = fake_api.app.state.reaper
    assert fake_api.call(reaper.run_once) == []  # measures the CPU, pauses nothing
    m = scrape(fake_api)
    assert value(m, "den_workspace_cpu_seconds_total", workspace=ws_id) == 3.0
    assert value(m, "den_workspace_memory_bytes", workspace=ws_id) == 200 * 2**20
    then = datetime.now(UTC) - timedelta(days=2)
    with fake_api.app.state.sessions.begin() as s:
        s.execute(update(Workspace).where(Workspace.id == ws_id)
                  .values(last_activity_at=then, updated_at=then))
    assert [a for _, a in fake_api.call(reaper.run_once)] == ["freeze"]
    m = scrape(fake_api)
    assert value(m, "den_reaper_actions_total", action="freeze", result="ok") == 1
    # Frozen: no longer a running workspace's CPU or memory.
    assert value(m, "den_workspace_cpu_seconds_total", workspace=ws_id) is None
    assert value(m, "den_workspace_memory_bytes", workspace=ws_id) is None


def test_checkpoint_disk_use(fake_api: ApiClient) -> None:
    saved = fake_api.app.state.settings.data_dir / "snapshots" / "snap1"
    saved.mkdir(parents=True)
    (saved / "pages.img").write_bytes(b"x" * 100_000)
    m = scrape(fake_api)
    assert (value(m, "den_checkpoint_bytes", kind="snapshot") or 0) >= 100_000
    assert value(m, "den_checkpoint_bytes", kind="pause") == 0  # the fake keeps none on disk


def test_open_sessions_gauge() -> None:
    metrics = Metrics()
    with metrics.session_open("terminal"), metrics.session_open("terminal"):
        metrics.session_opened("ssh")
        m = parse(metrics.exposition().decode())
        assert value(m, "den_open_sessions", kind="terminal") == 2
        assert value(m, "den_open_sessions", kind="ssh") == 1
    metrics.session_closed("ssh")
    m = parse(metrics.exposition().decode())
    assert value(m, "den_open_sessions", kind="terminal") == 0
    assert value(m, "den_open_sessions", kind="ssh") == 0
    assert value(m, "den_open_sessions", kind="exec_stream") == 0


def test_an_open_exec_stream_counts_while_it_relays(fake_api: ApiClient,
                                                    running: dict[str, Any]) -> None:
    def streams() -> float | None:
        return value(scrape(fake_api), "den_open_sessions", kind="exec_stream")

    def wait_for(n: float) -> None:
        deadline = time.monotonic() + 30
        while streams() != n:
            assert time.monotonic() < deadline, f"den_open_sessions never reached {n}"
            time.sleep(0.01)

    assert streams() == 0
    with fake_api.client.websocket_connect(f"{WS}/api/exec/stream",
                                           headers=fake_api.h()) as ws:
        ws.send_json({"cmd": ["cat"]})  # the fake's cat runs until its stdin closes
        wait_for(1)
        ws.send_json({"type": "close_stdin"})
        assert ws.receive_json() == {"type": "exit", "exit_code": 0}
    wait_for(0)
