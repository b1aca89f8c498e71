"""Pages of the workspace list (server/workspaces/listing.py), through the API on the fake
runtime: every workspace exactly once, in creation order, only the caller's own."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from server.db.models import Workspace
from server.workspaces import listing
from tests.conftest import ApiClient

WS = "/api/v1/workspaces"


def pages(api: ApiClient, limit: int, user: str = "alice") -> list[list[str]]:
    out: list[list[str]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": limit, **({"after": after} if after else {})}
        r = api.get(WS, user=user, params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        out.append([w["name"] for w in body["workspaces"]])
        after = body["next"]
        if after is None:
            return out


def test_pages_hold_every_workspace_once_in_creation_order(
        fake_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    repo = make_repo()
    names = [f"w{i}" for i in range(5)]
    for n in names:
        fake_api.create(repo, name=n, wait=False)
    fake_api.create(repo, name="bobs", user="bob", wait=False)
    assert pages(fake_api, 2) == [["w0", "w1"], ["w2", "w3"], ["w4"]]
    assert pages(fake_api, 5) == [names]  # a full last page: no empty page after it
    assert pages(fake_api, 1000) == [names]
    assert pages(fake_api, 4, user="bob") == [["bobs"]]
    assert [n for page in pages(fake_api, 2, user="root") for n in page] == [*names, "bobs"]
    whole = fake_api.get(WS).json()  # without limit: all of them, no next
    assert [w["name"] for w in whole["workspaces"]] == names and whole["next"] is None


def test_a_cursor_outlives_the_deletion_of_its_row(
        fake_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    repo = make_repo()
    made = [fake_api.create(repo, name=f"w{i}") for i in range(4)]
    first = fake_api.get(WS, params={"limit": 2}).json()
    assert fake_api.delete(f"{WS}/{made[1]['id']}").status_code in (202, 204)
    rest = fake_api.get(WS, params={"limit": 2, "after": first["next"]}).json()
    assert [w["name"] for w in rest["workspaces"]] == ["w2", "w3"]


def test_bad_paging_is_a_clear_422(fake_api: ApiClient) -> None:
    for params in ({"limit": 0}, {"limit": listing.MAX_PAGE + 1}, {"limit": "x"},
                   {"limit": 2, "after": "not-a-cursor"}, {"limit": 2, "after": "x" * 600},
                   {"after": listing.encode(listing.Cursor(datetime.now(UTC), "ws1"))}):
        r = fake_api.get(WS, params=params)
        assert r.status_code == 422, (params, r.text)
        assert r.json()["error"]["message"], r.text


def test_cursors_round_trip_and_order_ties_by_id() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    cursor = listing.Cursor(at, "wsabc")
    assert listing.decode(listing.encode(cursor)) == cursor
    sql = str(listing.page_query(select(Workspace), limit=3, after=cursor))
    assert "ORDER BY workspaces.created_at, workspaces.id" in sql
    assert "workspaces.created_at = " in sql and "workspaces.id > " in sql
