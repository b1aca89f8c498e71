"""OIDC login end to end: a real OpenID provider (oidc-provider from npm, on loopback), a
real ``den serve`` and a real Chromium. The full authorization code flow with PKCE: Den's
redirect, the provider's login and consent pages, the callback, the session; first login
makes the user, the admin group maps to admin, and token and OIDC sessions are the same user.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.server_process import DenServer
from tests.web.conftest import OidcProvider

pytestmark = pytest.mark.browser

ACCOUNTS = {"carol": {"email": "carol@corp.example", "groups": ["den-admins"]},
            "dave": {"email": "dave@elsewhere.example", "groups": ["devs"]}}


def oidc_login(page: Any, base: str, login: str, *, provider_session: bool = False) -> None:
    """Sign in through the provider; with ``provider_session`` the provider remembers the
    browser (single sign-on) and sends it straight back to Den."""
    page.goto(f"{base}/workspaces")
    assert "/login" in page.url
    page.get_by_role("link", name="Sign in with Test IdP").click()
    if not provider_session:
        page.locator('input[name="login"]').fill(login)  # the provider's own login page
        page.locator('input[name="password"]').fill("any password")
        page.locator('button[type="submit"]').click()
        page.get_by_role("button", name="Continue").click()  # its consent page
    page.wait_for_url(f"{base}/workspaces")


def _den_with_idp(den: Callable[..., DenServer],
                  oidc_provider: Callable[..., OidcProvider], **env: str
                  ) -> tuple[DenServer, str]:
    """A real den serve signing in through a real OIDC provider (ACCOUNTS), with ``env`` on
    top; started. Its base URL too."""
    srv = den(started_now=False)
    idp = oidc_provider(srv.port, ACCOUNTS)
    srv.env.update({
        "DEN_OIDC_ISSUER": idp.issuer, "DEN_OIDC_CLIENT_ID": idp.client_id,
        "DEN_OIDC_CLIENT_SECRET": idp.client_secret, "DEN_OIDC_DISPLAY_NAME": "Test IdP",
        **env,
    })
    srv.start()
    return srv, f"http://127.0.0.1:{srv.port}"


def test_oidc_code_flow_through_den_in_chromium(
    browser: Any, den: Callable[..., DenServer], oidc_provider: Callable[..., OidcProvider],
) -> None:
    srv, base = _den_with_idp(den, oidc_provider,
                              DEN_OIDC_ADMIN_GROUPS=json.dumps(["den-admins"]))

    ctx = browser.new_context()
    page = ctx.new_page()
    try:
        oidc_login(page, base, "carol")
        header = page.locator("header.top").inner_text()
        assert page.locator(".user-name").inner_text() == "carol"
        assert "admin" in header.lower()  # group den-admins
        cookie = next(c for c in ctx.cookies() if c["name"] == "den_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"

        # A token made in the dashboard belongs to the same user as the OIDC session.
        page.get_by_role("link", name="API tokens").click()
        page.get_by_label("Token name").fill("from-oidc")
        page.get_by_role("button", name="Create token").click()
        token = page.locator("[data-new-token]").input_value()
        me = httpx.get(f"{base}/api/v1/users/me", headers={"Authorization": f"Bearer {token}"})
        assert {k: me.json()[k] for k in ("name", "is_admin")} == {"name": "carol",
                                                                  "is_admin": True}

        # Logout ends the session; a second OIDC login finds the same user, not a new one.
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url(f"{base}/login")
        assert page.goto(f"{base}/workspaces") is not None and "/login" in page.url
        oidc_login(page, base, "carol", provider_session=True)
        assert page.locator(".user-name").inner_text() == "carol"  # not a new "carol-2"
    finally:
        ctx.close()

    # Someone else at the same provider: a new ordinary user, who also signs in by token.
    ctx = browser.new_context()
    page = ctx.new_page()
    try:
        oidc_login(page, base, "dave")
        header = page.locator("header.top").inner_text()
        assert "dave" in header and "admin" not in header.lower()
        response = page.goto(f"{base}/tokens")
        assert response is not None and response.status == 200
    finally:
        ctx.close()
    dave = srv._cli("admin", "token", "--user", "dave")
    me = httpx.get(f"{base}/api/v1/users/me", headers={"Authorization": f"Bearer {dave}"})
    assert me.json()["name"] == "dave" and me.json()["is_admin"] is False

    # The callback refuses a forged or replayed state.
    r = httpx.get(f"{base}/auth/callback", params={"code": "x", "state": "forged"})
    assert r.status_code == 400 and "login failed" in r.text.lower()


def test_an_allowlist_gives_accounts_only_to_whom_it_names(
    browser: Any, den: Callable[..., DenServer], oidc_provider: Callable[..., OidcProvider],
) -> None:
    """Issue 11, finding 2: every identity the issuer vouched for got an account."""
    srv, base = _den_with_idp(den, oidc_provider,
                              DEN_OIDC_ALLOWED_EMAIL_DOMAINS=json.dumps(["corp.example"]))
    ctx = browser.new_context()
    page = ctx.new_page()
    try:  # dave's verified email is at elsewhere.example: no account
        page.goto(f"{base}/workspaces")
        page.get_by_role("link", name="Sign in with Test IdP").click()
        page.locator('input[name="login"]').fill("dave")
        page.locator('input[name="password"]').fill("any password")
        page.locator('button[type="submit"]').click()
        with page.expect_response(lambda r: "/auth/callback" in r.url) as answer:
            page.get_by_role("button", name="Continue").click()
        assert answer.value.status == 403
        assert "does not give accounts to this login" in page.content()
        assert page.goto(f"{base}/workspaces") is not None and "/login" in page.url
    finally:
        ctx.close()
    ctx = browser.new_context()
    page = ctx.new_page()
    try:  # carol's is at corp.example
        oidc_login(page, base, "carol")
        assert page.locator(".user-name").inner_text() == "carol"
    finally:
        ctx.close()
    names = srv.http.get("/api/v1/workspaces").status_code  # the server is fine
    assert names == 200
    with sqlite3.connect(srv.env["DEN_DATA_DIR"] + "/den.db") as db:
        users = {row[0] for row in db.execute("SELECT name FROM users")}
    assert "carol" in users and "dave" not in users
