"""The dashboard's layout in a real Chromium, on the fake runtime (``tests.fake_serve``: no
engine needed): at 1280 px a workspace row keeps its action buttons and its last activity on
one line; at 390 px the branch pill keeps its width (it collapsed to a sliver before); the
empty resource fields read as defaults, not as typed values."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.server_process import DenServer
from tests.web.test_browser import sign_in

pytestmark = [pytest.mark.browser]


def test_dashboard_rows_do_not_wrap_and_the_branch_pill_holds(
        browser: Any, den: Callable[..., DenServer], make_repo: Callable[..., Path]) -> None:
    srv = den(module="tests.fake_serve", ssh_port=0)
    base = f"http://127.0.0.1:{srv.port}"
    repo = make_repo("a-repository-with-a-long-name", files={"README.md": "# x\n"})
    r = srv.http.post("/api/v1/workspaces", json={
        "name": "layout", "repo": {"url": str(repo), "branch": "main"}})
    assert r.status_code == 202, r.text
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    page = ctx.new_page()
    try:
        sign_in(page, base, srv.token)
        row = page.locator('tr[data-ws-name="layout"]')
        row.locator("[data-state]").filter(has_text="running").wait_for(timeout=60_000)

        def lines(locator: Any) -> float:
            """How many lines of text ``locator`` takes (its height over one line's)."""
            return float(locator.evaluate(
                "el => el.getBoundingClientRect().height / "
                "parseFloat(getComputedStyle(el).lineHeight || 20)"))

        actions = row.locator("[data-actions]")
        buttons = actions.locator("a:visible, button:visible")
        tops = {round(b.bounding_box()["y"]) for b in buttons.all()}
        assert len(tops) == 1, f"the action buttons wrap at 1280 px: {tops}"
        assert lines(row.locator("[data-activity]")) < 1.5
        # Placeholders say they are defaults, in a style apart from typed text.
        cpus = page.get_by_label("CPUs")
        assert cpus.get_attribute("placeholder").startswith("default: ")
        assert page.evaluate(
            "getComputedStyle(document.getElementById('cpus'), '::placeholder').fontStyle"
        ) == "italic"

        page.set_viewport_size({"width": 390, "height": 844})
        pill = row.locator(".branch")
        box = pill.bounding_box()
        text_width = pill.evaluate("el => { const r = document.createRange(); "
                                   "r.selectNodeContents(el); "
                                   "return r.getBoundingClientRect().width; }")
        assert box["width"] >= text_width, (box, text_width)
        assert lines(pill) < 1.5, "the branch pill wraps or collapses at 390 px"
    finally:
        ctx.close()
