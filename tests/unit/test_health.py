"""``/healthz`` says what works, and the engine supervisor reconciles whenever the engine
comes (back): unit tests on the fake runtime, made unreachable and reachable again."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import sessionmaker

from server.app import create_app
from server.config import Settings
from server.db.session import make_engine
from server.runtime.fake import FakeRuntime
from tests.conftest import ApiClient, users

WAIT_S = 30  # bound on every wait below; the retries in these tests come every 50 ms


def wait_for(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def health(api: ApiClient) -> tuple[int, dict[str, Any]]:
    r = api.client.get("/healthz")
    return r.status_code, r.json()


@pytest.fixture
def make_api(make_settings: Callable[..., Settings], fake_runtime: FakeRuntime
             ) -> Iterator[Callable[..., ApiClient]]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> ApiClient:
        settings = make_settings(**{"engine_check_interval_s": 0.05,
                                    "engine_retry_max_s": 0.05, **overrides})
        client = TestClient(create_app(settings, runtime=fake_runtime))
        client.__enter__()
        clients.append(client)
        return ApiClient(client, users(client.app))

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_started_while_the_engine_is_down_it_is_503_then_reconciles_once_it_is_back(
        make_api: Callable[..., ApiClient], fake_runtime: FakeRuntime) -> None:
    fake_runtime.available = False
    api = make_api()
    status, body = health(api)
    assert status == 503
    assert body["status"] == "unavailable"
    assert body["engine"]["ok"] is False and body["engine"]["reconciled"] is False
    assert "down" in body["engine"]["error"]
    assert body["database"]["ok"] is True
    assert api.app.state.engine.reconciles == 0

    fake_runtime.available = True
    wait_for("healthz 200", lambda: health(api)[0] == 200)
    assert health(api)[1]["status"] == "ok"
    assert api.app.state.engine.reconciles == 1
    assert "list_objects" in fake_runtime.calls  # reconcile asked the engine what it has


def test_the_engine_going_away_while_den_runs(
        make_api: Callable[..., ApiClient], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    api = make_api()
    ws = api.create(make_repo("api"), name="api")
    assert ws["state"] == "running"
    assert health(api)[0] == 200

    fake_runtime.available = False  # dockerd stops; its containers stop with it
    next(iter(fake_runtime.containers.values())).running = False
    wait_for("healthz 503", lambda: health(api)[0] == 503)
    assert health(api)[1]["engine"]["ok"] is False

    fake_runtime.available = True
    wait_for("healthz 200", lambda: health(api)[0] == 200)
    assert api.app.state.engine.reconciles == 2
    # Reconcile ran again: the workspace is no longer said to be running.
    got = api.get(f"/api/v1/workspaces/{ws['id']}").json()
    assert got["state"] == "stopped"
    events = api.get(f"/api/v1/workspaces/{ws['id']}/events").json()["events"]
    assert events[-1]["actor"] == "reconcile"


def test_a_call_that_finds_the_engine_down_turns_health_at_once(
        make_api: Callable[..., ApiClient], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    api = make_api(engine_check_interval_s=3600, engine_retry_max_s=3600)
    assert health(api)[0] == 200
    fake_runtime.available = False
    r = api.post("/api/v1/workspaces", json={"name": "api", "repo": {"url": str(make_repo())}})
    assert r.status_code == 503
    status, body = health(api)
    assert status == 503
    assert body["engine"]["error"] == "the fake engine is down"


def test_the_database_unreachable_is_503(make_api: Callable[..., ApiClient],
                                         tmp_path: Path) -> None:
    api = make_api()
    assert health(api)[0] == 200
    broken = make_engine(f"sqlite:///{tmp_path}/no/such/dir/den.db")
    api.app.state.sessions = sessionmaker(broken)
    status, body = health(api)
    assert status == 503
    assert body["status"] == "unavailable"
    assert body["database"] == {"ok": False, "error": "the database did not answer (see the log)"}
    assert body["engine"]["ok"] is True
    broken.dispose()
