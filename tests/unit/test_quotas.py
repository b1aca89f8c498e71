"""Per-user limits (issue 11 §2 and finding 5): stock limits are 409s that name the limit,
concurrency limits 429s, other users are unaffected, ``GET /users/me`` shows use against
limits, admins set a user's own, and two creates at once cannot both take the last slot."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from starlette.websockets import WebSocketDisconnect

from server.app import create_app
from server.config import Settings
from server.db.migrate import ensure_schema
from server.db.models import User, Workspace
from server.db.session import make_engine, make_session_factory
from server.errors import LimitReached, ValidationFailed
from server.quotas import limits
from server.quotas.service import Quotas
from server.runtime.fake import FakeRuntime
from tests.conftest import ApiClient, users
from tests.unit.test_api_fake import assert_error

WS = "/api/v1/workspaces"


@pytest.fixture
def api(make_settings: Callable[..., Settings], fake_runtime: FakeRuntime
        ) -> Iterator[ApiClient]:
    app = create_app(make_settings(exec_concurrency=8), runtime=fake_runtime)
    with TestClient(app) as client:
        yield ApiClient(client, users(app))


def set_limits(api: ApiClient, user: str, **values: Any) -> dict[str, Any]:
    r = api.put(f"/api/v1/users/{user}/limits", user="root", json=values)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _wait_for(cond: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# --- the policy as data ---------------------------------------------------------------------


def test_overrides_replace_the_servers_limits_and_bad_ones_are_refused(
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(max_workspaces_per_user=3, max_cpus_per_user=4.0)
    assert limits.effective(settings, {})["workspaces"] == 3
    mine = limits.effective(settings, {"workspaces": 7, "cpus": 1.5, "bogus": 1,
                                       "execs": "many"})
    assert (mine["workspaces"], mine["cpus"]) == (7, 1.5)
    assert mine["execs"] == settings.max_execs_per_user  # a malformed stored entry: ignored
    assert limits.validate_overrides({"workspaces": 2, "cpus": None}) == {"workspaces": 2}
    for bad in ({"nope": 1}, {"workspaces": -1}, {"workspaces": 1.5}, {"execs": True}):
        with pytest.raises(ValidationFailed):
            limits.validate_overrides(bad)


# --- through the API ------------------------------------------------------------------------


def test_me_shows_use_against_limits_and_admins_set_a_users_own(
        api: ApiClient, make_repo: Callable[..., Path]) -> None:
    api.create(make_repo(), name="one", resources={"cpus": 1.5, "memory_mb": 512})
    quotas = api.get("/api/v1/users/me").json()["quotas"]
    assert set(quotas) == set(limits.LIMITS)
    assert quotas["workspaces"] == {"limit": 20, "used": 1, "default": 20}
    assert quotas["cpus"]["used"] == 1.5 and quotas["memory_mb"]["used"] == 512
    assert quotas["execs"]["used"] == 0

    out = set_limits(api, "alice", workspaces=1, cpus=2.5)
    assert out["user"] == "alice"
    assert out["quotas"]["workspaces"] == {"limit": 1, "used": 1, "default": 20}
    assert api.get("/api/v1/users/me").json()["quotas"]["cpus"]["limit"] == 2.5
    assert api.get("/api/v1/users/me", user="bob").json()["quotas"]["workspaces"]["limit"] == 20
    # the body replaces what was set: cpus goes back to the server's
    set_limits(api, "alice", workspaces=1)
    assert api.get("/api/v1/users/alice/limits", user="root").json()["quotas"]["cpus"][
        "limit"] == 32

    assert_error(api.put("/api/v1/users/alice/limits", user="alice", json={"workspaces": 99}),
                 403, "forbidden")
    assert_error(api.get("/api/v1/users/alice/limits", user="bob"), 403, "forbidden")
    assert_error(api.put("/api/v1/users/nobody/limits", user="root", json={}), 404, "not_found")
    assert_error(api.put("/api/v1/users/alice/limits", user="root", json={"workspaces": -1}),
                 422, "invalid")
    assert_error(api.put("/api/v1/users/alice/limits", user="root", json={"bogus": 1}),
                 422, "invalid")


def test_resource_limits_refuse_a_create_with_409_naming_the_limit(
        api: ApiClient, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    repo = make_repo()
    set_limits(api, "alice", cpus=3, memory_mb=4096, disk_gb=15)
    api.create(repo, name="one", resources={"cpus": 2, "memory_mb": 1024, "disk_gb": 10})
    containers = dict(fake_runtime.containers)
    for name, resources, limit, value in (
            ("two", {"cpus": 1.5}, "cpus", 3),
            ("three", {"cpus": 1, "memory_mb": 3500}, "memory_mb", 4096),
            ("four", {"cpus": 1, "disk_gb": 6}, "disk_gb", 15)):
        r = api.post(WS, json={"name": name, "repo": {"url": str(repo)},
                               "resources": resources})
        body = assert_error(r, 409, "quota_exceeded")
        assert (body["limit"], body["value"]) == (limit, value), body
        assert f"{limit}: {value:g}" in body["message"]
    assert [w["name"] for w in api.get(WS).json()["workspaces"]] == ["one"]
    assert fake_runtime.containers == containers  # nothing made for the refused ones
    # within the limits, it passes; bob is not concerned by alice's limits
    api.create(repo, name="five", resources={"cpus": 1, "memory_mb": 1024, "disk_gb": 5})
    api.create(repo, name="one", user="bob", resources={"cpus": 4})


def test_snapshot_limit_counts_those_of_deleted_workspaces(
        api: ApiClient, make_repo: Callable[..., Path]) -> None:
    set_limits(api, "alice", snapshots=2)
    repo = make_repo()
    first = api.create(repo, name="one")
    for name in ("a", "b"):
        r = api.post(f"{WS}/{first['id']}/snapshots", json={"name": name})
        assert r.status_code == 201, r.text
    assert api.delete(f"{WS}/{first['id']}").status_code in (200, 202, 204)
    second = api.create(repo, name="two")
    r = api.post(f"{WS}/{second['id']}/snapshots", json={"name": "c", "memory": True})
    body = assert_error(r, 409, "quota_exceeded")
    assert (body["limit"], body["value"]) == ("snapshots", 2)
    assert api.get("/api/v1/users/me").json()["quotas"]["snapshots"]["used"] == 2
    # the snapshot is the owner's: an admin taking it counts it against the owner's limit
    assert_error(api.post(f"{WS}/{second['id']}/snapshots", json={"name": "c"}, user="root"),
                 409, "quota_exceeded")
    set_limits(api, "alice", snapshots=3)
    assert api.post(f"{WS}/{second['id']}/snapshots", json={"name": "c"}).status_code == 201


def test_one_users_execs_are_capped_and_other_users_are_unaffected(
        api: ApiClient, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    """Finding 5: one user's long execs fill their own limit (429), not the server's gate."""
    set_limits(api, "alice", execs=2)
    repo = make_repo()
    mine = api.create(repo, name="api")
    bobs = api.create(repo, name="api", user="bob")
    quotas = api.app.state.workspaces.quotas
    alice_id = api.get("/api/v1/users/me").json()["id"]
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(
        api.post(f"{WS}/{mine['id']}/exec", json={"cmd": ["block"]}))) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: quotas.held(alice_id, "execs") == 2)
        r = api.post(f"{WS}/{mine['id']}/exec", json={"cmd": ["true"]})
        body = assert_error(r, 429, "quota_exceeded")
        assert (body["limit"], body["value"]) == ("execs", 2)
        assert api.get("/api/v1/users/me").json()["quotas"]["execs"]["used"] == 2
        # bob's exec runs at once: alice holds 2 of the server's 8 slots
        assert api.exec(bobs["id"], ["true"], user="bob")["exit_code"] == 0
    finally:
        api.call(fake_runtime.release.set)
        for t in threads:
            t.join()
    assert [r.status_code for r in results] == [200, 200]
    assert quotas.held(alice_id, "execs") == 0
    assert api.exec(mine["id"], ["true"])["exit_code"] == 0


@pytest.mark.parametrize("kind", ["streams", "terminals"])
def test_open_streams_and_terminals_are_capped_and_released_when_they_end(
        api: ApiClient, fake_runtime: FakeRuntime, make_repo: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    ws = api.create(make_repo(), name="api")
    original = fake_runtime.exec_stream

    async def as_cat(spec: Any, req: Any) -> Any:  # the fake's cat runs until stdin closes
        return await original(spec, dataclasses.replace(req, argv=["cat"]))

    monkeypatch.setattr(fake_runtime, "exec_stream", as_cat)
    set_limits(api, "alice", **{kind: 1})
    url = f"{WS}/{ws['id']}/exec/stream" if kind == "streams" else f"{WS}/{ws['id']}/terminal"

    def opened(sock: Any) -> None:
        if kind == "streams":
            sock.send_json({"cmd": ["cat"]})
        else:
            assert sock.receive_json()["type"] == "status"

    alice_id = api.get("/api/v1/users/me").json()["id"]
    quotas = api.app.state.workspaces.quotas
    with api.client.websocket_connect(url, headers=api.h()) as first:
        opened(first)
        _wait_for(lambda: quotas.held(alice_id, kind) == 1)
        with api.client.websocket_connect(url, headers=api.h()) as second:
            if kind == "streams":
                second.send_json({"cmd": ["cat"]})
            msg = second.receive_json()
            assert msg["type"] == "error", msg
            assert msg["error"]["code"] == "quota_exceeded"
            assert f"{kind}: 1" in msg["error"]["message"]
            with pytest.raises(WebSocketDisconnect) as closed:
                second.receive_json()
            assert closed.value.code == 4429
    _wait_for(lambda: quotas.held(alice_id, kind) == 0)


# --- race-safety ----------------------------------------------------------------------------


def test_two_creates_at_once_cannot_both_take_the_last_slot(
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(max_workspaces_per_user=1)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    race_for_the_last_slot(settings)  # and on PostgreSQL: tests/db/test_quotas_db.py


def race_for_the_last_slot(settings: Settings) -> None:
    """Two servers (two connections) insert a workspace for the same user at once: the
    second's check waits for the first's transaction, then sees its row. Without the lock,
    both read 0 workspaces, both insert, and the user has 2 with a limit of 1."""
    assert settings.max_workspaces_per_user == 1
    url = settings.resolved_database_url()
    engine = make_engine(url)
    ensure_schema(engine, url, auto_migrate=True)
    sessions = make_session_factory(engine)
    with sessions.begin() as s:
        s.add(User(name="racer"))
    with sessions() as s:
        racer = s.scalar(select(User).where(User.name == "racer"))
    assert racer is not None
    quotas = Quotas(settings=settings, sessions=sessions)
    checked = [threading.Event(), threading.Event()]
    outcomes: list[str] = []

    def insert(me: int) -> None:
        try:
            with sessions.begin() as s:
                quotas.check_workspace(s, racer, cpus=1, memory_mb=128, disk_gb=1)
                checked[me].set()
                # Give the other a chance to check too (it must not get past its check
                # while this transaction is open).
                checked[1 - me].wait(timeout=1.0)
                s.add(Workspace(id=f"w{me}", owner_id=racer.id, name=f"w{me}", repo_url="x",
                                repo_dir="x", image="i", runtime="gvisor", cpus=1,
                                memory_mb=128, disk_gb=1, pids_limit=1, state="creating"))
            outcomes.append("created")
        except LimitReached:
            outcomes.append("refused")

    threads = [threading.Thread(target=insert, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with sessions() as s:
        count = s.scalar(select(func.count()).select_from(Workspace)
                         .where(Workspace.owner_id == racer.id))
    engine.dispose()
    assert sorted(outcomes) == ["created", "refused"]
    assert count == 1


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_me_and_limits(api: ApiClient, make_repo: Callable[..., Path],
                           capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from server.client.api import Den
    from server.client.commands import add_client_commands
    from server.client.config import ClientConfig

    def cli(user: str, *argv: str) -> int:
        parser = argparse.ArgumentParser(prog="den")
        sub = parser.add_subparsers(dest="command", required=True)
        add_client_commands(sub, client_factory=lambda _c: Den(
            "http://testserver", api.tokens[user],
            transport=api.client._transport))  # the app itself, in process
        args = parser.parse_args(list(argv))
        return int(args.func(args))

    monkeypatch.setattr("server.client.commands.load_config",
                        lambda: ClientConfig("http://testserver", "x"))
    api.create(make_repo(), name="one", resources={"cpus": 1.5})
    assert cli("root", "limits", "alice", "workspaces=3", "cpus=2.5") == 0
    capsys.readouterr()
    assert cli("alice", "me") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "alice"
    rows = {line.split()[0]: line.split()[1:] for line in out[2:]}
    assert rows["workspaces"] == ["1", "3", "(server:", "20)"]
    assert rows["cpus"][:2] == ["1.5", "2.5"]
    assert cli("root", "limits", "alice", "cpus=default") == 0  # workspaces=3 stays
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out[1:]}
    assert rows["workspaces"][:2] == ["1", "3"] and rows["cpus"] == ["1.5", "32"]
    assert cli("alice", "limits", "alice", "workspaces=99") == 1
    assert "admin" in capsys.readouterr().err
