"""Migrations on SQLite and on a real PostgreSQL: head on an empty database matches the models."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import Engine, inspect, text

from server.app import create_app
from server.auth.tokens import ensure_user, issue_token
from server.config import Settings
from server.db.migrate import SchemaOutOfDate, ensure_schema, head_revision, upgrade
from server.db.models import Base
from server.db.session import make_engine
from server.runtime.fake import FakeRuntime

pytestmark = pytest.mark.postgres


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'den.db'}"
        return
    base: str = request.getfixturevalue("postgres_url")
    name = f"den_{request.node.name.split('[')[0][-20:]}_{int(time.time() * 1000) % 10**8}"
    admin = make_engine(base)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    yield base.rsplit("/", 1)[0] + f"/{name}"


def _fresh(url: str) -> Engine:
    engine = make_engine(url)
    assert inspect(engine).get_table_names() == []
    return engine


def test_upgrade_head_on_empty_database_matches_models(db_url: str) -> None:
    engine = _fresh(db_url)
    upgrade(engine, db_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
        rev = ctx.get_current_revision()
    assert diff == []
    assert rev == head_revision(db_url)
    assert {"forge_accounts", "pull_requests"} <= set(inspect(engine).get_table_names())
    upgrade(engine, db_url)  # a second upgrade is a no-op
    engine.dispose()


def test_out_of_date_schema_is_refused_without_auto_migrate(db_url: str) -> None:
    engine = _fresh(db_url)
    with pytest.raises(SchemaOutOfDate, match="den admin migrate"):
        ensure_schema(engine, db_url, auto_migrate=False)
    ensure_schema(engine, db_url, auto_migrate=True)
    ensure_schema(engine, db_url, auto_migrate=False)
    engine.dispose()


def test_the_app_works_on_the_database(
    db_url: str, make_settings: Callable[..., Settings], make_repo: Callable[..., Path]
) -> None:
    settings = make_settings(database_url=db_url)
    app = create_app(settings, runtime=FakeRuntime())
    with TestClient(app) as client:
        with app.state.sessions.begin() as s:
            token = issue_token(s, ensure_user(s, "alice"))[1]
        h = {"Authorization": f"Bearer {token}"}
        for kind in ("tokens", "ssh-keys", "forges"):  # the largest id the columns take
            r = client.delete(f"/api/v1/users/me/{kind}/{2**31 - 1}", headers=h)
            assert r.status_code == 404, r.text
            r = client.delete(f"/api/v1/users/me/{kind}/{2**31}", headers=h)
            assert r.status_code == 422, r.text
        r = client.post("/api/v1/workspaces", headers=h,
                        json={"name": "api", "repo": {"url": str(make_repo())}})
        assert r.status_code == 202, r.text
        wid = r.json()["id"]
        deadline = time.monotonic() + 30
        while client.get(f"/api/v1/workspaces/{wid}", headers=h).json()["state"] == "creating":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ws = client.get(f"/api/v1/workspaces/{wid}", headers=h).json()
        assert ws["state"] == "running" and ws["created_at"].endswith("Z")
        assert client.post(f"/api/v1/workspaces/{wid}/stop", headers=h).json()["state"] == (
            "stopped")
        events = client.get(f"/api/v1/workspaces/{wid}/events", headers=h).json()["events"]
        assert [e["to_state"] for e in events if e["kind"] == "state"] == [
            "creating", "running", "stopping", "stopped"]
        assert client.delete(f"/api/v1/workspaces/{wid}", headers=h).status_code == 204


def test_serve_refuses_an_old_schema_with_a_clear_message(tmp_path: Path) -> None:
    env = {"DEN_DATA_DIR": str(tmp_path), "DEN_AUTO_MIGRATE": "false", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "server.cli", "admin", "token", "--user", "a"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "den admin migrate" in out.stderr
