"""Live engine status: the engine's events (container die, oom, start) move the workspace's
state through the ledger, with the true reason, and everything Den itself does, or that the
engine's current status contradicts, is ignored. On the fake runtime; the parser of Docker's
events by equality."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.runtime.base import EngineEvent, EngineEventKind
from server.runtime.docker import engine_event
from server.runtime.docker_specs import container_of
from server.runtime.fake import FakeRuntime
from server.workspaces.engine_events import describe_exit
from server.workspaces.service import WorkspaceService
from tests.conftest import ApiClient, running_workspace

DIE, OOM, START = EngineEventKind.DIE, EngineEventKind.OOM, EngineEventKind.START


def docker_event(action: str, **attributes: str) -> dict[str, Any]:
    return {"Type": "container", "Action": action, "status": action,
            "Actor": {"ID": "c0ffee", "Attributes": {"name": "den-ws1", **attributes}},
            "time": 1, "timeNano": 1_000_000_001}


@pytest.mark.parametrize(("raw", "expected"), [
    (docker_event("die", exitCode="137", **{"den.workspace": "ws1"}),
     EngineEvent(DIE, "ws1", "den-ws1", exit_code=137)),
    (docker_event("oom", **{"den.workspace": "ws1"}), EngineEvent(OOM, "ws1", "den-ws1")),
    (docker_event("start", **{"den.workspace": "ws1"}), EngineEvent(START, "ws1", "den-ws1")),
    (docker_event("die", exitCode="junk", **{"den.workspace": "ws1"}),
     EngineEvent(DIE, "ws1", "den-ws1", exit_code=None)),
    (docker_event("die", exitCode="0"), None),  # not a workspace's (no den.workspace)
    (docker_event("exec_start", **{"den.workspace": "ws1"}), None),
    (docker_event("resync", **{"den.workspace": "ws1"}), None),
    ({**docker_event("die", **{"den.workspace": "ws1"}), "Type": "volume"}, None),
    ({"Type": "container", "Action": "die", "Actor": "junk"}, None),
    ("not an event", None),
])
def test_docker_events_parse(raw: Any, expected: EngineEvent | None) -> None:
    assert engine_event(raw) == expected


@pytest.mark.parametrize(("code", "oom", "text"), [
    (137, True, "code 137, out of memory"),
    (137, False, "code 137, killed by SIGKILL"),
    (143, False, "code 143, killed by SIGTERM"),
    (1, False, "code 1"),
    (None, False, "exit code unknown"),
])
def test_describe_exit(code: int | None, oom: bool, text: str) -> None:
    assert describe_exit(code, oom=oom) == text


# --- the ledger's side (the service) ---------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def svc(make_service: Callable[..., WorkspaceService]) -> WorkspaceService:
    return make_service(service_kw={"instance_id": "inst"})


def _last(svc: WorkspaceService, ws_id: str) -> tuple[str, str, str]:
    ev = svc.events(ws_id)[-1]
    return ev.actor, ev.to_state or "", ev.message


@pytest.mark.anyio
async def test_a_container_killed_from_outside_is_stopped_with_the_reason(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]
        ) -> None:
    ws_id = await running_workspace(svc, make_repo())
    spec = svc.spec_for(svc.get(ws_id))
    fake_runtime.containers[container_of(spec)].running = False
    await svc.apply_engine_event(EngineEvent(OOM, ws_id, container_of(spec)))
    await svc.apply_engine_event(EngineEvent(DIE, ws_id, container_of(spec), exit_code=137))
    assert svc.get(ws_id).state == "stopped"
    assert _last(svc, ws_id) == (
        "engine", "stopped", "the container exited (code 137, out of memory); it starts "
                             "again on the next access")
    # The next access starts it again.
    await svc.ensure_running(ws_id, actor="alice")
    assert svc.get(ws_id).state == "running"


@pytest.mark.anyio
async def test_an_oom_kill_the_sandbox_survives_is_in_the_event_log_once_a_minute(
        svc: WorkspaceService, make_repo: Callable[..., Path]) -> None:
    """Under gVisor the host's OOM killer usually ends one process (a systrap stub) and the
    sandbox lives on: the engine sends "oom" and no "die" (observed with runsc 20240729)."""
    ws_id = await running_workspace(svc, make_repo())
    spec = svc.spec_for(svc.get(ws_id))
    for _ in range(3):  # an OOM storm: one note
        await svc.apply_engine_event(EngineEvent(OOM, ws_id, container_of(spec)))
    ooms = [e for e in svc.events(ws_id) if e.kind == "oom"]
    assert [(e.actor, e.message) for e in ooms] == [(
        "engine", "the workspace reached its memory limit (512 MB plus the sandbox's "
                  "headroom): the host's out-of-memory killer ended a process")]
    assert svc.get(ws_id).state == "running"
    svc.engine_events._oom[ws_id] -= 61  # a minute later: noted again
    await svc.apply_engine_event(EngineEvent(OOM, ws_id, container_of(spec)))
    assert len([e for e in svc.events(ws_id) if e.kind == "oom"]) == 2
    # An unknown workspace (deleted meanwhile) is no error.
    await svc.apply_engine_event(EngineEvent(OOM, "ws-gone", "den-gone"))


@pytest.mark.anyio
async def test_an_exec_that_finds_the_sandbox_dead_after_the_event_stream_restarts_it(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]
        ) -> None:
    """The exec's own check finds the container dead after the event stream already recorded
    it `stopped` (a failed checkpoint kills the sandbox): the exec starts it again and runs,
    as when the exec notices first (it answered 409 exec_failed)."""
    ws_id = await running_workspace(svc, make_repo())
    spec = svc.spec_for(svc.get(ws_id))
    fake_runtime.containers[container_of(spec)].running = False
    await svc.apply_engine_event(EngineEvent(DIE, ws_id, container_of(spec), exit_code=128))
    assert svc.get(ws_id).state == "stopped"
    assert await svc._check_alive(ws_id, spec, actor="alice") is True


@pytest.mark.anyio
async def test_a_death_during_an_operation_of_dens_is_applied_when_it_ends(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]
        ) -> None:
    """A container that dies while Den's own work on the workspace still runs (a create's
    build cleaning up after its transition to running, a snapshot) is not lost: the event
    is applied once that work ends (it was dropped, and the workspace said running until the
    next reconcile: the server test below failed so under load)."""
    ws_id = await running_workspace(svc, make_repo())
    spec = svc.spec_for(svc.get(ws_id))
    async with svc.locked(ws_id):
        fake_runtime.containers[container_of(spec)].running = False
        await svc.apply_engine_event(EngineEvent(DIE, ws_id, container_of(spec), exit_code=9))
        await svc.apply_engine_event(EngineEvent(DIE, ws_id, container_of(spec), exit_code=137))
        assert svc.get(ws_id).state == "running" and svc.engine_events.waiting() == 1
    await svc.engine_events.settled()
    assert svc.get(ws_id).state == "stopped"
    assert _last(svc, ws_id) == (
        "engine", "stopped",
        "the container exited (code 137, killed by SIGKILL); it starts again on the next access")


@pytest.mark.anyio
async def test_events_den_itself_caused_or_that_the_engine_contradicts_are_ignored(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]
        ) -> None:
    ws_id = await running_workspace(svc, make_repo())
    spec = svc.spec_for(svc.get(ws_id))
    events_before = len(svc.events(ws_id))
    die = EngineEvent(DIE, ws_id, container_of(spec), exit_code=0)

    # A late or repeated "die" while the container runs (it was started again since).
    await svc.apply_engine_event(die)
    # Another container's (an older one of the workspace, a helper with its labels).
    fake_runtime.containers[container_of(spec)].running = False
    await svc.apply_engine_event(EngineEvent(DIE, ws_id, "den-copy-helper", exit_code=0))
    # Den's own operation in progress (it holds the lock): the event waits for its end and
    # is then checked against what it left (here the container runs again).
    async with svc.locked(ws_id):
        await svc.apply_engine_event(die)
        assert svc.engine_events.waiting() == 1
        fake_runtime.containers[container_of(spec)].running = True
    await svc.engine_events.settled()
    assert svc.get(ws_id).state == "running" and svc.engine_events.waiting() == 0
    assert len(svc.events(ws_id)) == events_before

    # Den's pause makes the container exit; its "die" comes after the pause is done.
    await svc.pause(ws_id, actor="alice")
    await svc.apply_engine_event(die)
    assert svc.get(ws_id).state == "paused"
    # A workspace that is gone, and an unknown one.
    await svc.apply_engine_event(EngineEvent(DIE, "wsnosuch00000", "den-x", exit_code=1))


@pytest.mark.anyio
async def test_a_container_started_outside_den_isrunning_workspace(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]
        ) -> None:
    ws_id = await running_workspace(svc, make_repo())
    await svc.stop(ws_id, actor="alice")
    spec = svc.spec_for(svc.get(ws_id))
    start = EngineEvent(START, ws_id, container_of(spec))
    await svc.apply_engine_event(start)  # a late event of an earlier start: still stopped
    assert svc.get(ws_id).state == "stopped"
    fake_runtime.containers[container_of(spec)].running = True  # `docker start`
    await svc.apply_engine_event(start)
    assert svc.get(ws_id).state == "running"
    assert _last(svc, ws_id) == ("engine", "running", "the container was started outside Den")


# --- through the server: the supervisor follows the stream -----------------------------------


def test_the_server_follows_the_engines_events(fake_api: ApiClient, fake_runtime: FakeRuntime,
                                               make_repo: Callable[..., Path]) -> None:
    ws = fake_api.create(make_repo("api"), name="api")
    assert ws["state"] == "running"
    spec = fake_api.app.state.workspaces.spec_for(fake_api.app.state.workspaces.get(ws["id"]))
    assert fake_runtime.watchers, "the server does not follow the engine's events"
    # The stream reaches the server's loop from the test's thread through the portal.
    fake_api.client.portal.call(_kill, fake_runtime, spec)  # type: ignore[union-attr]
    deadline = time.monotonic() + 30
    while fake_api.get(f"/api/v1/workspaces/{ws['id']}").json()["state"] != "stopped":
        assert time.monotonic() < deadline, "the workspace still says running"
        time.sleep(0.02)
    events = fake_api.get(f"/api/v1/workspaces/{ws['id']}/events").json()["events"]
    assert events[-1]["actor"] == "engine"
    assert "code 137, out of memory" in events[-1]["message"]


async def _kill(fake_runtime: FakeRuntime, spec: Any) -> None:
    fake_runtime.kill(spec, exit_code=137, oom=True)


def test_missed_events_make_the_server_reconcile_again(
        fake_api: ApiClient, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    """The stream broke and came back (dockerd restarted): what happened meanwhile is
    learnt from reconcile."""
    ws = fake_api.create(make_repo("api"), name="api")
    supervisor = fake_api.app.state.engine
    assert supervisor.reconciles == 1
    spec = fake_api.app.state.workspaces.spec_for(fake_api.app.state.workspaces.get(ws["id"]))
    fake_runtime.containers[container_of(spec)].running = False  # died, event missed
    fake_api.client.portal.call(_resync, fake_runtime)  # type: ignore[union-attr]
    deadline = time.monotonic() + 30
    while supervisor.reconciles < 2:
        assert time.monotonic() < deadline, "no reconcile after RESYNC"
        time.sleep(0.02)
    got = fake_api.get(f"/api/v1/workspaces/{ws['id']}").json()
    assert got["state"] == "stopped"


async def _resync(fake_runtime: FakeRuntime) -> None:
    fake_runtime.emit(EngineEvent(EngineEventKind.RESYNC))
