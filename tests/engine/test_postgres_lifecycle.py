"""The engine suite's lifecycle on PostgreSQL (issue 11, tests): a real server on the Docker
engine with gVisor whose database is a real PostgreSQL, through create, exec, pause (memory
checkpoint), resume, snapshot, fork, the per-user limits and delete."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from server.app import create_app
from server.config import Settings
from server.db.session import make_engine
from tests.conftest import ApiClient, engine_objects, users

pytestmark = [pytest.mark.engine, pytest.mark.postgres]


@pytest.fixture
def pg_api(engine: None, postgres_url: str, make_settings: Callable[..., Settings]
           ) -> Iterator[ApiClient]:
    name = f"den_lifecycle_{int(time.time() * 1000) % 10**8}"
    admin = make_engine(postgres_url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    settings = make_settings(database_url=postgres_url.rsplit("/", 1)[0] + f"/{name}")
    app = create_app(settings)
    with TestClient(app) as client:
        api = ApiClient(client, users(app))
        try:
            yield api
        finally:
            for ws in client.get("/api/v1/workspaces", headers=api.h("root")).json().get(
                    "workspaces", []):
                with contextlib.suppress(Exception):
                    client.delete(f"/api/v1/workspaces/{ws['id']}", headers=api.h("root"),
                                  params={"snapshots": "true"})


def test_lifecycle_on_postgresql(pg_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    api = pg_api
    assert api.app.state.settings.resolved_database_url().startswith("postgresql")
    prefix = api.app.state.settings.engine_prefix
    ws = api.create(make_repo())
    wid = ws["id"]
    assert ws["state"] == "running", ws
    out = api.exec(wid, "echo hi > notes.txt; tmux new-session -d -s keep 'sleep 100000'; "
                        "cat notes.txt")
    assert (out["exit_code"], out["stdout"]) == (0, "hi\n")

    r = api.post(f"/api/v1/workspaces/{wid}/pause")
    assert (r.status_code, r.json()["state"]) == (200, "paused"), r.text
    r = api.post(f"/api/v1/workspaces/{wid}/resume")
    assert (r.status_code, r.json()["state"]) == (200, "running"), r.text
    assert api.exec(wid, "tmux has-session -t keep && echo alive")["stdout"] == "alive\n"

    r = api.post(f"/api/v1/workspaces/{wid}/snapshots", json={"name": "pg"})
    assert r.status_code == 201, r.text
    snap = r.json()
    r = api.post("/api/v1/workspaces", json={"name": "fork", "from_snapshot": snap["id"]})
    assert r.status_code == 202, r.text
    fork = api.wait_state(r.json()["id"])
    assert fork["state"] == "running", fork
    assert api.exec(fork["id"], "cat notes.txt")["stdout"] == "hi\n"

    # The per-user limits count on PostgreSQL too (two workspaces, one snapshot).
    quotas = api.get("/api/v1/users/me").json()["quotas"]
    assert (quotas["workspaces"]["used"], quotas["snapshots"]["used"]) == (2, 1)
    r = api.put("/api/v1/users/alice/limits", user="root", json={"workspaces": 2})
    assert r.status_code == 200, r.text
    r = api.post("/api/v1/workspaces", json={"name": "third", "from_snapshot": snap["id"]})
    assert (r.status_code, r.json()["error"]["limit"]) == (409, "workspaces"), r.text

    events = api.get(f"/api/v1/workspaces/{wid}/events").json()["events"]
    assert [e["to_state"] for e in events if e["kind"] == "state"][:6] == [
        "creating", "running", "pausing", "paused", "resuming", "running"]
    for ref in (fork["id"], wid):
        assert api.delete(f"/api/v1/workspaces/{ref}",
                          params={"snapshots": "true"}).status_code == 204
    assert api.get("/api/v1/workspaces").json()["workspaces"] == []
    assert engine_objects(f"{prefix}-{wid}") == []
    assert engine_objects(f"{prefix}-{snap['id']}") == []
