"""Templates, flash messages and the HTML error page of the web UI."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from server import __version__
from server.web import csrf, oidc

SOURCE_WEB_DIR = Path(__file__).resolve().parents[2] / "web"


# Pages load scripts and styles from Den only; xterm.js sets inline styles, hence
# 'unsafe-inline' for styles (not scripts). No framing (clickjacking).
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
        "form-action 'self'; base-uri 'none'; object-src 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def web_dir(configured: str) -> Path:
    return Path(configured) if configured else SOURCE_WEB_DIR


def ago(when: datetime | None) -> str:
    """'3 min ago' style, for last activity."""
    if when is None:
        return "never"
    s = int((datetime.now(UTC) - when).total_seconds())
    if s < 60:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s // size} {unit} ago"
    return "just now"


def sentence(text: str) -> str:
    """A message as a sentence for a page: its first letter in upper case (the API's
    messages start in lower case, to be quoted after a prefix)."""
    return text[:1].upper() + text[1:]


def make_templates(directory: Path) -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(directory / "templates"))
    templates.env.filters["ago"] = ago
    templates.env.filters["sentence"] = sentence
    templates.env.globals["version"] = __version__
    return templates


def flash(request: Request, message: str, kind: str = "info", *,
          while_creating: str = "") -> None:
    """A message shown once, on the next page; ``while_creating``: a workspace id whose
    leaving ``creating`` makes the page take the message away (it is no longer true)."""
    request.session.setdefault("flash", []).append([kind, message, while_creating])


def page(request: Request, template: str, *, status_code: int = 200,
         **context: Any) -> HTMLResponse:
    settings = request.app.state.settings
    from server.web.sessions import user_of

    user = context.pop("user", None) or user_of(request, request.app.state.sessions)
    flashes = request.session.pop("flash", []) if "session" in request.scope else []
    response = request.app.state.templates.TemplateResponse(
        request, template, {
            "user": user,
            "csrf_token": csrf.token(request),
            "flashes": flashes,
            "oidc_enabled": oidc.enabled(settings),
            "oidc_name": oidc.display_name(settings) if oidc.enabled(settings) else "",
            **context,
        }, status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    return response  # type: ignore[no-any-return]


def is_page(request: Request) -> bool:
    """A browser page (not the JSON API): errors render as HTML here."""
    path = request.url.path
    return not (path.startswith("/api/") or path in ("/openapi.json", "/healthz", "/metrics")
                or path.endswith(".json"))


def error_page(request: Request, status: int, code: str, message: str) -> Response:
    """An HTML error; 401 goes to the login page instead (and back here after)."""
    if status == 401 and request.method == "GET":
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
    if status == 401:
        return RedirectResponse("/login", status_code=303)
    titles = {403: "Not allowed", 404: "Not found", 409: "Not now", 422: "Invalid input"}
    return page(request, "error.html", status_code=status, code=code,
                title=titles.get(status, "Something went wrong"), message=message)
