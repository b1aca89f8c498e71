"""The web UI on the fake runtime: login with a token, sessions and logout, CSRF on every
form, the Origin check of the terminal's WebSocket, other users' workspaces (404), admins,
tokens shown once, and the pure parts of OIDC login (presets, profiles, user mapping)."""

from __future__ import annotations

import re
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.testclient import WebSocketDenialResponse

from server.app import create_app
from server.auth.identities import (
    Profile,
    RegistrationClosed,
    admin_by_policy,
    name_candidate,
    user_for_login,
)
from server.auth.tokens import ensure_user
from server.config import Settings
from server.db.models import Identity, User, WebSession
from server.runtime.fake import FakeRuntime
from server.web import csrf, oidc, pages
from server.web import login as login_routes
from server.web.deps import safe_next
from server.web.sessions import session_secret
from tests.conftest import ApiClient, users


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m is not None, "the page has no CSRF token"
    return m.group(1)


def login(client: TestClient, token: str) -> str:
    """Sign in with a token; returns the CSRF token of the new session."""
    page = client.get("/login")
    r = client.post("/login/token", data={"csrf_token": csrf_of(page.text), "token": token},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    return csrf_of(client.get("/workspaces").text)


@pytest.fixture
def web(fake_api: ApiClient) -> ApiClient:
    return fake_api


def browser_for(api: ApiClient) -> TestClient:
    """A second client on the same app with its own cookie jar."""
    return TestClient(api.app)


def test_pages_need_a_session_and_send_you_to_login(web: ApiClient) -> None:
    c = web.client
    for path in ("/workspaces", "/tokens", "/workspaces/x", "/workspaces/x/terminal"):
        r = c.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == f"/login?next={path}"
    assert c.get("/", follow_redirects=False).headers["location"] == "/login"
    r = c.get("/workspaces/state.json")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert c.get("/login").status_code == 200
    assert "Sign in with token" in c.get("/login").text


def test_token_login_sets_a_safe_cookie_and_logout_ends_the_session(web: ApiClient) -> None:
    c = web.client
    page = c.get("/login")
    r = c.post("/login/token", data={"csrf_token": csrf_of(page.text),
                                     "token": web.tokens["alice"], "next": "/tokens"},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/tokens"
    cookie = r.headers["set-cookie"].lower()
    assert "den_session=" in cookie and "httponly" in cookie and "samesite=lax" in cookie
    home = c.get("/workspaces")
    assert home.status_code == 200 and "alice" in home.text
    assert home.headers["x-frame-options"] == "DENY"
    assert "script-src 'self'" in home.headers["content-security-policy"]
    stolen = dict(c.cookies)
    r = c.post("/logout", data={"csrf_token": csrf_of(home.text)}, follow_redirects=False)
    assert r.headers["location"] == "/login"
    assert c.get("/workspaces", follow_redirects=False).status_code == 303
    # The old cookie is dead too: logout deleted the session row.
    other = browser_for(web)
    other.cookies.update(stolen)
    assert other.get("/workspaces", follow_redirects=False).status_code == 303
    with web.app.state.sessions() as s:
        assert s.scalars(select(WebSession)).all() == []
    # The replayed cookie lands on the login page with a notice that the session ended,
    # once; a visitor who never signed in (or signed out here) gets none.
    r = other.get("/workspaces")
    assert r.url.path == "/login" and "data-session-ended" in r.text
    assert "data-session-ended" not in other.get("/login").text
    assert "data-session-ended" not in c.get("/workspaces").text


def test_a_wrong_token_does_not_sign_in(web: ApiClient) -> None:
    c = web.client
    page = c.get("/login")
    r = c.post("/login/token", data={"csrf_token": csrf_of(page.text), "token": "den_nope"})
    assert r.status_code == 401 and "not valid" in r.text
    assert c.get("/workspaces", follow_redirects=False).status_code == 303


def test_forms_without_the_csrf_token_are_refused(web: ApiClient,
                                                  make_repo: Callable[..., Path]) -> None:
    c = web.client
    token = login(c, web.tokens["alice"])
    ws = web.create(make_repo(), wait=False)
    posts = [("/workspaces", {"repo_url": "https://example.invalid/a.git"}),
             (f"/workspaces/{ws['id']}/stop", {}), (f"/workspaces/{ws['id']}/delete", {}),
             ("/tokens", {"name": "x"}), ("/logout", {})]
    for path, data in posts:
        for bad in ({}, {"csrf_token": "forged"}):
            r = c.post(path, data={**data, **bad}, follow_redirects=False)
            assert r.status_code == 403, (path, bad, r.status_code)
            assert "CSRF" in r.text
    # The right token from another site (Origin) is refused as well.
    r = c.post("/tokens", data={"csrf_token": token, "name": "x"},
               headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    # A fresh login form needs its token too.
    r = browser_for(web).post("/login/token", data={"token": web.tokens["alice"]})
    assert r.status_code == 403
    assert web.get(f"/api/v1/workspaces/{ws['id']}").json()["state"] != "deleting"


def test_every_form_post_is_csrf_protected() -> None:
    posts = [r for router in (login_routes.router, pages.router) for r in router.routes
             if isinstance(r, APIRoute) and "POST" in (r.methods or set())]
    assert len(posts) >= 8
    for route in posts:
        calls = [d.call for d in route.dependant.dependencies]
        assert csrf.protect in calls, route.path


def test_dashboard_creates_and_acts_on_workspaces(web: ApiClient,
                                                  make_repo: Callable[..., Path]) -> None:
    c = web.client
    token = login(c, web.tokens["alice"])
    repo = make_repo("api")
    r = c.post("/workspaces", data={"csrf_token": token, "repo_url": str(repo),
                                    "branch": "main", "name": "api", "cpus": "1",
                                    "memory_mb": "512"}, follow_redirects=False)
    assert r.status_code == 303
    ws = web.wait_state("api")
    assert ws["state"] == "running" and ws["resources"]["memory_mb"] == 512
    page = c.get("/workspaces").text
    assert "api" in page and str(repo) in page and "512 MiB" in page
    state = c.get("/workspaces/state.json").json()["workspaces"]
    assert [(w["name"], w["state"]) for w in state] == [("api", "running")]
    for action, settled in (("pause", "paused"), ("resume", "running"), ("stop", "stopped"),
                            ("start", "running")):
        r = c.post(f"/workspaces/{ws['id']}/{action}", data={"csrf_token": token})
        assert r.status_code == 200 and f"api is {settled}" in r.text
    r = c.post(f"/workspaces/{ws['id']}/network", data={
        "csrf_token": token, "mode": "allowlist", "allow": "203.0.113.0/24, 198.51.100.7:443"})
    assert "Network of api: allowlist." in r.text and "198.51.100.7:443" in r.text
    assert web.get(f"/api/v1/workspaces/{ws['id']}").json()["network"] == {
        "mode": "allowlist", "allow": ["203.0.113.0/24", "198.51.100.7:443"]}
    r = c.post(f"/workspaces/{ws['id']}/network", data={
        "csrf_token": token, "mode": "allowlist", "allow": "pypi"})
    assert ("Network not changed: network allow entry &#39;pypi&#39; is neither an address"
            in r.text)
    r = c.post(f"/workspaces/{ws['id']}/snapshots", data={"csrf_token": token, "name": "s1"})
    assert "Snapshot s1 taken" in r.text
    detail = c.get(f"/workspaces/{ws['id']}")
    assert "s1" in detail.text and "Event log" in detail.text
    sid = web.get(f"/api/v1/workspaces/{ws['id']}/snapshots").json()["snapshots"][0]["id"]
    r = c.post(f"/snapshots/{sid}/fork", data={"csrf_token": token, "name": "api-try"},
               follow_redirects=False)
    assert r.status_code == 303
    assert web.wait_state("api-try")["state"] == "running"
    events = c.get(f"/workspaces/{ws['id']}/state.json").json()["events"]
    assert {"paused", "stopped", "running"} <= {e["to_state"] for e in events}
    assert all(e["actor"] in ("alice", "system") for e in events)
    confirm = c.get(f"/workspaces/{ws['id']}/confirm/delete")
    assert "Delete api?" in confirm.text and 'action="/workspaces/' in confirm.text
    r = c.post(f"/workspaces/{ws['id']}/delete", data={"csrf_token": token, "snapshots": "1"})
    assert r.status_code == 200 and "Deleted api." in r.text
    assert web.get(f"/api/v1/workspaces/{ws['id']}").status_code == 404


def test_a_bad_create_shows_the_error_and_keeps_the_form(web: ApiClient) -> None:
    c = web.client
    token = login(c, web.tokens["alice"])
    r = c.post("/workspaces", data={"csrf_token": token, "repo_url": "ext::sh -c x",
                                    "name": "keepme"}, follow_redirects=False)
    # Redirect-after-post: the error and the form come on the page after, once; reloading
    # it sends nothing again.
    assert r.status_code == 303 and r.headers["location"] == "/workspaces#new"
    r = c.get("/workspaces")
    assert 'value="keepme"' in r.text and 'class="flash error"' in r.text
    error = r.text.split('class="flash error" role="alert">')[1].split("<")[0]
    assert error[:1].isupper(), error  # a sentence, not the API's lower-case message
    r = c.get("/workspaces")
    assert 'value="keepme"' not in r.text and 'class="flash error"' not in r.text
    r = c.post("/workspaces", data={"csrf_token": token, "repo_url": "/x", "cpus": "lots"})
    assert r.status_code == 200 and "CPUs must be a number" in r.text
    assert r.url.path == "/workspaces"


def test_other_users_workspaces_are_404_and_admins_see_all(
        web: ApiClient, make_repo: Callable[..., Path]) -> None:
    ws = web.create(make_repo(), wait=False)
    bob = browser_for(web)
    token = login(bob, web.tokens["bob"])
    assert 'data-ws-name="api"' not in bob.get("/workspaces").text
    for path in (f"/workspaces/{ws['id']}", f"/workspaces/{ws['id']}/terminal",
                 f"/workspaces/{ws['id']}/confirm/delete"):
        r = bob.get(path)
        assert r.status_code == 404 and "Not found" in r.text, path
    assert bob.get(f"/workspaces/{ws['id']}/state.json").status_code == 404
    r = bob.post(f"/workspaces/{ws['id']}/delete", data={"csrf_token": token})
    assert r.status_code == 404
    root = browser_for(web)
    login(root, web.tokens["root"])
    page = root.get("/workspaces").text
    assert "Owner" in page and "alice" in page and 'class="badge">admin' in page
    assert root.get(f"/workspaces/{ws['id']}").status_code == 200


def test_tokens_page_shows_a_new_token_once_and_it_works(web: ApiClient) -> None:
    c = web.client
    token = login(c, web.tokens["alice"])
    r = c.post("/tokens", data={"csrf_token": token, "name": "laptop"})
    secret = re.search(r'value="(den_[^"]+)" data-new-token', r.text)
    assert secret is not None and r.headers["cache-control"] == "no-store"
    me = c.get("/api/v1/users/me", headers={"Authorization": f"Bearer {secret.group(1)}"})
    assert me.json()["name"] == "alice"
    listed = c.get("/tokens").text
    assert "laptop" in listed and secret.group(1) not in listed
    tid = web.get("/api/v1/users/me/tokens").json()["tokens"][-1]["id"]
    c.post(f"/tokens/{tid}/revoke", data={"csrf_token": token})
    assert c.get("/api/v1/users/me", headers={
        "Authorization": f"Bearer {secret.group(1)}"}).status_code == 401


def test_ssh_keys_page_adds_lists_and_removes_keys(web: ApiClient, tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@laptop",
                    "-f", str(tmp_path / "k")], check=True)
    public = (tmp_path / "k.pub").read_text().strip()
    c = web.client
    token = login(c, web.tokens["alice"])
    r = c.post("/ssh-keys", data={"csrf_token": token, "public_key": "ssh-dss AAAA x"})
    assert "flash error" in r.text and "ssh-dss AAAA x" in r.text  # the form is kept
    r = c.post("/ssh-keys", data={"csrf_token": token, "public_key": public,
                                  "challenge": _challenge(c), "signature": "not a signature"})
    assert "flash error" in r.text and "prove" in r.text
    r = c.post("/ssh-keys", data={"csrf_token": token, "public_key": public,
                                  **_proof(c, tmp_path / "k")})
    assert r.status_code == 200 and "me@laptop" in r.text and "SHA256:" in r.text
    assert "verified" in r.text
    keys = web.get("/api/v1/users/me/ssh-keys").json()["ssh_keys"]
    assert [k["name"] for k in keys] == ["me@laptop"]  # the same keys as the API's
    assert "me@laptop" not in browser_for(web).get("/ssh-keys").text  # no session: login
    r = c.post(f"/ssh-keys/{keys[0]['id']}/delete", data={"csrf_token": "wrong"})
    assert r.status_code == 403
    c.post(f"/ssh-keys/{keys[0]['id']}/delete", data={"csrf_token": token})
    assert web.get("/api/v1/users/me/ssh-keys").json()["ssh_keys"] == []
    bob = browser_for(web)
    bob_csrf = login(bob, web.tokens["bob"])
    c.post("/ssh-keys", data={"csrf_token": token, "public_key": public,
                              **_proof(c, tmp_path / "k")})
    kid = web.get("/api/v1/users/me/ssh-keys").json()["ssh_keys"][0]["id"]
    r = bob.post(f"/ssh-keys/{kid}/delete", data={"csrf_token": bob_csrf})
    assert r.status_code == 404  # another user's key is not there for bob


def _challenge(c: TestClient) -> str:
    found = re.search(r'name="challenge" value="([^"]+)"', c.get("/ssh-keys").text)
    assert found is not None
    return found.group(1)


def _proof(c: TestClient, private_key: Path) -> dict[str, str]:
    """The page's challenge, signed as the page says: with ssh-keygen -Y sign."""
    challenge = _challenge(c)
    signed = subprocess.run(["ssh-keygen", "-Y", "sign", "-n", "den-ssh-key", "-f",
                             str(private_key)], input=challenge.encode(), capture_output=True,
                            check=True)
    return {"challenge": challenge, "signature": signed.stdout.decode()}


def _terminal(client: TestClient, ws_id: str, **headers: str) -> dict[str, Any]:
    with client.websocket_connect(f"/api/v1/workspaces/{ws_id}/terminal",
                                  headers=headers) as sock:
        while True:
            msg: dict[str, Any] = sock.receive_json()
            if msg["type"] in ("error", "exit"):
                return msg


def test_terminal_websocket_authentication(web: ApiClient, make_repo: Callable[..., Path]) -> None:
    ws = web.create(make_repo(), wait=False)
    web.wait_state(ws["id"])
    c = browser_for(web)
    assert _terminal(c, ws["id"])["error"]["code"] == "unauthorized"
    login(c, web.tokens["alice"])
    origin = "http://testserver"
    assert _terminal(c, ws["id"], origin=origin)["type"] == "exit"  # cookie + own origin
    assert _terminal(c, ws["id"], origin="https://evil.example")["error"]["code"] == \
        "bad_origin"
    assert _terminal(c, ws["id"])["error"]["code"] == "bad_origin"  # no Origin with a cookie
    bob = browser_for(web)
    login(bob, web.tokens["bob"])
    assert _terminal(bob, ws["id"], origin=origin)["error"]["code"] == "not_found"
    bearer = {"authorization": f"Bearer {web.tokens['alice']}"}
    assert _terminal(browser_for(web), ws["id"], **bearer)["type"] == "exit"
    bad = {"authorization": f"Bearer {web.tokens['bob']}"}
    assert _terminal(browser_for(web), ws["id"], **bad)["error"]["code"] == "not_found"
    try:
        with c.websocket_connect(f"/api/v1/workspaces/{ws['id']}/terminal?session=../x",
                                 headers={"origin": origin}) as sock:
            assert sock.receive_json()["error"]["code"] == "invalid"
    except WebSocketDenialResponse:  # pragma: no cover
        pytest.fail("the socket should be accepted, then closed with the error")


def test_public_url_sets_the_expected_origin(make_settings: Callable[..., Settings],
                                            make_repo: Callable[..., Path]) -> None:
    app = create_app(make_settings(public_url="https://den.example.com"), runtime=FakeRuntime())
    with TestClient(app, base_url="https://den.example.com") as c:
        tokens = users(app)
        login(c, tokens["alice"])
        ws = ApiClient(c, tokens).create(make_repo(), wait=True)
        # The cookie is Secure (an https public URL): sent on wss only, so send it by hand.
        cookie = f"den_session={c.cookies['den_session']}"
        assert _terminal(c, ws["id"], origin="https://den.example.com",
                         cookie=cookie)["type"] == "exit"
        assert _terminal(c, ws["id"], origin="http://den.example.com",
                         cookie=cookie)["error"]["code"] == "bad_origin"


def test_session_secret_is_generated_once_with_mode_0600(
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    key = session_secret(settings)
    path = settings.data_dir / "session_secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(key) > 40
    assert session_secret(settings) == key
    assert session_secret(make_settings(session_secret="given")) == "given"


@pytest.mark.parametrize(("target", "expected"), [
    ("/tokens", "/tokens"), ("//evil.example/x", "/workspaces"),
    ("https://evil.example", "/workspaces"), ("/\\evil", "/workspaces"), (None, "/workspaces"),
])
def test_next_stays_on_this_site(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


# --- OIDC: pure parts ---------------------------------------------------------------------


def test_presets_build_authlib_client_kwargs(make_settings: Callable[..., Settings]) -> None:
    s = make_settings(oidc_issuer="https://id.example.com/", oidc_client_id="c",
                      oidc_client_secret="s")
    assert oidc.client_kwargs(s) == {
        "name": "den", "client_id": "c", "client_secret": "s",
        "server_metadata_url": "https://id.example.com/.well-known/openid-configuration",
        "client_kwargs": {"scope": "openid email profile", "code_challenge_method": "S256"},
    }
    g = make_settings(oidc_provider="gitlab", oidc_client_id="c")
    assert oidc.enabled(g) and oidc.display_name(g) == "GitLab"
    assert oidc.client_kwargs(g)["server_metadata_url"] == \
        "https://gitlab.com/.well-known/openid-configuration"
    h = make_settings(oidc_provider="github", oidc_client_id="c", oidc_client_secret="s")
    kw = oidc.client_kwargs(h)
    assert kw["authorize_url"] == "https://github.com/login/oauth/authorize"
    assert kw["client_kwargs"]["scope"] == "read:user user:email read:org"
    assert "server_metadata_url" not in kw
    assert not oidc.enabled(make_settings())
    assert not oidc.enabled(make_settings(oidc_client_id="c"))  # generic needs an issuer
    groups = make_settings(oidc_issuer="https://i", oidc_client_id="c",
                           oidc_admin_groups=["ops"])
    assert oidc.scopes(groups) == "openid email profile groups"
    with pytest.raises(ValueError, match="DEN_OIDC_PROVIDER"):
        oidc.preset(make_settings(oidc_provider="okta"))


def test_profiles_from_claims_and_from_github() -> None:
    p = oidc.profile_from_claims(
        {"iss": "https://i", "sub": "42", "preferred_username": "Carol.K",
         "email": "carol@corp.example", "email_verified": True, "groups": ["ops", "dev"]},
        groups_claim="groups")
    assert p == Profile("https://i", "42", "Carol.K", "carol@corp.example", True,
                        ("ops", "dev"))
    g = oidc.profile_from_github(
        {"id": 7, "login": "octo"},
        [{"email": "o@x.example", "primary": False, "verified": True},
         {"email": "octo@gh.example", "primary": True, "verified": True}],
        [{"login": "acme"}])
    assert g == Profile("https://github.com", "7", "octo", "octo@gh.example", True, ("acme",))


def test_admin_policy_and_user_names() -> None:
    p = Profile("i", "s", "Dave Smith", "dave@Corp.Example", True, ("Ops",))
    assert admin_by_policy(p, domains=["corp.example"], groups=[])
    assert admin_by_policy(p, domains=[], groups=["ops"])
    assert not admin_by_policy(p, domains=["other.example"], groups=["dev"])
    unverified = Profile("i", "s", email="eve@corp.example", email_verified=False)
    assert not admin_by_policy(unverified, domains=["corp.example"], groups=[])
    assert name_candidate(p) == "dave-smith"
    assert name_candidate(Profile("i", "s", email="x.y@z")) == "x.y"
    assert name_candidate(Profile("i", "s", username="!!!")) == "user"


def test_who_gets_an_account_at_first_login(make_settings: Callable[..., Settings]) -> None:
    """Issue 11, finding 2: single sign-on with a public issuer was open registration."""
    carol = Profile("i", "1", "carol", "carol@Corp.Example", True, ("Acme",))
    unverified = Profile("i", "2", "eve", "eve@corp.example", False)
    stranger = Profile("i", "3", "mallory", "m@evil.example", True, ("evil",))

    def admission(**kw: Any) -> Any:
        return oidc.admission(make_settings(oidc_client_id="c", **kw))

    # Public issuers are closed by default: nobody gets in until the operator says who.
    for public in ({"oidc_provider": "github"}, {"oidc_provider": "gitlab"},
                   {"oidc_issuer": "https://accounts.google.com"}):
        assert not admission(**public).admits(carol)
        assert admission(**public, oidc_registration="open").admits(stranger)
    # A private issuer stays open by default, until an allowlist is set.
    private = {"oidc_issuer": "https://sso.corp.example"}
    assert admission(**private).admits(stranger)
    assert not admission(**private, oidc_registration="allowlist").admits(carol)
    by_domain = admission(**private, oidc_allowed_email_domains=["corp.example"])
    assert by_domain.admits(carol) and not by_domain.admits(stranger)
    assert not by_domain.admits(unverified)  # unverified emails never count
    by_user = admission(oidc_provider="github", oidc_allowed_users=["CAROL", "m@evil.example"])
    assert by_user.admits(carol) and by_user.admits(stranger)
    assert not by_user.admits(unverified)
    by_group = admission(oidc_provider="github", oidc_allowed_groups=["acme"])
    assert by_group.admits(carol) and not by_group.admits(stranger)
    assert "groups" in oidc.scopes(make_settings(oidc_client_id="c", oidc_issuer="https://x",
                                                 oidc_allowed_groups=["acme"]))


def test_closed_registration_keeps_existing_accounts(fake_api: ApiClient) -> None:
    sessions = fake_api.app.state.sessions
    known = Profile("https://i", "sub-1", "carol", "carol@x.example", True)
    with sessions.begin() as s:
        user_for_login(s, known, admin=False, admitted=True)  # made while it was open
    with sessions.begin() as s:
        assert user_for_login(s, known, admin=False, admitted=False).name == "carol"
        with pytest.raises(RegistrationClosed):
            user_for_login(s, Profile("https://i", "sub-9", "new"), admin=False,
                           admitted=False)
        # the admin policy admits on its own
        assert user_for_login(s, Profile("https://i", "sub-8", "boss"), admin=True,
                              admitted=False).is_admin
    with sessions() as s:
        assert s.scalar(select(User).where(User.name == "new")) is None


def test_logins_map_to_users(fake_api: ApiClient) -> None:
    sessions = fake_api.app.state.sessions
    carol = Profile("https://i", "sub-1", "alice", "alice@else.example", True)
    with sessions.begin() as s:
        first = user_for_login(s, carol, admin=False, admitted=True)
        # "alice" is taken by a token user: the login gets its own user, not hers.
        assert first.name == "alice-2" and not first.is_admin
        again = user_for_login(s, carol, admin=True, admitted=True)
        assert again.id == first.id and again.is_admin  # same identity, admin granted
        kept = user_for_login(s, carol, admin=False, admitted=True)
        assert kept.is_admin  # never revoked at login
        alice = s.scalar(select(User).where(User.name == "alice"))
        other = Profile("https://i", "sub-2", "whoever")
        linked = user_for_login(s, other, admin=False, link_to=alice, admitted=False)
        assert linked.id == alice.id  # signed in as alice: the login is linked to her
        assert len(s.scalars(select(Identity)).all()) == 2
        ensure_user(s, "zed")
