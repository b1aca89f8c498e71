"""Issue 11, finding 8: revoking a token ends the web sessions it opened; tokens can expire;
single sign-on identities and web sessions can be listed and removed by their user."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from server.app import create_app
from server.auth.identities import Profile, user_for_login
from server.config import Settings
from server.db.models import ApiToken, User
from server.runtime.fake import FakeRuntime
from tests.conftest import ApiClient, users

ME = "/api/v1/users/me"


@pytest.fixture
def api(make_settings: Callable[..., Settings]) -> Iterator[ApiClient]:
    app = create_app(make_settings(), runtime=FakeRuntime())
    with TestClient(app) as client:
        yield ApiClient(client, users(app))


def _browser_signed_in_with(api: ApiClient, token: str) -> TestClient:
    browser = TestClient(api.app)
    page = browser.get("/login").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf is not None
    r = browser.post("/login/token", data={"csrf_token": csrf.group(1), "token": token},
                     follow_redirects=False)
    assert r.status_code == 303, r.text
    assert browser.get("/workspaces", follow_redirects=False).status_code == 200
    return browser


def test_revoking_a_token_ends_the_web_sessions_it_opened(api: ApiClient) -> None:
    made = api.post(f"{ME}/tokens", json={"name": "laptop"}).json()
    browser = _browser_signed_in_with(api, made["token"])
    other = _browser_signed_in_with(api, api.tokens["alice"])  # another token's session
    listed = api.get(f"{ME}/sessions").json()["sessions"]
    assert len(listed) == 2 and made["id"] in [s["token_id"] for s in listed]
    assert api.delete(f"{ME}/tokens/{made['id']}").status_code == 204
    assert browser.get("/workspaces", follow_redirects=False).status_code == 303  # to login
    assert other.get("/workspaces", follow_redirects=False).status_code == 200
    assert len(api.get(f"{ME}/sessions").json()["sessions"]) == 1


def test_a_user_lists_and_ends_their_web_sessions(api: ApiClient) -> None:
    browser = _browser_signed_in_with(api, api.tokens["alice"])
    [session] = api.get(f"{ME}/sessions").json()["sessions"]
    assert session["method"] == "token"
    assert api.get(f"{ME}/sessions", user="bob").json()["sessions"] == []
    assert api.delete(f"{ME}/sessions/{session['id']}", user="bob").status_code == 404
    assert api.delete(f"{ME}/sessions/{session['id']}").status_code == 204
    assert browser.get("/workspaces", follow_redirects=False).status_code == 303


def test_tokens_can_expire(api: ApiClient) -> None:
    made = api.post(f"{ME}/tokens", json={"name": "ci", "expires_in_s": 3600}).json()
    expires = datetime.fromisoformat(made["expires_at"].replace("Z", "+00:00"))
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)
    auth = {"Authorization": f"Bearer {made['token']}"}
    assert api.client.get(ME, headers=auth).status_code == 200
    _browser_signed_in_with(api, made["token"])
    with api.app.state.sessions.begin() as s:  # an hour later
        s.execute(update(ApiToken).where(ApiToken.id == made["id"])
                  .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    r = api.client.get(ME, headers=auth)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    [listed] = [t for t in api.get(f"{ME}/tokens").json()["tokens"] if t["id"] == made["id"]]
    assert listed["expires_at"] is not None
    # the session it opened ends no later than the token does
    [session] = [s for s in api.get(f"{ME}/sessions").json()["sessions"]
                 if s["token_id"] == made["id"]]
    assert datetime.fromisoformat(session["expires_at"].replace("Z", "+00:00")) <= expires
    assert api.post(f"{ME}/tokens", json={"expires_in_s": 5}).status_code == 422


def test_a_user_lists_and_unlinks_their_identities(api: ApiClient) -> None:
    with api.app.state.sessions.begin() as s:
        alice = s.query(User).filter_by(name="alice").one()
        user_for_login(s, Profile("https://idp", "sub-1", "al", "al@x.example", True),
                       admin=False, admitted=True, link_to=alice)
    [ident] = api.get(f"{ME}/identities").json()["identities"]
    assert (ident["issuer"], ident["subject"], ident["email"]) == (
        "https://idp", "sub-1", "al@x.example")
    assert api.get(f"{ME}/identities", user="bob").json()["identities"] == []
    assert api.delete(f"{ME}/identities/{ident['id']}", user="bob").status_code == 404
    assert api.delete(f"{ME}/identities/{ident['id']}").status_code == 204
    assert api.get(f"{ME}/identities").json()["identities"] == []


def test_den_admin_token_can_expire(tmp_path: Path) -> None:
    env = {**os.environ, "DEN_DATA_DIR": str(tmp_path / "data")}
    run = [sys.executable, "-m", "server.cli", "admin", "token", "--user", "ci"]
    token = subprocess.run([*run, "--expires-in-s", "3600"], env=env, capture_output=True,
                           text=True, check=True).stdout.strip()
    bad = subprocess.run([*run, "--expires-in-s", "5"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "expires_in_s" in bad.stderr
    with sqlite3.connect(tmp_path / "data" / "den.db") as db:
        [(expires,)] = db.execute("SELECT expires_at FROM api_tokens")
    assert token.startswith("den_") and expires is not None
