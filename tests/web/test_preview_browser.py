"""A preview origin in a real Chromium, on the real engine: a page served from inside a gVisor
workspace at ``<port>--<workspace>--<owner>.localhost`` (Chromium resolves ``*.localhost`` to
the loopback: a browser origin of its own without DNS), signing in through Den, the page's
WebSocket and server-sent events, and the page's JavaScript seeing neither Den's cookies nor
Den's API; then Den's own page of the workspace: its usage chart with figures, and its ports
table showing a new server without a reload."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.client import Den
from tests.preview_app import APP
from tests.server_process import DenServer
from tests.web.conftest import DOCS
from tests.web.test_browser import LONG_MS

pytestmark = [pytest.mark.engine, pytest.mark.browser]


def test_a_preview_origin_in_chromium(engine: None, browser: Any,
                                      den: Callable[..., DenServer],
                                      make_repo: Callable[..., Path]) -> None:
    srv = den(started_now=False, ssh_port=0, preview_domain="localhost")
    base = f"http://127.0.0.1:{srv.port}"
    srv.env["DEN_PUBLIC_URL"] = base
    srv.start()
    with Den(base, srv.token) as client:
        ws = client.create(str(make_repo("site", files={"app.py": APP})),
                           name="site").wait_for("running")
        ws.processes.start("exec python3 app.py 9000")
        deadline = time.monotonic() + 60
        while not any(p["port"] == 9000 and p["listening"] for p in ws.ports()):
            assert time.monotonic() < deadline, "the app did not start listening"
            time.sleep(0.2)
        url = {p["port"]: p["url"] for p in ws.ports()}[9000]
    preview = f"http://9000--site--alice.localhost:{srv.port}/"
    assert url == preview
    ctx = browser.new_context()
    page = ctx.new_page()
    try:
        # Not signed in on the preview origin: to Den, its login page, and back.
        page.goto(preview)
        assert page.url.startswith(f"{base}/login?next=%2Fpreview-auth")
        page.get_by_label("API token").fill(srv.token)
        page.get_by_role("button", name="Sign in with token").click()
        page.wait_for_url(preview, timeout=LONG_MS)
        page.locator("#ws").filter(has_text="echo:ping from the page").wait_for(timeout=LONG_MS)
        page.locator("#sse").filter(has_text="event:tick 0").wait_for(timeout=LONG_MS)
        # The app's own cookie works; Den's cookies are invisible to its JavaScript.
        assert page.locator("#cookie").inner_text() == "cookie:app=1"
        cookies = {(c["name"], c["domain"]): c for c in ctx.cookies()}
        preview_cookie = cookies[("den_preview", "9000--site--alice.localhost")]
        assert preview_cookie["httpOnly"] is True
        assert cookies[("den_session", "127.0.0.1")]["httpOnly"] is True
        assert not any(name == "den_session" and domain != "127.0.0.1"
                       for name, domain in cookies)
        # The app cannot call Den's API as the user: cross-origin, and no CORS.
        answer = page.evaluate(
            f"fetch('{base}/api/v1/workspaces', {{credentials: 'include'}})"
            ".then(r => 'status ' + r.status).catch(() => 'blocked')")
        assert answer == "blocked"
        # Another origin (another port) needs its own sign-in hand-over: it does not share
        # this origin's cookie, and comes back through Den on its own.
        other = f"http://8000--site--alice.localhost:{srv.port}/"
        page.goto(other)
        page.wait_for_url(other, timeout=LONG_MS)  # back after the hand-over
        assert "nothing answers on port 8000" in page.content()  # a 502 page naming the port
        assert ("den_preview", "8000--site--alice.localhost") in {
            (c["name"], c["domain"]) for c in ctx.cookies()}

        # Den's page of the workspace: a live usage chart with figures, and the ports table
        # following what listens, without a reload.
        den_page = ctx.new_page()
        den_page.goto(f"{base}/workspaces/{ws.id}")
        den_page.evaluate("window.notReloaded = true")
        den_page.locator("[data-usage-cpu]").filter(has_text=re.compile(r"^\d+%$")).wait_for(
            timeout=LONG_MS)
        den_page.locator("[data-usage-mem]").filter(
            has_text=re.compile(r"^\d+ MiB \(\d+%\)$")).wait_for(timeout=LONG_MS)
        points = den_page.locator("[data-chart-cpu] polyline").get_attribute("points")
        assert points and len(points.split()) >= 1
        assert den_page.locator('tr[data-port="9100"]').count() == 0
        with Den(base, srv.token) as client:
            client.workspace("site").processes.start(
                "exec python3 -m http.server 9100 --bind 127.0.0.1")
        den_page.locator('tr[data-port="9100"]').wait_for(timeout=LONG_MS)
        assert den_page.evaluate("window.notReloaded") is True
        den_page.screenshot(path=str(DOCS / "web-workspace-usage.png"), full_page=True)
    finally:
        ctx.close()
