"""Thousands of paused workspaces on one host (issue 13; tests/benchmarks/bench_paused.py):
what runs often (every start, stop, pause and resume; every reconcile) must not do work for
each of them. On the fake runtime, counting the work."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, update

from server.auth.tokens import ensure_user
from server.db.models import Workspace
from server.runtime.fake import FakeRuntime
from server.workspaces.handles import CHECKPOINT
from server.workspaces.reaper import Action, Reaper
from server.workspaces.service import CreateRequest, WorkspaceService


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _paused(svc: WorkspaceService, repo: Path, n: int) -> list[str]:
    with svc.sessions.begin() as s:
        owner = ensure_user(s, "alice")
    ids = []
    for i in range(n):
        ws = await svc.create(owner, CreateRequest(name=f"w{i}", repo_url=str(repo)))
        await asyncio.wait({svc._tasks[ws.id]}, timeout=60)
        await svc.pause(ws.id, actor="test")
        assert svc.get(ws.id).state == "paused"
        ids.append(ws.id)
    return ids


@pytest.mark.anyio
async def test_network_policies_build_only_new_or_changed_rows(
        make_service: Callable[..., WorkspaceService], make_repo: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    svc = make_service()
    ids = await _paused(svc, make_repo(), 4)
    first = svc.networks.policies()
    assert len(first) == 4
    built: list[str] = []
    sandbox_name = svc.sandbox_name

    def counted(ws: Workspace) -> str:
        built.append(ws.id)
        return sandbox_name(ws)

    monkeypatch.setattr(svc, "sandbox_name", counted)
    assert svc.networks.policies() == first and built == []  # nothing changed: no row built
    with svc.sessions.begin() as s:  # one policy changes
        s.execute(update(Workspace).where(Workspace.id == ids[1])
                  .values(network={"mode": "none", "allow": []}))
    again = svc.networks.policies()
    assert built == [ids[1]]
    assert [p.mode for p in again.values()] == [
        "none" if name == sandbox_name(svc.get(ids[1])) else first[name].mode
        for name in again]
    await svc.delete(ids[2], actor="test")  # a deleted one is gone from the policies
    assert len(svc.networks.policies()) == 3 and built == [ids[1]]


@pytest.mark.anyio
async def test_reconcile_asks_the_engine_nothing_per_settled_paused_workspace(
        make_service: Callable[..., WorkspaceService], make_repo: Callable[..., Path],
        fake_runtime: FakeRuntime) -> None:
    svc = make_service()
    ids = await _paused(svc, make_repo(), 5)
    fake_runtime.calls.clear()
    await svc.reconcile()
    assert fake_runtime.calls.count("status") == 0, fake_runtime.calls
    assert [svc.get(i).state for i in ids] == ["paused"] * 5
    # One whose container the engine lists as running (started from outside) is still seen.
    spec = svc.spec_for(svc.get(ids[0]))
    await fake_runtime.resume(spec, checkpoint=CHECKPOINT)
    fake_runtime.calls.clear()
    await svc.reconcile()
    assert fake_runtime.calls.count("status") == 1
    assert svc.get(ids[0]).state == "running"
    assert [svc.get(i).state for i in ids[1:]] == ["paused"] * 4


@pytest.mark.anyio
async def test_a_reaper_pass_loads_no_whole_row_of_a_saved_workspace(
        make_service: Callable[..., WorkspaceService], make_repo: Callable[..., Path]) -> None:
    svc = make_service(idle_timeout_s=3600, stop_after_s=60, frozen_max_s=0)
    repo = make_repo()
    saved = await _paused(svc, repo, 4)
    with svc.sessions.begin() as s:
        owner = ensure_user(s, "alice")
    running = await svc.create(owner, CreateRequest(name="live", repo_url=str(repo)))
    await asyncio.wait({svc._tasks[running.id]}, timeout=60)
    loaded: list[str] = []

    def on_load(ws: Workspace, _context: object) -> None:
        loaded.append(ws.id)

    reaper = Reaper(svc, svc.settings)
    event.listen(Workspace, "load", on_load)
    try:
        assert await reaper.run_once() == []
        assert loaded == [running.id]
        loaded.clear()
        then = datetime.now(UTC) - timedelta(seconds=61)  # paused long enough: stopped
        with svc.sessions.begin() as s:
            s.execute(update(Workspace).where(Workspace.id == saved[0]).values(updated_at=then))
        assert await reaper.run_once() == [(saved[0], Action.STOP)]
    finally:
        event.remove(Workspace, "load", on_load)
    assert svc.get(saved[0]).state == "stopped"
    assert [svc.get(i).state for i in saved[1:]] == ["paused"] * 3
