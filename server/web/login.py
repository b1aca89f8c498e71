"""Signing in and out: with an API token (always possible unless turned off) or through the
configured OIDC / OAuth provider. Both end in the same kind of session for the same users."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from server.auth.identities import RegistrationClosed, admin_by_policy, user_for_login
from server.auth.tokens import authenticate_token
from server.errors import Forbidden, NotFound
from server.web import oidc, sessions
from server.web.deps import CSRF, safe_next
from server.web.render import flash, page

router = APIRouter(include_in_schema=False)
log = logging.getLogger(__name__)


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


@router.get("/")
def home(request: Request) -> Response:
    signed_in = sessions.user_of(request, request.app.state.sessions) is not None
    return _redirect("/workspaces" if signed_in else "/login")


@router.get("/login")
def login_page(request: Request, next: str = "/workspaces") -> Response:
    if sessions.user_of(request, request.app.state.sessions) is not None:
        return _redirect(safe_next(next))
    # A cookie naming a session that is no more (expired, revoked, signed out elsewhere, or
    # replayed after a sign-out): say so, once.
    ended = request.session.pop("sid", None) is not None
    return page(request, "login.html", next=safe_next(next), ended=ended,
                token_login=request.app.state.settings.web_token_login)


@router.post("/login/token", dependencies=[CSRF])
def login_with_token(request: Request, token: Annotated[str, Form()] = "",
                     next: Annotated[str, Form()] = "/workspaces") -> Response:
    settings = request.app.state.settings
    if not settings.web_token_login:
        raise Forbidden("signing in with a token is turned off here")
    found = authenticate_token(request.app.state.sessions, token.strip())
    if found is None:
        return page(request, "login.html", status_code=401, next=safe_next(next),
                    token_login=True,
                    error="That token is not valid (or was revoked, or has expired).")
    sessions.start(request, request.app.state.sessions, found.user, method="token",
                   max_age_s=settings.session_max_age_s, token_id=found.token_id,
                   token_expires_at=found.expires_at)
    return _redirect(safe_next(next))


def _callback_url(request: Request) -> str:
    public = request.app.state.settings.public_url.rstrip("/")
    return f"{public}/auth/callback" if public else str(request.url_for("oidc_callback"))


@router.get("/login/oidc")
async def login_with_oidc(request: Request, next: str = "/workspaces") -> Response:
    oauth = request.app.state.oauth
    if oauth is None:
        raise NotFound("single sign-on is not configured on this server")
    request.session["next"] = safe_next(next)
    return await oidc.authorize_redirect(oauth, request, _callback_url(request))  # type: ignore[no-any-return]


@router.get("/auth/callback", name="oidc_callback")
async def oidc_callback(request: Request) -> Response:
    settings = request.app.state.settings
    oauth = request.app.state.oauth
    if oauth is None:
        raise NotFound("single sign-on is not configured on this server")
    try:
        profile = await oidc.finish(oauth, request, settings)
    except oidc.LoginFailed as exc:
        return page(request, "login.html", status_code=400, next="/workspaces",
                    token_login=settings.web_token_login, error=exc.message)
    admin = admin_by_policy(profile, domains=settings.oidc_admin_email_domains,
                            groups=settings.oidc_admin_groups)
    db = request.app.state.sessions
    signed_in = sessions.user_of(request, db)
    try:
        with db.begin() as s:
            user = user_for_login(s, profile, admin=admin, link_to=signed_in,
                                  admitted=oidc.admission(settings).admits(profile))
    except RegistrationClosed as exc:
        log.info("oidc: no account for %s %s (email %r, verified %s): not on the allowlist",
                 profile.issuer, profile.subject, profile.email, profile.email_verified)
        return page(request, "login.html", status_code=403, next="/workspaces",
                    token_login=settings.web_token_login, error=exc.message)
    target = safe_next(request.session.pop("next", None))
    sessions.start(request, db, user, method="oidc", max_age_s=settings.session_max_age_s)
    if signed_in is not None and signed_in.id == user.id:
        flash(request, f"Linked your {oidc.display_name(settings)} login to {user.name}.")
    return _redirect(target)


@router.post("/logout", dependencies=[CSRF])
def logout(request: Request) -> Response:
    sessions.end(request, request.app.state.sessions)
    flash(request, "You are signed out.")
    return _redirect("/login")
