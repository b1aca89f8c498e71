"""The idle reaper: the pure decision, and passes over the fake runtime."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from server.auth.tokens import ensure_user
from server.db.models import Workspace
from server.runtime.errors import ObjectMissing
from server.runtime.fake import FakeRuntime
from server.workspaces.reaper import Action, IdleView, Reaper, decide
from server.workspaces.service import CreateRequest, WorkspaceService
from server.workspaces.states import State

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def view(**kw: Any) -> IdleView:
    base: dict[str, Any] = {
        "id": "ws1", "state": State.RUNNING, "keep_alive": False, "idle_timeout_s": 60,
        "stop_after_s": 3600, "last_activity_at": NOW - timedelta(seconds=61),
        "state_since": NOW - timedelta(seconds=61), "keepalive_until": None, "busy": False,
    }
    base.update(kw)
    return IdleView(**base)


@pytest.mark.parametrize(("v", "expected"), [
    (view(), [("ws1", Action.PAUSE)]),
    (view(last_activity_at=NOW - timedelta(seconds=59)), []),
    (view(busy=True), []),
    (view(keep_alive=True), []),
    (view(idle_timeout_s=0), []),
    (view(keepalive_until=NOW + timedelta(seconds=1)), []),
    (view(keepalive_until=NOW - timedelta(seconds=1)), [("ws1", Action.PAUSE)]),
    (view(state=State.PAUSED, state_since=NOW - timedelta(seconds=3600)), [("ws1", Action.STOP)]),
    (view(state=State.PAUSED, state_since=NOW - timedelta(seconds=3599)), []),
    (view(state=State.PAUSED, stop_after_s=0, state_since=NOW - timedelta(days=9)), []),
    (view(state=State.PAUSED, keep_alive=True, state_since=NOW - timedelta(days=9)), []),
    (view(state=State.STOPPED), []),
    (view(state=State.PAUSING), []),
])
def test_decide(v: IdleView, expected: list[tuple[str, Action]]) -> None:
    assert decide([v], NOW) == expected


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def service(make_service: Callable[..., WorkspaceService]) -> WorkspaceService:
    # Without the frozen tier: idle workspaces are saved to disk at once (test_sleep.py has
    # the frozen tier).
    return make_service(idle_timeout_s=60, stop_after_s=3600, idle_cpu_percent=10,
                        frozen_max_s=0, service_kw={"instance_id": "inst"})


async def _running(svc: WorkspaceService, repo: Path, *, name: str = "api", **kw: Any) -> str:
    with svc.sessions.begin() as s:
        owner = ensure_user(s, "alice")
    ws = await svc.create(owner, CreateRequest(name=name, repo_url=str(repo), **kw))
    await asyncio.wait({svc._tasks[ws.id]}, timeout=60)
    assert svc.get(ws.id).state == "running"
    return ws.id


def _age(svc: WorkspaceService, ws_id: str, seconds: int) -> None:
    """Pretend the last activity and the last state change were ``seconds`` ago."""
    then = datetime.now(UTC) - timedelta(seconds=seconds)
    with svc.sessions.begin() as s:
        s.execute(update(Workspace).where(Workspace.id == ws_id)
                  .values(last_activity_at=then, updated_at=then))


@pytest.mark.anyio
async def test_idle_workspace_is_paused_then_stopped(
        service: WorkspaceService, make_repo: Callable[..., Path]) -> None:
    ws_id = await _running(service, make_repo())
    reaper = Reaper(service, service.settings)
    assert await reaper.run_once() == []
    _age(service, ws_id, 61)
    assert await reaper.run_once() == [(ws_id, Action.PAUSE)]
    assert service.get(ws_id).state == "paused"
    assert service.events(ws_id)[-1].actor == "reaper"
    _age(service, ws_id, 3601)
    assert await reaper.run_once() == [(ws_id, Action.STOP)]
    assert service.get(ws_id).state == "stopped"


@pytest.mark.anyio
async def test_running_exec_and_cpu_use_count_as_activity(
        service: WorkspaceService, fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    ws_id = await _running(service, make_repo())
    reaper = Reaper(service, service.settings)
    _age(service, ws_id, 61)
    async with service.activity.hold(ws_id):
        assert await reaper.run_once() == []
    assert service.get(ws_id).last_activity_at > datetime.now(UTC) - timedelta(seconds=5)

    _age(service, ws_id, 61)
    container = next(iter(fake_runtime.containers.values()))
    await reaper.run_once()  # first reading; the workspace is idle and gets paused
    assert service.get(ws_id).state == "paused"
    await service.resume(ws_id, actor="alice")
    _age(service, ws_id, 61)
    assert await reaper.run_once() == [(ws_id, Action.PAUSE)]  # no CPU reading yet: idle
    await service.resume(ws_id, actor="alice")
    _age(service, ws_id, 61)
    # A reading one second ago, and ten CPU-seconds used since: busy.
    reaper._cpu[ws_id] = (container.cpu_ns, time.monotonic() - 1.0)
    container.cpu_ns += 10 * 10**9
    assert await reaper.run_once() == []
    assert service.get(ws_id).state == "running"


@pytest.mark.anyio
async def test_keepalive_lease_holds_until_it_expires(
        service: WorkspaceService, make_repo: Callable[..., Path]) -> None:
    ws_id = await _running(service, make_repo())
    reaper = Reaper(service, service.settings)
    await service.keepalive(ws_id, 120, actor="agent")
    _age(service, ws_id, 61)
    assert await reaper.run_once() == []
    await service.keepalive(ws_id, 0, actor="agent")  # ends the lease
    _age(service, ws_id, 61)
    assert await reaper.run_once() == [(ws_id, Action.PAUSE)]


@pytest.mark.anyio
async def test_keep_alive_workspaces_are_never_paused(
        service: WorkspaceService, make_repo: Callable[..., Path]) -> None:
    ws_id = await _running(service, make_repo(), keep_alive=True)
    _age(service, ws_id, 10**6)
    assert await Reaper(service, service.settings).run_once() == []


@pytest.mark.anyio
async def test_a_resumed_workspace_gets_a_fresh_idle_clock(
        service: WorkspaceService, make_repo: Callable[..., Path]) -> None:
    ws_id = await _running(service, make_repo())
    reaper = Reaper(service, service.settings)
    _age(service, ws_id, 61)
    assert await reaper.run_once() == [(ws_id, Action.PAUSE)]
    _age(service, ws_id, 61)
    await service.resume(ws_id, actor="alice")
    assert await reaper.run_once() == []
    await service.stop(ws_id, actor="alice")
    _age(service, ws_id, 61)
    await service.start(ws_id, actor="alice")
    assert await reaper.run_once() == []


def test_sweep_removes_only_old_restore_copies(tmp_path: Path) -> None:
    import os
    import time

    from server.runtime.containerd_tmp import sweep_restore_copies

    old, new, other = (tmp_path / "ctrd-checkpoint1", tmp_path / "ctrd-checkpoint2",
                       tmp_path / "unrelated")
    for d in (old, new, other):
        d.mkdir()
        (d / "pages").write_bytes(b"x")
    past = time.time() - 3600
    os.utime(old, (past, past))
    os.utime(other, (past, past))
    assert sweep_restore_copies(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctrd-checkpoint2", "unrelated"]


@pytest.mark.anyio
@pytest.mark.parametrize("error", [
    ObjectMissing("container den-x: not found in the engine"),
    # What the engine's stats leaked before it was translated (a workspace deleted while
    # the engine answered): anything unexpected skips that one workspace as well.
    ValueError("Expecting value: line 1 column 1 (char 0)"),
])
async def test_a_workspace_that_cannot_be_measured_is_skipped_and_the_pass_goes_on(
        service: WorkspaceService, fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path], error: Exception) -> None:
    repo = make_repo()
    broken = await _running(service, repo, name="broken")
    healthy = await _running(service, repo, name="healthy")
    fake_runtime.fail_for[("usage", broken)] = error
    reaper = Reaper(service, service.settings)
    _age(service, broken, 61)
    _age(service, healthy, 61)
    assert await reaper.run_once() == [(healthy, Action.PAUSE)]
    assert service.get(healthy).state == "paused"
    assert service.get(broken).state == "running"
    del fake_runtime.fail_for[("usage", broken)]
    assert await reaper.run_once() == [(broken, Action.PAUSE)]
