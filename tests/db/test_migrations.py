"""Migrations on SQLite and on a real PostgreSQL: head on an empty database matches the models."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
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


def test_a_database_from_the_first_migration_upgrades_to_head_with_its_data(
        db_url: str, make_settings: Callable[..., Settings]) -> None:
    """Rows written under revision 0001 (a user, a token, a workspace, its events) survive
    every later migration, get the defaults of the columns added since, and serve the app."""
    from alembic import command

    from server.auth.tokens import hash_token
    from server.db.migrate import alembic_config

    engine = _fresh(db_url)
    cfg = alembic_config(db_url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    secret = "den_" + "m" * 43
    at = "2026-01-02 03:04:05+00:00"
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (name, is_admin, created_at) "
                          "VALUES ('olduser', false, :at)"), {"at": at})
        uid = conn.execute(text("SELECT id FROM users WHERE name = 'olduser'")).scalar_one()
        conn.execute(text("INSERT INTO api_tokens (user_id, name, token_hash, prefix, "
                          "created_at) VALUES (:u, 'cli', :h, :p, :at)"),
                     {"u": uid, "h": hash_token(secret), "p": secret[:12], "at": at})
        conn.execute(text(
            "INSERT INTO workspaces (id, owner_id, name, repo_url, repo_branch, repo_dir, "
            "image, runtime, cpus, memory_mb, disk_gb, gpus, pids_limit, env, idle_timeout_s, "
            "keep_alive, state, state_reason, engine, created_at, updated_at, "
            "last_activity_at) VALUES ('wsold0000001', :u, 'legacy', 'https://x.example/a.git',"
            " NULL, 'a', 'den/workspace:latest', 'gvisor', 1.5, 1024, 5, 0, 512, "
            "'{\"A\": \"1\"}', NULL, false, 'stopped', '', "
            "'{\"container\": \"den-wsold0000001\"}', :at, :at, :at)"), {"u": uid, "at": at})
        for to_state in ("creating", "running", "stopping", "stopped"):
            conn.execute(text("INSERT INTO events (workspace_id, at, kind, to_state, actor, "
                              "message) VALUES ('wsold0000001', :at, 'state', :s, 'olduser', "
                              "'')"), {"at": at, "s": to_state})
    upgrade(engine, db_url)
    assert current_revision_of(engine) == head_revision(db_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []
    engine.dispose()

    settings = make_settings(database_url=db_url)
    app = create_app(settings, runtime=FakeRuntime())
    with TestClient(app) as client:
        h = {"Authorization": f"Bearer {secret}"}
        me = client.get("/api/v1/users/me", headers=h)
        assert me.status_code == 200, me.text
        assert me.json()["name"] == "olduser"
        quotas = me.json()["quotas"]
        assert quotas["workspaces"]["used"] == 1 and quotas["cpus"]["used"] == 1.5
        assert quotas["workspaces"]["limit"] == settings.max_workspaces_per_user  # limits: {}
        ws = client.get("/api/v1/workspaces/legacy", headers=h).json()
        # (its state is reconcile's: the fake engine has no container for it)
        assert (ws["id"], ws["resources"]["memory_mb"]) == ("wsold0000001", 1024)
        assert ws["network"]["mode"] == settings.network_default_mode  # network: {}
        events = client.get("/api/v1/workspaces/legacy/events", headers=h).json()["events"]
        assert [e["to_state"] for e in events][:4] == ["creating", "running", "stopping",
                                                       "stopped"]
        assert client.get("/api/v1/users/me/tokens", headers=h).json()["tokens"][0][
            "expires_at"] is None  # added by 0009: never


def current_revision_of(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_snapshots_get_their_engine_handle_from_their_image_and_volume(db_url: str) -> None:
    """0016: the Docker backend's names of a snapshot's objects move from two columns into
    the snapshot's engine handle, and back on a downgrade."""
    from alembic import command

    from server.db.migrate import alembic_config

    engine = _fresh(db_url)
    cfg = alembic_config(db_url)
    at = "2026-01-02 03:04:05+00:00"
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0015")
        conn.execute(text("INSERT INTO users (name, is_admin, created_at, limits) "
                          "VALUES ('o', false, :at, '{}')"), {"at": at})
        uid = conn.execute(text("SELECT id FROM users WHERE name = 'o'")).scalar_one()
        conn.execute(text(
            "INSERT INTO snapshots (id, owner_id, name, memory, image, volume, repo_url, "
            "repo_dir, runtime, network, size_bytes, created_at) VALUES ('snold', :u, 's', "
            "false, 'den-snapshot:snold', 'den-snold-snap', 'https://x.example/a.git', 'a', "
            "'gvisor', '{}', 1, :at)"), {"u": uid, "at": at})
        command.upgrade(cfg, "0016")
        row = conn.execute(text("SELECT image, engine FROM snapshots")).one()
        engine_json = row[1] if isinstance(row[1], dict) else json.loads(row[1])
        assert (row[0], engine_json) == ("den-snapshot:snold", {
            "image": "den-snapshot:snold", "volume": "den-snold-snap"})
        assert "volume" not in {c["name"] for c in inspect(conn).get_columns("snapshots")}
        command.downgrade(cfg, "0015")
        assert conn.execute(text("SELECT volume FROM snapshots")).scalar_one() == "den-snold-snap"
    engine.dispose()
