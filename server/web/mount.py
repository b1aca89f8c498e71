"""Wiring the browser interface into the app.

``mount(app, settings)`` adds the session middleware, the page routes and the static files:
``web/static`` at ``/static`` and the xterm.js packages that ``scripts/setup-web.sh``
installs from npm into ``web/node_modules`` at ``/static/vendor``.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.sessions import SessionMiddleware
from starlette.staticfiles import StaticFiles

from server.config import Settings
from server.web import live, login, oidc, pages
from server.web.render import make_templates, web_dir
from server.web.sessions import COOKIE, session_secret

XTERM_PACKAGES = ("@xterm/xterm", "@xterm/addon-fit")


def mount(app: FastAPI, settings: Settings) -> None:
    root = web_dir(settings.web_dir)
    app.state.templates = make_templates(root)
    app.state.oauth = oidc.make_oauth(settings)
    app.state.xterm_installed = all(
        (root / "node_modules" / p / "package.json").exists() for p in XTERM_PACKAGES)
    app.add_middleware(
        SessionMiddleware, secret_key=session_secret(settings), session_cookie=COOKIE,
        max_age=settings.session_max_age_s, same_site="lax",
        https_only=settings.public_url.startswith("https://"),
    )
    app.include_router(login.router)
    app.include_router(pages.router)
    app.include_router(live.router)
    app.mount("/static/vendor/@xterm", StaticFiles(
        directory=root / "node_modules" / "@xterm", check_dir=False), name="vendor")
    app.mount("/static", StaticFiles(directory=root / "static", check_dir=False),
              name="static")
