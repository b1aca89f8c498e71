"""Linked forge accounts through the HTTP API (fake runtime, a real HTTP test forge): tokens
checked with the forge, encrypted at rest (the raw row), never returned; key rotation;
refusals of the pull-request route that come before any work; the client and the CLI."""

from __future__ import annotations

import argparse
import json
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient

from server.app import create_app
from server.cli import build_parser
from server.client import Den, PullRequest
from server.client.commands import add_client_commands
from server.client.config import ClientConfig, save_config
from server.config import Settings
from server.db.models import ForgeAccount
from server.forges.accounts import ForgeAccounts, rotate_key_file
from server.runtime.fake import FakeRuntime
from tests.conftest import ApiClient, users
from tests.forge_server import ForgeServer, make_forge_repo

TOKEN = "ghp_accounttest_0123456789abcdef"


@pytest.fixture
def forge(tmp_path: Path) -> Iterator[ForgeServer]:
    with ForgeServer("github", tmp_path / "forge") as f:
        f.add_user("alice-gh", TOKEN, name="Alice Liddell", email=None)
        make_forge_repo(f, "acme/api", {"README.md": "# api\n"})
        yield f


@pytest.fixture
def api(make_settings: Callable[..., Settings]) -> Iterator[ApiClient]:
    app = create_app(make_settings(allowed_git_schemes=["http", "https"]),
                     runtime=FakeRuntime())
    with TestClient(app) as client:
        yield ApiClient(client, users(app))


def link(api: ApiClient, forge: ForgeServer, token: str = TOKEN, user: str = "alice",
         **extra: Any) -> Any:
    return api.post("/api/v1/users/me/forges", user=user,
                    json={"kind": "github", "base_url": forge.url + "/", "token": token,
                          **extra})


def raw_rows(settings: Settings) -> list[tuple[int, str]]:
    with sqlite3.connect(settings.data_dir / "den.db") as db:
        return list(db.execute("SELECT id, token_encrypted FROM forge_accounts"))


def test_link_list_unlink_and_the_token_is_encrypted_at_rest(
        api: ApiClient, forge: ForgeServer) -> None:
    r = link(api, forge)
    assert r.status_code == 201, r.text
    acct = r.json()
    assert TOKEN not in r.text and "token" not in {k for k in acct if k != "token_hint"}
    assert acct["username"] == "alice-gh" and acct["base_url"] == forge.url
    assert acct["api_url"] == forge.url + "/api/v3"
    assert acct["author_name"] == "Alice Liddell"
    assert acct["author_email"] == "4242+alice-gh@users.noreply.127.0.0.1"
    assert acct["token_hint"] == TOKEN[-4:]
    # The forge was asked who the token belongs to, the way GitHub documents it.
    (who,) = forge.requests("/api/v3/user")
    assert who.headers["authorization"] == f"Bearer {TOKEN}"
    assert who.headers["accept"] == "application/vnd.github+json"

    settings: Settings = api.app.state.settings
    [(row_id, blob)] = raw_rows(settings)
    assert TOKEN not in blob and TOKEN[-10:] not in blob
    key_file = settings.data_dir / "forge.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert Fernet(key_file.read_text().strip().encode()).decrypt(blob.encode()).decode() == TOKEN
    with sqlite3.connect(settings.data_dir / "den.db") as db:
        dump = "\n".join(db.iterdump())
    assert TOKEN not in dump

    listed = api.get("/api/v1/users/me/forges").json()["forges"]
    assert [a["id"] for a in listed] == [row_id] and TOKEN not in json.dumps(listed)
    assert api.get("/api/v1/users/me/forges", user="bob").json()["forges"] == []
    # Linking the same forge again replaces the token (one account per base URL).
    assert link(api, forge, author_name="A. L.", author_email="al@example.com"
                ).status_code == 201
    [again] = api.get("/api/v1/users/me/forges").json()["forges"]
    assert again["id"] == row_id and again["author_email"] == "al@example.com"
    assert api.delete(f"/api/v1/users/me/forges/{row_id}", user="bob").status_code == 404
    assert api.delete(f"/api/v1/users/me/forges/{row_id}").status_code == 204
    assert raw_rows(settings) == []


def test_link_refusals(api: ApiClient, forge: ForgeServer,
                       make_settings: Callable[..., Settings]) -> None:
    bad = link(api, forge, token="ghp_wrong_0000000000000000")
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "forge_token_invalid"
    r = api.post("/api/v1/users/me/forges",
                 json={"kind": "bitbucket", "base_url": forge.url, "token": TOKEN})
    assert r.status_code == 422 and "unknown forge kind" in r.text
    r = api.post("/api/v1/users/me/forges",
                 json={"kind": "github", "base_url": "https://u:p@forge.example", "token": TOKEN})
    assert r.status_code == 422 and "credentials" in r.text
    forge.fail_next(429, {"message": "slow down"}, headers={"Retry-After": "30"})
    limited = link(api, forge)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "30"
    assert limited.json()["error"]["code"] == "forge_rate_limited"
    assert api.get("/api/v1/users/me/forges").json()["forges"] == []
    # Tokens go over http only where the operator allows http.
    app = create_app(make_settings(), runtime=FakeRuntime())
    with TestClient(app) as client:
        strict = ApiClient(client, users(app))
        r = link(strict, forge)
        assert r.status_code == 422 and "not allowed" in r.text


def test_key_rotation_with_the_key_file(api: ApiClient, forge: ForgeServer) -> None:
    assert link(api, forge).status_code == 201
    settings: Settings = api.app.state.settings
    [(_, before)] = raw_rows(settings)
    old_key = (settings.data_dir / "forge.key").read_text()
    count, what = rotate_key_file(settings, api.app.state.sessions)
    assert count == 1 and "new key" in what
    new_key = (settings.data_dir / "forge.key").read_text()
    assert new_key != old_key and len(new_key.split()) == 1
    [(_, after)] = raw_rows(settings)
    assert after != before
    accounts = ForgeAccounts(settings, api.app.state.sessions)
    with api.app.state.sessions() as s:
        row = s.query(ForgeAccount).one()
    assert accounts.credential(row).token == TOKEN


def test_key_rotation_with_configured_keys(make_settings: Callable[..., Settings],
                                           forge: ForgeServer) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    app = create_app(make_settings(allowed_git_schemes=["http"], forge_keys=old),
                     runtime=FakeRuntime())
    with TestClient(app) as client:
        api = ApiClient(client, users(app))
        assert link(api, forge).status_code == 201
        settings: Settings = app.state.settings
        assert not (settings.data_dir / "forge.key").exists()
        [(_, blob)] = raw_rows(settings)
        assert Fernet(old.encode()).decrypt(blob.encode()).decode() == TOKEN
        both = settings.model_copy(update={"forge_keys": settings.forge_keys.__class__(
            f"{new},{old}")})
        assert rotate_key_file(both, app.state.sessions)[0] == 1
        [(_, rotated)] = raw_rows(settings)
        assert Fernet(new.encode()).decrypt(rotated.encode()).decode() == TOKEN


def test_admin_rotate_forge_key_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEN_FORGE_KEYS", raising=False)
    args = build_parser().parse_args(["admin", "rotate-forge-key", "--data-dir", str(tmp_path)])
    assert args.func(args) == 0
    assert "0 forge token(s) re-encrypted" in capsys.readouterr().out
    assert (tmp_path / "forge.key").exists()


def test_pull_request_refusals_before_any_work(api: ApiClient,
                                               make_repo: Callable[..., Path]) -> None:
    ws = api.create(make_repo("api"), name="api")
    assert ws["state"] == "running", ws
    url = f"/api/v1/workspaces/{ws['id']}/pull-requests"
    r = api.post(url, json={"title": "T", "branch": "main"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "push_refused"
    assert "base" in r.json()["error"]["message"]
    r = api.post(url, json={"title": "T", "branch": "release/2.0", "base": "main"})
    assert r.status_code == 403 and "protected" in r.json()["error"]["message"]
    r = api.post(url, json={"title": "T", "branch": "a..b"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_branch"
    r = api.post(url, json={"title": "T", "branch": "feature"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "forge_not_linked"
    r = api.post(url, json={"title": "", "branch": "feature"})
    assert r.status_code == 422
    assert api.post(url, user="bob", json={"title": "T"}).status_code == 404
    kinds = [e["kind"] for e in api.get(f"/api/v1/workspaces/{ws['id']}/events").json()["events"]]
    assert "push" not in kinds and "commit" not in kinds


# --- client and CLI ---------------------------------------------------------------------------

PR_JSON = {"number": 7, "url": "https://forge/acme/api/pull/7", "branch": "den/api",
           "base": "main", "head_sha": "a" * 40, "created": True, "push": "create",
           "forge": "github"}


def _den_api(seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path
        if path == "/api/v1/workspaces/api":
            return httpx.Response(200, json={"id": "id-api", "name": "api", "state": "running"})
        if path == "/api/v1/workspaces/id-api/pull-requests":
            body = json.loads(request.content)
            if body.get("branch") == "main":
                return httpx.Response(403, json={"error": {
                    "code": "push_refused", "message": "branch 'main' is the base"}})
            return httpx.Response(201, json=PR_JSON)
        if path == "/api/v1/users/me/forges" and request.method == "POST":
            return httpx.Response(201, json={"id": 1, "kind": "github", "username": "al",
                                             "base_url": "https://github.com"})
        if path == "/api/v1/users/me/forges":
            return httpx.Response(200, json={"forges": [{
                "id": 1, "kind": "github", "username": "al", "base_url": "https://github.com",
                "author_name": "Al", "author_email": "al@example.com"}]})
        if path == "/api/v1/users/me/forges/1":
            return httpx.Response(204)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})

    return httpx.MockTransport(handle)


def test_client_pull_request_and_forges() -> None:
    seen: list[httpx.Request] = []
    den = Den("http://den.test", "den_t", transport=_den_api(seen))
    pr = den.workspace("api").pull_request("Fix it", body="why", draft=True)
    assert pr == PullRequest(7, str(PR_JSON["url"]), "den/api", "main", "a" * 40, True, "create",
                             "github")
    assert json.loads(seen[-1].content) == {"title": "Fix it", "body": "why", "draft": True}
    den.link_forge("github", "https://github.com", "ghp_x")
    assert json.loads(seen[-1].content)["token"] == "ghp_x"
    assert den.forges()[0]["username"] == "al"
    den.unlink_forge(1)
    assert seen[-1].method == "DELETE"


def test_cli_pr_and_forge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DEN_CONFIG", str(tmp_path / "config.json"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DEN_URL", raising=False)
    monkeypatch.delenv("DEN_TOKEN", raising=False)
    save_config(ClientConfig("http://den.test", "den_t"))
    seen: list[httpx.Request] = []
    parser = argparse.ArgumentParser(prog="den")
    sub = parser.add_subparsers(dest="command", required=True)
    add_client_commands(sub, client_factory=lambda c: Den(c.url, c.token,
                                                          transport=_den_api(seen)))

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        code: int = args.func(args)
        return code

    body = tmp_path / "body.md"
    body.write_text("Long description\n")
    assert run("pr", "api", "--title", "Fix it", "--body-file", str(body), "--branch",
               "fix/it", "-m", "commit msg") == 0
    assert capsys.readouterr().out == f"opened #7 den/api -> main (create): {PR_JSON['url']}\n"
    assert json.loads(seen[-1].content) == {
        "title": "Fix it", "body": "Long description\n", "draft": False, "branch": "fix/it",
        "commit_message": "commit msg"}
    assert run("pr", "api", "--title", "x", "--branch", "main") == 1
    assert "is the base" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("ghp_from_stdin\n"))
    assert run("forge", "link", "github", "https://github.com", "--token-stdin") == 0
    assert json.loads(seen[-1].content)["token"] == "ghp_from_stdin"
    assert "linked github account al" in capsys.readouterr().out
    assert run("forge", "ls") == 0
    assert "Al <al@example.com>" in capsys.readouterr().out
    assert run("forge", "rm", "1") == 0


def test_reconcile_removes_mirrors_of_deleted_workspaces(api: ApiClient,
                                                         make_repo: Callable[..., Path]) -> None:
    ws = api.create(make_repo("api"), name="api")
    root = api.app.state.settings.data_dir / "mirrors"
    for name in (ws["id"], "wsgone00000000"):
        (root / f"{name}.git").mkdir(parents=True)
    api.app.state.forges.reconcile({ws["id"]})
    assert sorted(p.name for p in root.iterdir()) == [f"{ws['id']}.git"]
    assert api.delete(f"/api/v1/workspaces/{ws['id']}").status_code == 204
    assert list(root.iterdir()) == []
