"""Activity writes coalesced in the process (server/workspaces/touches.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from server.auth.tokens import ensure_user
from server.db.models import Workspace
from server.workspaces.service import CreateRequest, WorkspaceService
from server.workspaces.touches import TouchCoalescer
from tests.conftest import FakeClock


def test_one_touch_a_window_per_workspace() -> None:
    clock = FakeClock()
    c = TouchCoalescer(window_s=1.0, clock=clock)
    assert c.due("a") and c.due("b")
    clock.now += 0.5
    assert not c.due("a") and not c.due("b")
    clock.now += 0.6
    assert c.due("a")
    assert not c.due("a")
    c.forget("a")
    assert c.due("a")


def test_bounded() -> None:
    clock = FakeClock()
    c = TouchCoalescer(window_s=1.0, max_entries=4, clock=clock)
    for i in range(4):
        assert c.due(f"w{i}")
    clock.now += 2  # all past their window: dropped to make room
    assert c.due("new") and len(c._last) == 1
    for i in range(10):  # all within their window: the oldest half goes
        c.due(f"x{i}")
        assert len(c._last) <= 4
    assert not c.due("x9")  # the newest is still remembered


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_ledger_touch_is_coalesced_unless_forced(
        make_service: Callable[..., WorkspaceService], make_repo: Callable[..., Path]) -> None:
    svc = make_service()
    clock = FakeClock()
    svc.ledger.touches = TouchCoalescer(window_s=1.0, clock=clock)
    with svc.sessions.begin() as s:
        owner = ensure_user(s, "alice")
    ws = await svc.create(owner, CreateRequest(name="api", repo_url=str(make_repo())))
    long_ago = datetime.now(UTC) - timedelta(hours=1)

    def age() -> None:
        with svc.sessions.begin() as s:
            s.execute(update(Workspace).where(Workspace.id == ws.id)
                      .values(last_activity_at=long_ago))

    def recent() -> bool:
        return svc.get(ws.id).last_activity_at > datetime.now(UTC) - timedelta(minutes=1)

    svc.touch(ws.id)
    age()
    svc.touch(ws.id)  # within the window: not written
    assert not recent()
    svc.touch(ws.id, force=True)
    assert recent()
    age()
    clock.now += 1.1
    svc.touch(ws.id)  # past the window: written
    assert recent()

