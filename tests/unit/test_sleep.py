"""The two sleep tiers (frozen in place, saved to disk): the pure policy, the reaper's passes
and the service's transitions on the fake runtime (tests/engine/test_sleep.py: the engine)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from server.db.models import Workspace
from server.runtime.base import ContainerStatus, EngineEvent, EngineEventKind
from server.runtime.docker_specs import container_of
from server.runtime.errors import EngineError
from server.runtime.fake import FakeRuntime
from server.workspaces.reaper import Action, IdleView, Reaper, decide
from server.workspaces.service import WorkspaceService
from server.workspaces.sleep import Frozen, SleepPolicy, host_available_bytes, to_save
from server.workspaces.states import Sleep, State
from tests.unit.test_reaper import _age, _running

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
MIB = 2**20
POLICY = SleepPolicy(frozen_max_s=600, budget_bytes=0, host_floor_bytes=0)


def ago(seconds: int) -> datetime:
    return NOW - timedelta(seconds=seconds)


# --- the pure policy ----------------------------------------------------------------------


def test_frozen_long_enough_is_saved_and_the_others_stay() -> None:
    frozen = [Frozen("new", ago(599), MIB), Frozen("old", ago(600), MIB)]
    assert to_save(frozen, NOW, POLICY, host_available_bytes=None) == ["old"]


def test_over_the_budget_the_longest_frozen_go_until_the_rest_fits() -> None:
    policy = SleepPolicy(frozen_max_s=600, budget_bytes=250 * MIB, host_floor_bytes=0)
    frozen = [Frozen("c", ago(10), 100 * MIB), Frozen("a", ago(30), 100 * MIB),
              Frozen("b", ago(20), 100 * MIB)]
    assert to_save(frozen, NOW, policy, host_available_bytes=None) == ["a"]
    policy = SleepPolicy(frozen_max_s=600, budget_bytes=150 * MIB, host_floor_bytes=0)
    assert to_save(frozen, NOW, policy, host_available_bytes=None) == ["a", "b"]


def test_host_short_of_memory_saves_longest_frozen_until_the_floor_is_met() -> None:
    policy = SleepPolicy(frozen_max_s=600, budget_bytes=0, host_floor_bytes=1000 * MIB)
    frozen = [Frozen("b", ago(20), 300 * MIB), Frozen("a", ago(30), 300 * MIB),
              Frozen("c", ago(10), 300 * MIB)]
    assert to_save(frozen, NOW, policy, host_available_bytes=1000 * MIB) == []
    assert to_save(frozen, NOW, policy, host_available_bytes=500 * MIB) == ["a", "b"]
    assert to_save(frozen, NOW, policy, host_available_bytes=None) == []  # unreadable


def test_without_a_frozen_tier_every_frozen_workspace_is_saved() -> None:
    policy = SleepPolicy(frozen_max_s=0, budget_bytes=0, host_floor_bytes=0)
    assert not policy.freezes
    assert to_save([Frozen("a", NOW, None)], NOW, policy, host_available_bytes=None) == ["a"]


def test_host_available_memory_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    1234 kB\n")
    assert host_available_bytes(meminfo) == 1234 * 1024
    meminfo.write_text("MemTotal: 1 kB\n")
    assert host_available_bytes(meminfo) is None
    assert host_available_bytes(tmp_path / "missing") is None


def view(**kw: Any) -> IdleView:
    base: dict[str, Any] = {
        "id": "ws1", "state": State.RUNNING, "keep_alive": False, "idle_timeout_s": 60,
        "stop_after_s": 3600, "last_activity_at": ago(61), "state_since": ago(61),
        "keepalive_until": None, "busy": False,
    }
    base.update(kw)
    return IdleView(**base)


@pytest.mark.parametrize(("v", "expected"), [
    (view(), [("ws1", Action.FREEZE)]),
    (view(busy=True), []),
    (view(state=State.PAUSED, sleep=Sleep.FROZEN, state_since=ago(599)), []),
    (view(state=State.PAUSED, sleep=Sleep.FROZEN, state_since=ago(600)), [("ws1", Action.SAVE)]),
    (view(state=State.PAUSED, sleep=Sleep.SAVED, state_since=ago(600)), []),
    # stop_after_s counts from the last change of tier and wins over a save
    (view(state=State.PAUSED, sleep=Sleep.FROZEN, state_since=ago(3600)), [("ws1", Action.STOP)]),
])
def test_decide_with_the_frozen_tier(v: IdleView, expected: list[tuple[str, Action]]) -> None:
    assert decide([v], NOW, POLICY) == expected


# --- the service and the reaper on the fake runtime ---------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def service(make_service: Callable[..., WorkspaceService]) -> WorkspaceService:
    return make_service(idle_timeout_s=60, stop_after_s=86400, frozen_max_s=600,
                        frozen_memory_budget_mb=0, host_min_available_mb=0)


def _sleep(svc: WorkspaceService, ws_id: str) -> tuple[str, str | None]:
    ws = svc.get(ws_id)
    return ws.state, ws.sleep


@pytest.mark.anyio
async def test_idle_is_frozen_then_saved_then_stopped(
        service: WorkspaceService, fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    ws_id = await _running(service, make_repo())
    spec = service.spec_for(service.get(ws_id))
    reaper = Reaper(service, service.settings)
    _age(service, ws_id, 61)
    assert await reaper.run_once() == [(ws_id, Action.FREEZE)]
    assert _sleep(service, ws_id) == ("paused", "frozen")
    assert await fake_runtime.status(spec) is ContainerStatus.FROZEN
    assert not fake_runtime.containers[container_of(spec)].checkpoints  # memory in place
    assert service.get(ws_id).engine["frozen_bytes"] == 64 * MIB
    assert await reaper.run_once() == []  # frozen for less than frozen_max_s
    _age(service, ws_id, 600)
    assert await reaper.run_once() == [(ws_id, Action.SAVE)]
    assert _sleep(service, ws_id) == ("paused", "saved")
    assert await fake_runtime.status(spec) is ContainerStatus.STOPPED
    assert fake_runtime.containers[container_of(spec)].checkpoints
    assert [(e.from_state, e.to_state) for e in service.events(ws_id) if e.kind == "state"][-4:] \
        == [("running", "pausing"), ("pausing", "paused"), ("paused", "pausing"),
            ("pausing", "paused")]
    _age(service, ws_id, 86400)
    assert await reaper.run_once() == [(ws_id, Action.STOP)]
    assert _sleep(service, ws_id) == ("stopped", None)


@pytest.mark.anyio
async def test_the_frozen_over_their_budget_are_saved_longest_frozen_first(
        make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    svc = make_service(idle_timeout_s=60, frozen_max_s=600, frozen_memory_budget_mb=100,
                       host_min_available_mb=0)
    repo = make_repo()
    first = await _running(svc, repo, name="one")
    second = await _running(svc, repo, name="two")
    reaper = Reaper(svc, svc.settings)
    _age(svc, first, 120)
    _age(svc, second, 61)
    assert sorted(await reaper.run_once()) == sorted([(first, Action.FREEZE),
                                                      (second, Action.FREEZE)])
    _age(svc, first, 20)
    _age(svc, second, 10)
    # 64 MiB each: together over the 100 MiB budget; the one frozen longest goes to disk
    assert await reaper.run_once() == [(first, Action.SAVE)]
    assert (_sleep(svc, first), _sleep(svc, second)) == (("paused", "saved"),
                                                         ("paused", "frozen"))


@pytest.mark.anyio
async def test_a_host_short_of_memory_saves_the_frozen(
        make_service: Callable[..., WorkspaceService], make_repo: Callable[..., Path],
        tmp_path: Path) -> None:
    svc = make_service(idle_timeout_s=60, frozen_max_s=600, frozen_memory_budget_mb=0,
                       host_min_available_mb=1024)
    ws_id = await _running(svc, make_repo())
    reaper = Reaper(svc, svc.settings)
    reaper.meminfo = tmp_path / "meminfo"
    reaper.meminfo.write_text(f"MemAvailable: {4096 * 1024} kB\n")
    _age(svc, ws_id, 61)
    assert await reaper.run_once() == [(ws_id, Action.FREEZE)]
    assert await reaper.run_once() == []
    reaper.meminfo.write_text(f"MemAvailable: {1000 * 1024} kB\n")
    assert await reaper.run_once() == [(ws_id, Action.SAVE)]
    assert _sleep(svc, ws_id) == ("paused", "saved")


@pytest.mark.anyio
async def test_a_wake_from_frozen_thaws_in_place(
        service: WorkspaceService, fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    ws_id = await _running(service, make_repo())
    spec = service.spec_for(service.get(ws_id))
    await service.freeze(ws_id, actor="test")
    container = fake_runtime.containers[container_of(spec)]
    result = await service.exec(ws_id, service.exec_request(service.get(ws_id), ["true"]),
                                actor="alice")
    assert result.exit_code == 0
    assert _sleep(service, ws_id) == ("running", None)
    assert (container.frozen, container.restored) == (False, 0)  # thawed, not restored
    assert "thawed" in service.events(ws_id)[-1].message
    assert [e.kind for e in service.events(ws_id)][-3] == "wake"


@pytest.mark.anyio
async def test_explicit_pause_of_a_frozen_workspace_saves_it_and_resume_restores(
        service: WorkspaceService, fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    ws_id = await _running(service, make_repo())
    spec = service.spec_for(service.get(ws_id))
    await service.freeze(ws_id, actor="test")
    await service.pause(ws_id, actor="alice")
    assert _sleep(service, ws_id) == ("paused", "saved")
    await service.pause(ws_id, actor="alice")  # satisfied: nothing changes
    assert _sleep(service, ws_id) == ("paused", "saved")
    await service.resume(ws_id, actor="alice")
    assert fake_runtime.containers[container_of(spec)].restored == 1
    # and a pause of a running workspace goes straight to disk, as it always did
    await service.pause(ws_id, actor="alice")
    assert _sleep(service, ws_id) == ("paused", "saved")


@pytest.mark.anyio
async def test_a_failed_save_of_a_frozen_workspace_leaves_it_frozen(
        service: WorkspaceService, fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    ws_id = await _running(service, make_repo())
    await service.freeze(ws_id, actor="test")
    fake_runtime.fail_next["pause"] = EngineError("checkpoint refused")
    with pytest.raises(EngineError):
        await service.pause(ws_id, actor="reaper")
    assert _sleep(service, ws_id) == ("paused", "frozen")
    assert "pause failed" in service.events(ws_id)[-1].message


@pytest.mark.anyio
async def test_stop_and_delete_of_a_frozen_workspace(
        service: WorkspaceService, fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    ws_id = await _running(service, make_repo())
    spec = service.spec_for(service.get(ws_id))
    await service.freeze(ws_id, actor="test")
    await service.stop(ws_id, actor="alice")
    assert _sleep(service, ws_id) == ("stopped", None)
    assert await fake_runtime.status(spec) is ContainerStatus.STOPPED
    await service.start(ws_id, actor="alice")
    await service.freeze(ws_id, actor="test")
    assert await service.delete(ws_id, actor="alice")
    assert container_of(spec) not in fake_runtime.containers


@pytest.mark.anyio
async def test_reconcile_keeps_frozen_workspaces_frozen_and_settles_cut_operations(
        service: WorkspaceService, fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    repo = make_repo()
    kept, waking, freezing, died, outside = [
        await _running(service, repo, name=n)
        for n in ("kept", "waking", "freezing", "died", "outside")]
    for ws_id in (kept, waking, freezing, died):
        await service.freeze(ws_id, actor="test")

    def container(ws_id: str) -> Any:
        return fake_runtime.containers[container_of(service.spec_for(service.get(ws_id)))]

    def set_state(ws_id: str, state: State) -> None:
        with service.sessions.begin() as s:
            s.execute(update(Workspace).where(Workspace.id == ws_id).values(state=state.value))

    set_state(waking, State.RESUMING)  # den serve was killed before the thaw
    set_state(freezing, State.PAUSING)  # ... after the freeze, before it was recorded
    container(died).running = container(died).frozen = False  # it exited while frozen
    container(outside).frozen = True  # frozen by someone else while recorded running
    await service.reconcile()
    assert _sleep(service, kept) == ("paused", "frozen")
    assert container(kept).frozen
    assert _sleep(service, waking) == ("paused", "frozen")
    assert _sleep(service, freezing) == ("paused", "frozen")
    assert _sleep(service, died) == ("stopped", None)
    assert _sleep(service, outside) == ("running", None)
    assert not container(outside).frozen
    # and a workspace kept frozen across the restart still wakes in place
    await service.ensure_running(kept, actor="alice")
    assert (container(kept).frozen, container(kept).restored) == (False, 0)


@pytest.mark.anyio
async def test_a_frozen_workspace_whose_container_dies_is_recorded_stopped(
        service: WorkspaceService, fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    ws_id = await _running(service, make_repo())
    spec = service.spec_for(service.get(ws_id))
    await service.freeze(ws_id, actor="test")
    c = fake_runtime.containers[container_of(spec)]
    c.running = c.frozen = False
    await service.apply_engine_event(EngineEvent(EngineEventKind.DIE, workspace_id=ws_id,
                                                 container=container_of(spec), exit_code=137))
    assert _sleep(service, ws_id) == ("stopped", None)


@pytest.mark.anyio
async def test_a_disk_snapshot_of_a_frozen_workspace_keeps_it_frozen(
        service: WorkspaceService, fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    from server.snapshots.service import SnapshotService

    ws_id = await _running(service, make_repo())
    await service.freeze(ws_id, actor="test")
    snaps = SnapshotService(service)
    snap = await snaps.create(ws_id, name="s1", memory=False, actor="alice")
    assert _sleep(service, ws_id) == ("paused", "frozen")
    mem = await snaps.create(ws_id, name="s2", memory=True, actor="alice")
    assert (snap.memory, mem.memory) == (False, True)
    assert _sleep(service, ws_id) == ("paused", "saved")  # memory comes from a save


def test_the_client_and_cli_show_the_sleep_tier() -> None:
    from server.client.api import Workspace as ClientWorkspace
    from server.client.commands import _state

    frozen = ClientWorkspace(None, {"id": "w", "state": "paused", "sleep": "frozen"})  # type: ignore[arg-type]
    running = ClientWorkspace(None, {"id": "w", "state": "running", "sleep": None})  # type: ignore[arg-type]
    assert (frozen.sleep, running.sleep) == ("frozen", None)
    assert (_state(frozen), _state(running)) == ("paused (frozen)", "running")


def test_the_api_shows_the_sleep_tier(fake_api: Any, fake_runtime: FakeRuntime,
                                      make_repo: Callable[..., Path]) -> None:
    api = fake_api
    wid = api.create(make_repo())["id"]
    assert api.get(f"/api/v1/workspaces/{wid}").json()["sleep"] is None
    svc = api.app.state.workspaces
    api.client.portal.call(lambda: svc.freeze(wid, actor="test"))
    assert api.get(f"/api/v1/workspaces/{wid}").json()["sleep"] == "frozen"
    assert api.post(f"/api/v1/workspaces/{wid}/pause").json()["sleep"] == "saved"
    assert api.post(f"/api/v1/workspaces/{wid}/resume").json()["sleep"] is None


def test_the_cgroup_freezer_file_of_a_process_v1_and_v2(tmp_path: Path) -> None:
    from server.runtime.cgroup_freezer import control_file, is_frozen, set_frozen

    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "7").mkdir(parents=True)
    (proc / "7" / "cgroup").write_text("12:cpu,cpuacct:/docker/abc\n6:freezer:/docker/abc\n")
    state = root / "freezer" / "docker" / "abc" / "freezer.state"
    assert control_file(7, proc=proc, root=root) == state
    assert not set_frozen(7, True, proc=proc, root=root)  # no such cgroup: nothing done
    state.parent.mkdir(parents=True)
    state.write_text("THAWED\n")
    assert not is_frozen(7, proc=proc, root=root)
    assert set_frozen(7, True, proc=proc, root=root)
    assert state.read_text() == "FROZEN" and is_frozen(7, proc=proc, root=root)
    state.write_text("FREEZING\n")  # partly frozen: it needs a thaw too
    assert is_frozen(7, proc=proc, root=root)
    assert set_frozen(7, False, proc=proc, root=root)
    assert state.read_text() == "THAWED" and not is_frozen(7, proc=proc, root=root)
    (proc / "8").mkdir()
    (proc / "8" / "cgroup").write_text("0::/system.slice/docker-abc.scope\n")
    assert control_file(8, proc=proc, root=root) == (
        root / "system.slice" / "docker-abc.scope" / "cgroup.freeze")
    v2 = root / "system.slice" / "docker-abc.scope" / "cgroup.freeze"
    v2.parent.mkdir(parents=True)
    v2.write_text("0\n")
    assert not is_frozen(8, proc=proc, root=root)
    assert set_frozen(8, True, proc=proc, root=root) and is_frozen(8, proc=proc, root=root)
    assert control_file(9, proc=proc, root=root) is None
    assert not is_frozen(9, proc=proc, root=root)
