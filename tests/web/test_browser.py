"""The dashboard and the web terminal in a real Chromium, on the real engine with runsc:
sign in with a token, create a workspace from a local repository, open its terminal, run a
command, resize, reload (the shell survives), pause and open the terminal again (it wakes).
Screenshots for the README land in docs/."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from tests.server_process import DenServer
from tests.web.conftest import DOCS, CuttableProxy, screen_lines, wait_for_line

pytestmark = [pytest.mark.engine, pytest.mark.browser]

LONG_MS = 120_000


def sign_in(page: Any, base: str, token: str, *, next_path: str = "/workspaces") -> None:
    page.goto(f"{base}{next_path}")
    assert "/login" in page.url  # not signed in: sent to the login page
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in with token").click()
    page.wait_for_url(f"{base}{next_path}")


def terminal_connected(page: Any) -> None:
    """Wait until the terminal is connected and the shell shows its prompt. (A blank screen
    after a reconnect was the sandbox OOM-killed by gVisor's leak on tmux's close(INT_MAX),
    see closefix.c: the screen must come back on its own.)"""
    page.locator('#terminal[data-state="connected"]').wait_for(timeout=LONG_MS)
    wait_for_line(page, r".*\$", timeout_s=60)


def type_line(page: Any, text: str) -> None:
    page.locator("#terminal").click()
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def ws_error(url: str, headers: dict[str, str]) -> dict[str, Any]:
    """The error message a terminal WebSocket ends with (Playwright's sync API owns this
    thread's event loop, hence the sync client)."""
    with connect(url, additional_headers=headers, open_timeout=30) as sock:
        while True:
            msg = json.loads(sock.recv(timeout=60))
            if msg["type"] == "error":
                return msg  # type: ignore[no-any-return]


def test_dashboard_and_terminal_in_chromium(
    engine: None, browser: Any, den: Callable[..., DenServer],
    make_repo: Callable[..., Path],
) -> None:
    srv = den()
    base = f"http://127.0.0.1:{srv.port}"
    repo = make_repo("hello", files={"README.md": "# hello\n"})
    ctx = browser.new_context(viewport={"width": 1280, "height": 760})
    page = ctx.new_page()
    try:
        sign_in(page, base, srv.token)

        # Create from the dashboard; the state column goes live from creating to running.
        page.get_by_label("Repository URL").fill(str(repo))
        page.get_by_label("Branch (optional)").fill("main")
        page.get_by_label("Name (optional)").fill("hello")
        with page.expect_response(lambda r: r.url == f"{base}/workspaces"
                                  and r.request.method == "GET") as created:
            page.get_by_role("button", name="Create workspace").click()
        assert "data-while-creating" in created.value.text()  # "Creating hello: cloning ..."
        row = page.locator('tr[data-ws-name="hello"]')
        row.locator("[data-state]").filter(has_text="running").wait_for(timeout=LONG_MS)
        # ... which goes once the workspace runs, without a reload.
        page.locator("[data-while-creating]").wait_for(state="detached", timeout=LONG_MS)
        assert "main" in row.inner_text()
        page.goto(f"{base}/workspaces")  # without the "Creating..." message, for the README
        page.screenshot(path=str(DOCS / "web-dashboard.png"))

        # The terminal: a login shell as dev in the repo directory.
        row.get_by_role("link", name="Open the terminal of hello").click()
        terminal_connected(page)
        type_line(page, "echo $((6*7))")
        wait_for_line(page, r"42")
        type_line(page, "export DEN_MARK=still-$((20+1)); whoami; pwd")
        wait_for_line(page, r"dev")
        wait_for_line(page, r"/workspace/hello")
        page.screenshot(path=str(DOCS / "web-terminal.png"))

        # Resize the window: the terminal refits and the shell sees the new width.
        cols_before = page.evaluate("window.denTerminal.cols")
        page.set_viewport_size({"width": 820, "height": 600})
        page.wait_for_function(f"window.denTerminal.cols < {cols_before}")
        cols = page.evaluate("window.denTerminal.cols")
        type_line(page, "stty size")
        wait_for_line(page, rf"\d+ {cols}")

        # Reload: a new connection re-attaches to the same shell, and the screen comes back.
        page.reload()
        terminal_connected(page)
        wait_for_line(page, r"42")  # replayed: tmux repaints what was on the screen
        type_line(page, "echo $DEN_MARK")
        wait_for_line(page, r"still-21")

        # Pause from the workspace page, then open the terminal: it wakes the workspace,
        # and the shell (in dev's tmux, which a pause keeps) is still the same.
        # The terminal stays open in its tab meanwhile: its screen is kept, and it says the
        # workspace was paused (not a bare "disconnected").
        ws_id = srv.http.get("/api/v1/workspaces/hello").json()["id"]
        terminal_page = page
        page = ctx.new_page()
        page.goto(f"{base}/workspaces/{ws_id}")
        page.get_by_role("button", name="Pause hello").click()
        page.locator(".page-head [data-state]").filter(has_text="paused").wait_for(
            timeout=LONG_MS)
        assert srv.http.get(f"/api/v1/workspaces/{ws_id}").json()["state"] == "paused"
        status = terminal_page.locator("#term-status")
        try:
            status.filter(has_text="the workspace was paused").wait_for(timeout=LONG_MS)
        except Exception:
            raise AssertionError(f"terminal status: {status.inner_text()!r}") from None
        assert any("still-21" in line for line in screen_lines(terminal_page))
        terminal_page.close()
        page.goto(f"{base}/workspaces/{ws_id}/terminal")
        terminal_connected(page)
        assert srv.http.get(f"/api/v1/workspaces/{ws_id}").json()["state"] == "running"
        type_line(page, "echo $DEN_MARK-$((1+1))")
        wait_for_line(page, r"still-21-2")
        events = srv.http.get(f"/api/v1/workspaces/{ws_id}/events").json()["events"]
        assert any(e["kind"] == "wake" for e in events)

        # The event log on the workspace page shows the pause and the wake.
        page.goto(f"{base}/workspaces/{ws_id}")
        log = page.locator("[data-events]").inner_text()
        assert "paused" in log and "resumed on access" in log
    finally:
        ctx.close()

    # Another user: the pages and the terminal of alice's workspace do not exist for bob.
    bob = srv._cli("admin", "token", "--user", "bob")
    ctx = browser.new_context()
    page = ctx.new_page()
    try:
        sign_in(page, base, bob)
        assert "hello" not in page.locator("main").inner_text()
        for path in (f"/workspaces/{ws_id}/terminal", f"/workspaces/{ws_id}"):
            response = page.goto(f"{base}{path}")
            assert response is not None and response.status == 404
            assert "Not found" in page.content()
    finally:
        ctx.close()
    url = f"ws://127.0.0.1:{srv.port}/api/v1/workspaces/{ws_id}/terminal"
    err = ws_error(url, {"Authorization": f"Bearer {bob}"})
    assert err["error"]["code"] == "not_found"
    err = ws_error(url, {})
    assert err["error"]["code"] == "unauthorized"


def test_the_terminal_reconnects_after_a_network_blip(
    engine: None, browser: Any, den: Callable[..., DenServer],
    make_repo: Callable[..., Path],
) -> None:
    srv = den()
    ws = srv.http.post("/api/v1/workspaces", json={
        "name": "blip", "repo": {"url": str(make_repo("blip"))}}).json()
    deadline = time.monotonic() + 120
    while srv.http.get(f"/api/v1/workspaces/{ws['id']}").json()["state"] != "running":
        assert time.monotonic() < deadline, "the workspace did not start"
        time.sleep(0.2)
    proxy = CuttableProxy(srv.port)  # the browser reaches Den through it
    ctx = browser.new_context()
    page = ctx.new_page()
    try:
        base = f"http://127.0.0.1:{proxy.port}"
        sign_in(page, base, srv.token, next_path=f"/workspaces/{ws['id']}/terminal")
        terminal_connected(page)
        # Cut only once the shell has the line: keys typed just before a cut may be lost
        # with the connection, as they would be for a person.
        type_line(page, "BLIP=$((3*3))0; echo set-$((4+4))")
        wait_for_line(page, r"set-8")
        proxy.cut()  # every connection through the proxy drops, the WebSocket with them
        page.locator('#terminal:not([data-state="connected"])').wait_for(timeout=LONG_MS)
        terminal_connected(page)  # reconnected on its own
        type_line(page, "echo got-$BLIP")
        wait_for_line(page, r"got-90")
        assert any(re.search(r"BLIP=", line) for line in screen_lines(page))
    finally:
        ctx.close()
        proxy.close()
