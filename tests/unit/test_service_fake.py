"""The workspace service on the fake runtime: create, lifecycle, delete, quotas, reconcile."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from server.auth.tokens import ensure_user
from server.config import Settings
from server.db.migrate import ensure_schema
from server.db.models import Event, User, Workspace
from server.db.session import make_engine, make_session_factory
from server.errors import Conflict, LimitReached, ValidationFailed
from server.runtime.base import WorkspaceSpec, labels_for
from server.runtime.docker_specs import container_of, volume_of
from server.runtime.errors import EngineConflict, EngineError
from server.runtime.fake import FakeRuntime
from server.workspaces.service import CreateRequest, WorkspaceService, login_shell_argv
from server.workspaces.states import State

pytestmark = pytest.mark.anyio
INSTANCE = "inst-test"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def svc(make_service: Callable[..., WorkspaceService]) -> WorkspaceService:
    return make_service()


def user(svc: WorkspaceService, name: str = "alice") -> User:
    with svc.sessions.begin() as s:
        return ensure_user(s, name)


async def settle(svc: WorkspaceService, ws_id: str) -> Workspace:
    """Wait for the background build of ``ws_id`` to end; the row as it then is."""
    task = svc._tasks.get(ws_id)
    if task is not None:
        await asyncio.wait({task}, timeout=120)
    return svc.get(ws_id)


async def create(svc: WorkspaceService, owner: User, repo: Path | str, *,
                 name: str = "api", wait: bool = True, **kw: Any) -> Workspace:
    ws = await svc.create(owner, CreateRequest(name=name, repo_url=str(repo), **kw))
    assert ws.state == State.CREATING
    return await settle(svc, ws.id) if wait else ws


def transitions(svc: WorkspaceService, ws_id: str) -> list[tuple[str | None, str | None]]:
    return [(e.from_state, e.to_state) for e in svc.events(ws_id) if e.kind == "state"]


def count(sessions: sessionmaker[Session], model: Any, ws_id: str) -> int:
    col = model.id if model is Workspace else model.workspace_id
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model).where(col == ws_id)) or 0)


def set_state(svc: WorkspaceService, ws_id: str, state: State) -> None:
    with svc.sessions.begin() as s:
        s.execute(update(Workspace).where(Workspace.id == ws_id).values(state=state.value))


# --- create -------------------------------------------------------------------------------


async def test_create_reaches_running(svc: WorkspaceService, fake_runtime: FakeRuntime,
                                      make_repo: Callable[..., Path]) -> None:
    alice = user(svc)
    ws = await create(svc, alice, make_repo("api"))
    assert (ws.state, ws.state_reason) == ("running", "")
    assert ws.repo_branch == "main"
    assert ws.repo_dir == "api"
    assert ws.runtime == "gvisor"
    spec = svc.spec_for(ws)
    assert set(fake_runtime.containers) == {container_of(spec)}
    container = fake_runtime.containers[container_of(spec)]
    assert container.running and container.seeded
    assert fake_runtime.volumes == {volume_of(spec): dict(spec.labels)}
    assert spec.labels == labels_for(instance=INSTANCE, workspace_id=ws.id, owner=str(alice.id))
    assert transitions(svc, ws.id) == [(None, "creating"), ("creating", "running")]
    assert [e.kind for e in svc.events(ws.id)] == ["state", "clone", "state"]
    await asyncio.gather(*svc._removals)  # removed beside the build, not in it
    assert list(svc._tmp.glob("*")) == []  # the temporary clone is gone


async def test_create_uses_defaults_and_derives_the_name(
        svc: WorkspaceService, make_repo: Callable[..., Path]) -> None:
    ws = await svc.create(user(svc), CreateRequest(name=None, repo_url=str(make_repo("My_Lib"))))
    assert ws.name == "my-lib"
    assert (ws.cpus, ws.memory_mb, ws.disk_gb, ws.gpus) == (1.0, 512, 10, 0)
    assert ws.image == "den/workspace:latest"
    assert (await settle(svc, ws.id)).state == "running"


@pytest.mark.parametrize("method", ["create", "start"])
async def test_engine_failure_while_creating_leaves_nothing(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path],
        method: str) -> None:
    fake_runtime.fail_next[method] = EngineError("boom")
    ws = await create(svc, user(svc), make_repo())
    assert ws.state == "error"
    assert "boom" in ws.state_reason
    assert fake_runtime.containers == {}
    assert fake_runtime.volumes == {}
    assert transitions(svc, ws.id)[-1] == ("creating", "error")


async def test_unexpected_failure_while_creating_says_internal_error(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    fake_runtime.fail_next["start"] = RuntimeError("secret detail")
    ws = await create(svc, user(svc), make_repo())
    assert ws.state == "error"
    assert ws.state_reason == "internal error while creating"
    assert fake_runtime.containers == {} and fake_runtime.volumes == {}


async def test_a_repository_git_cannot_clone_errors_with_a_reason(
        svc: WorkspaceService, fake_runtime: FakeRuntime, repos_root: Path) -> None:
    (repos_root / "notarepo").mkdir()
    ws = await create(svc, user(svc), repos_root / "notarepo")
    assert ws.state == "error"
    # Den's words, not git's (which can carry a remote's text: issue 11, finding 7)
    assert "fatal:" not in ws.state_reason and "does not exist" in ws.state_reason
    assert "notarepo" in ws.state_reason
    assert fake_runtime.containers == {} and fake_runtime.volumes == {}
    assert "create" not in fake_runtime.calls


async def test_a_missing_branch_errors_with_gits_reason(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo(), branch="nope")
    assert ws.state == "error"
    assert "nope" in ws.state_reason and "not found" in ws.state_reason
    assert fake_runtime.containers == {} and fake_runtime.volumes == {}


async def test_a_nonexistent_repository_is_refused_before_any_row(
        svc: WorkspaceService, fake_runtime: FakeRuntime, repos_root: Path) -> None:
    with pytest.raises(ValidationFailed, match="does not exist"):
        await svc.create(user(svc), CreateRequest(name="x", repo_url=str(repos_root / "no.git")))
    assert svc.list_for(user(svc)) == []
    assert fake_runtime.containers == {} and fake_runtime.volumes == {}


BAD_REQUESTS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"name": "Bad_Name"}, ValidationFailed, "invalid workspace name"),
    ({"cpus": 1000}, ValidationFailed, "cpus"),
    ({"cpus": 0}, ValidationFailed, "cpus"),
    ({"cpus": float("nan")}, ValidationFailed, "cpus"),
    ({"memory_mb": 1}, ValidationFailed, "memory_mb"),
    ({"disk_gb": 100_000}, ValidationFailed, "disk_gb"),
    ({"gpus": 1}, ValidationFailed, "no GPUs"),
    ({"gpu_model": "A100"}, ValidationFailed, "gpu_model"),
    ({"gpus": -1}, ValidationFailed, "gpus"),
    ({"runtime": "runc"}, ValidationFailed, "runc"),
    ({"runtime": "kata"}, ValidationFailed, "unknown runtime"),
    ({"runtime": "microvm"}, ValidationFailed, "microvm"),
    ({"image": "evil/miner"}, ValidationFailed, "not allowed"),
    ({"image": "den/missing"}, ValidationFailed, "not built"),
    ({"env": {"1BAD": "x"}}, ValidationFailed, "env name"),
    ({"env": {"A": "x\x00y"}}, ValidationFailed, "NUL"),
    ({"idle_timeout_s": -1}, ValidationFailed, "idle_timeout_s"),
]


async def test_create_refuses_bad_requests_before_any_row(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    repo = str(make_repo())
    for kw, error, match in BAD_REQUESTS:
        args: dict[str, Any] = {"name": "api", "repo_url": repo, **kw}
        try:
            await svc.create(user(svc), CreateRequest(**args))
        except error as exc:
            assert match in str(exc), (kw, exc)
        else:
            pytest.fail(f"create with {kw} was accepted")
    assert svc.list_for(user(svc)) == []
    assert fake_runtime.containers == {}
    assert "create" not in fake_runtime.calls


async def test_runc_when_the_operator_allows_it(make_service: Callable[..., WorkspaceService],
                                                make_repo: Callable[..., Path]) -> None:
    svc = make_service(allow_insecure_runc=True)
    ws = await create(svc, user(svc), make_repo(), runtime="runc")
    assert (ws.state, ws.runtime) == ("running", "runc")


async def test_name_taken_is_409_and_per_owner(svc: WorkspaceService,
                                               make_repo: Callable[..., Path]) -> None:
    repo = make_repo()
    await create(svc, user(svc, "alice"), repo)
    with pytest.raises(Conflict) as info:
        await svc.create(user(svc, "alice"), CreateRequest(name="api", repo_url=str(repo)))
    assert (info.value.status_code, info.value.code) == (409, "name_taken")
    ws = await create(svc, user(svc, "bob"), repo)  # another owner may use the same name
    assert ws.state == "running"


async def test_workspace_limit_is_409(make_service: Callable[..., WorkspaceService],
                            make_repo: Callable[..., Path]) -> None:
    svc = make_service(max_workspaces_per_user=2)
    repo = make_repo()
    alice = user(svc)
    await create(svc, alice, repo, name="one")
    await create(svc, alice, repo, name="two")
    with pytest.raises(LimitReached) as info:
        await svc.create(alice, CreateRequest(name="three", repo_url=str(repo)))
    assert info.value.status_code == 409
    assert info.value.fields == {"limit": "workspaces", "value": 2}
    assert len(svc.list_for(alice)) == 2
    assert (await create(svc, user(svc, "bob"), repo, name="one")).state == "running"


# --- lifecycle ----------------------------------------------------------------------------


async def test_stop_and_start_are_idempotent(svc: WorkspaceService, fake_runtime: FakeRuntime,
                                             make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo())
    container = fake_runtime.containers[container_of(svc.spec_for(ws))]

    stopped = await svc.stop(ws.id, actor="alice")
    assert stopped.state == "stopped" and not container.running
    events = len(svc.events(ws.id))
    again = await svc.stop(ws.id, actor="alice")
    assert again.state == "stopped"
    assert again.updated_at == stopped.updated_at
    assert len(svc.events(ws.id)) == events

    started = await svc.start(ws.id, actor="alice")
    assert started.state == "running" and container.running
    events = len(svc.events(ws.id))
    again = await svc.start(ws.id, actor="alice")
    assert again.state == "running"
    assert len(svc.events(ws.id)) == events

    assert transitions(svc, ws.id) == [
        (None, "creating"), ("creating", "running"),
        ("running", "stopping"), ("stopping", "stopped"),
        ("stopped", "starting"), ("starting", "running"),
    ]
    assert {e.actor for e in svc.events(ws.id)[3:]} == {"alice"}


async def test_start_of_a_workspace_whose_container_is_gone_is_an_error(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo())
    await svc.stop(ws.id, actor="alice")
    fake_runtime.containers.clear()
    with pytest.raises(Exception, match="gone"):
        await svc.start(ws.id, actor="alice")
    after = svc.get(ws.id)
    assert after.state == "error"
    assert "gone" in after.state_reason


async def test_stop_failure_is_an_error_with_reason(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo())
    fake_runtime.fail_next["stop"] = EngineError("engine said no")
    with pytest.raises(EngineError):
        await svc.stop(ws.id, actor="alice")
    after = svc.get(ws.id)
    assert after.state == "error"
    assert "engine said no" in after.state_reason


@pytest.mark.parametrize("state", [State.STOPPING, State.STARTING, State.CREATING])
async def test_operations_during_a_transition_are_409(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path],
        state: State) -> None:
    ws = await create(svc, user(svc), make_repo())
    set_state(svc, ws.id, state)
    events = len(svc.events(ws.id))
    for op in (svc.start, svc.stop):
        with pytest.raises(Conflict) as info:
            await op(ws.id, actor="alice")
        assert info.value.status_code == 409
        assert state.value in info.value.message
    with pytest.raises(Conflict):
        await svc.ensure_running(ws.id, actor="alice")
    assert svc.get(ws.id).state == state.value
    assert len(svc.events(ws.id)) == events


async def test_exec_wakes_a_stopped_workspace(svc: WorkspaceService,
                                              make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo())
    await svc.stop(ws.id, actor="alice")
    result = await svc.exec(ws.id, svc.exec_request(ws, "pwd"), actor="alice")
    assert (result.exit_code, result.stdout) == (0, b"/workspace/api\n")
    assert svc.get(ws.id).state == "running"
    assert "wake" in [e.kind for e in svc.events(ws.id)]


# --- delete -------------------------------------------------------------------------------


async def test_delete_removes_rows_events_and_engine_objects(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    alice = user(svc)
    keep = await create(svc, alice, make_repo("keep"), name="keep")
    ws = await create(svc, alice, make_repo())
    assert count(svc.sessions, Event, ws.id) > 0
    assert await svc.delete(ws.id, actor="alice") is True
    assert count(svc.sessions, Workspace, ws.id) == 0
    assert count(svc.sessions, Event, ws.id) == 0
    assert set(fake_runtime.containers) == {container_of(svc.spec_for(keep))}
    assert set(fake_runtime.volumes) == {volume_of(svc.spec_for(keep))}
    assert [w.id for w in svc.list_for(alice)] == [keep.id]


async def test_delete_of_a_stopped_and_of_an_errored_workspace(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    alice = user(svc)
    stopped = await create(svc, alice, make_repo("a"), name="a")
    await svc.stop(stopped.id, actor="alice")
    fake_runtime.fail_next["start"] = EngineError("boom")
    broken = await create(svc, alice, make_repo("b"), name="b")
    assert broken.state == "error"
    assert await svc.delete(stopped.id, actor="alice")
    assert await svc.delete(broken.id, actor="alice")
    assert svc.list_for(alice) == []
    assert fake_runtime.containers == {} and fake_runtime.volumes == {}


async def test_delete_failure_keeps_the_row_in_error(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo())
    fake_runtime.fail_next["destroy"] = EngineError("busy")
    with pytest.raises(EngineError):
        await svc.delete(ws.id, actor="alice")
    after = svc.get(ws.id)
    assert after.state == "error" and "busy" in after.state_reason
    assert await svc.delete(ws.id, actor="alice")  # retry works
    assert count(svc.sessions, Workspace, ws.id) == 0


class BlockingRuntime(FakeRuntime):
    """A fake whose ``create`` makes the objects, then waits until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def create(self, spec: WorkspaceSpec) -> None:
        await super().create(spec)
        self.entered.set()
        await self.release.wait()


async def test_delete_while_creating_cancels_the_build_and_cleans_up(
        make_settings: Callable[..., Settings], make_repo: Callable[..., Path]) -> None:
    settings = make_settings()
    settings.data_dir.mkdir(parents=True)
    url = settings.resolved_database_url()
    engine = make_engine(url)
    ensure_schema(engine, url, auto_migrate=True)
    runtime = BlockingRuntime()
    svc = WorkspaceService(settings=settings, sessions=make_session_factory(engine),
                           runtime=runtime, instance_id=INSTANCE)
    try:
        ws = await create(svc, user(svc), make_repo(), wait=False)
        await asyncio.wait_for(runtime.entered.wait(), timeout=60)
        assert svc.get(ws.id).state == "creating"
        assert runtime.containers  # half-made engine objects exist
        assert await svc.delete(ws.id, actor="alice") is True
        assert count(svc.sessions, Workspace, ws.id) == 0
        assert count(svc.sessions, Event, ws.id) == 0
        assert runtime.containers == {} and runtime.volumes == {}
        assert svc._tasks == {}
        await asyncio.gather(*svc._removals)
        assert list(svc._tmp.glob("*")) == []
    finally:
        runtime.release.set()
        await svc.shutdown()
        engine.dispose()


# --- reconcile ----------------------------------------------------------------------------


async def test_reconcile_settles_interrupted_transitions_and_removes_orphans(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    alice = user(svc)
    repo = make_repo()
    names = ["creating", "starting-up", "starting-down", "stopping", "deleting",
             "lost", "found-stopped", "found-running", "fine"]
    ws = {n: await create(svc, alice, repo, name=n) for n in names}
    for n in ("found-running",):
        await svc.stop(ws[n].id, actor="alice")

    def container(n: str) -> Any:
        return fake_runtime.containers[container_of(svc.spec_for(ws[n]))]

    set_state(svc, ws["creating"].id, State.CREATING)
    set_state(svc, ws["starting-up"].id, State.STARTING)
    set_state(svc, ws["starting-down"].id, State.STARTING)
    container("starting-down").running = False
    set_state(svc, ws["stopping"].id, State.STOPPING)
    set_state(svc, ws["deleting"].id, State.DELETING)
    del fake_runtime.containers[container_of(svc.spec_for(ws["lost"]))]
    container("found-stopped").running = False
    container("found-running").running = True

    # orphans: labelled with this instance but no row; and an object of another instance
    orphan = WorkspaceSpec(
        workspace_id="wsorphan00000",
        handle={"container": "den-wsorphan00000", "volume": "den-wsorphan00000-data"},
        image="den/workspace:latest", runtime="gvisor",
        cpus=1, memory_mb=512, pids_limit=64, hostname="orphan",
        labels=labels_for(instance=INSTANCE, workspace_id="wsorphan00000", owner="1"),
    )
    foreign = WorkspaceSpec(
        workspace_id="wsforeign0000",
        handle={"container": "other-wsforeign0000", "volume": "other-wsforeign0000-data"},
        image="den/workspace:latest", runtime="gvisor",
        cpus=1, memory_mb=512, pids_limit=64, hostname="foreign",
        labels=labels_for(instance="another-den", workspace_id="wsforeign0000", owner="1"),
    )
    await fake_runtime.create(orphan)
    await fake_runtime.create(foreign)

    await svc.reconcile()

    states = {w.name: w.state for w in svc.list_for(alice)}
    assert states == {
        "creating": "error",
        "starting-up": "running",
        "starting-down": "stopped",
        "stopping": "stopped",
        "lost": "error",
        "found-stopped": "stopped",
        "found-running": "running",
        "fine": "running",
    }
    assert count(svc.sessions, Workspace, ws["deleting"].id) == 0
    assert count(svc.sessions, Event, ws["deleting"].id) == 0
    # the interrupted create's objects are gone; its row stays to say why
    assert container_of(svc.spec_for(ws["creating"])) not in fake_runtime.containers
    assert "restarted" in svc.get(ws["creating"].id).state_reason
    assert not container("stopping").running
    assert all(w.state_reason == "" for w in svc.list_for(alice)
               if w.state in ("running", "stopped"))

    assert container_of(orphan) not in fake_runtime.containers
    assert volume_of(orphan) not in fake_runtime.volumes
    assert container_of(foreign) in fake_runtime.containers
    assert volume_of(foreign) in fake_runtime.volumes
    live = {container_of(svc.spec_for(ws[n])) for n in names
            if n not in ("creating", "deleting", "lost")}
    assert set(fake_runtime.containers) == live | {container_of(foreign)}

    # every state change reconcile made is in the event log
    for n in ("creating", "starting-up", "stopping", "lost"):
        assert svc.events(ws[n].id)[-1].actor == "reconcile"

    # a second pass changes nothing
    events = {n: len(svc.events(ws[n].id)) for n in states}
    await svc.reconcile()
    assert {w.name: w.state for w in svc.list_for(alice)} == states
    assert {n: len(svc.events(ws[n].id)) for n in states} == events


async def test_list_and_get_respect_ownership(svc: WorkspaceService,
                                              make_repo: Callable[..., Path]) -> None:
    from server.errors import NotFound

    alice, bob = user(svc, "alice"), user(svc, "bob")
    with svc.sessions.begin() as s:
        root = ensure_user(s, "root", admin=True)
    ws = await create(svc, alice, make_repo())
    assert [w.id for w in svc.list_for(alice)] == [ws.id]
    assert svc.list_for(bob) == []
    assert [w.id for w in svc.list_for(root)] == [ws.id]
    assert svc.get_for(alice, "api").id == ws.id
    assert svc.get_for(alice, ws.id).id == ws.id
    assert svc.get_for(root, ws.id).id == ws.id
    for ref in ("api", ws.id):
        with pytest.raises(NotFound):
            svc.get_for(bob, ref)


# --- pause and resume ----------------------------------------------------------------------


async def test_pause_and_resume(svc: WorkspaceService, fake_runtime: FakeRuntime,
                                make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo())
    container = fake_runtime.containers[container_of(svc.spec_for(ws))]
    paused = await svc.pause(ws.id, actor="alice")
    assert paused.state == "paused" and not container.running
    assert container.checkpoints == {"den-pause"}
    assert (await svc.pause(ws.id, actor="alice")).state == "paused"  # idempotent
    resumed = await svc.resume(ws.id, actor="alice")
    assert resumed.state == "running" and container.running and container.restored == 1
    assert container.checkpoints == {"den-pause"}  # kept: gVisor may still read from it
    await svc.stop(ws.id, actor="alice")
    assert container.checkpoints == set()  # a stop removes it
    await svc.start(ws.id, actor="alice")
    assert (await svc.resume(ws.id, actor="alice")).state == "running"  # idempotent
    assert transitions(svc, ws.id)[2:6] == [("running", "pausing"), ("pausing", "paused"),
                                            ("paused", "resuming"), ("resuming", "running")]
    messages = [e.message for e in svc.events(ws.id)]
    assert any("memory saved" in m for m in messages)
    assert any("restored from memory" in m for m in messages)


async def test_pause_of_a_stopped_workspace_changes_nothing(
        svc: WorkspaceService, make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo())
    await svc.stop(ws.id, actor="alice")
    events = len(svc.events(ws.id))
    assert (await svc.pause(ws.id, actor="alice")).state == "stopped"
    assert len(svc.events(ws.id)) == events
    with pytest.raises(Conflict):
        await svc.resume(ws.id, actor="alice")


async def test_a_failed_pause_leaves_the_workspace_running_and_says_why(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo())
    fake_runtime.fail_next["pause"] = EngineError("no space left on device")
    with pytest.raises(EngineError):
        await svc.pause(ws.id, actor="alice")
    after = svc.get(ws.id)
    assert after.state == "running"
    assert "pause failed: no space left on device" in svc.events(ws.id)[-1].message


async def test_a_failed_restore_starts_cold_from_disk(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo())
    await svc.pause(ws.id, actor="alice")
    container = fake_runtime.containers[container_of(svc.spec_for(ws))]
    container.checkpoints.clear()  # the checkpoint is gone
    resumed = await svc.resume(ws.id, actor="alice")
    assert resumed.state == "running" and container.running and container.restored == 0
    assert "started cold from disk" in svc.events(ws.id)[-1].message


async def test_stop_of_a_paused_workspace_drops_the_checkpoint(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo())
    await svc.pause(ws.id, actor="alice")
    assert (await svc.stop(ws.id, actor="alice")).state == "stopped"
    assert fake_runtime.containers[container_of(svc.spec_for(ws))].checkpoints == set()


async def test_start_of_a_paused_workspace_resumes_it(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo())
    await svc.pause(ws.id, actor="alice")
    assert (await svc.start(ws.id, actor="alice")).state == "running"
    assert fake_runtime.containers[container_of(svc.spec_for(ws))].restored == 1


async def test_concurrent_wakers_cause_exactly_one_resume(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo())
    await svc.pause(ws.id, actor="alice")
    req = svc.exec_request(ws, ["echo", "hi"])
    results = await asyncio.gather(*(svc.exec(ws.id, req, actor="alice") for _ in range(10)))
    assert [r.stdout for r in results] == [b"hi\n"] * 10
    assert fake_runtime.containers[container_of(svc.spec_for(ws))].restored == 1
    assert [t for t in transitions(svc, ws.id) if t == ("paused", "resuming")] == [
        ("paused", "resuming")]


@pytest.mark.parametrize(("left_in", "running", "checkpoint", "settles_to"), [
    (State.PAUSING, False, True, "paused"),  # the checkpoint completed: use it
    (State.PAUSING, False, False, "stopped"),  # none, and the container exited: the truth
    (State.PAUSING, True, False, "running"),
    (State.RESUMING, False, True, "paused"),
    (State.RESUMING, True, True, "running"),
    (State.PAUSED, True, True, "running"),
])
async def test_reconcile_settles_pause_and_resume(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path],
        left_in: State, running: bool, checkpoint: bool, settles_to: str) -> None:
    ws = await create(svc, user(svc), make_repo())
    container = fake_runtime.containers[container_of(svc.spec_for(ws))]
    container.running = running
    if checkpoint:
        container.checkpoints.add("den-pause")
    set_state(svc, ws.id, left_in)
    await svc.reconcile()
    assert svc.get(ws.id).state == settles_to
    if left_in is State.PAUSING:
        last = svc.events(ws.id)[-1].message
        assert "pause was interrupted by a restart" in last
        if settles_to == "stopped":
            assert "processes were lost" in last


async def test_reconcile_while_den_runs_leaves_operations_in_progress_alone(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]
        ) -> None:
    """Reconcile runs again when the engine comes back, while requests run: a workspace
    whose operation holds its lock, and that operation's engine objects, are not its to
    settle."""
    ws = await create(svc, user(svc), make_repo())
    set_state(svc, ws.id, State.STARTING)  # a start in progress
    snapshot_volume = WorkspaceSpec(  # a snapshot being taken: objects before its row
        workspace_id=ws.id, handle={"container": "unused", "volume": "den-snap-new"},
        image="den/workspace:latest", runtime="gvisor", cpus=1, memory_mb=512,
        pids_limit=64, hostname="x", labels={**labels_for(
            instance=INSTANCE, workspace_id=ws.id, owner="1"), "den.snapshot": "snnew"})
    fake_runtime.volumes[volume_of(snapshot_volume)] = dict(snapshot_volume.labels)
    async with svc.locked(ws.id):
        await svc.reconcile()
        assert svc.get(ws.id).state == "starting"
        assert volume_of(snapshot_volume) in fake_runtime.volumes
    await svc.reconcile()  # the operation is over (it left no row): settled now
    assert svc.get(ws.id).state == "running"
    assert volume_of(snapshot_volume) not in fake_runtime.volumes


# --- snapshots -----------------------------------------------------------------------------


async def test_snapshots_fork_retention_and_reconcile(
        make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    from server.snapshots.service import SnapshotService

    svc = make_service(max_snapshots_per_workspace=2)
    snaps = SnapshotService(svc)
    alice = user(svc)
    ws = await create(svc, alice, make_repo())
    fake_runtime.files[volume_of(svc.spec_for(ws))] = {"notes": b"v1"}
    first = await snaps.create(ws.id, name="one", memory=False, actor="alice")
    fake_runtime.files[volume_of(svc.spec_for(ws))] = {"notes": b"v2"}
    second = await snaps.create(ws.id, name="two", memory=False, actor="alice")
    third = await snaps.create(ws.id, name="three", memory=False, actor="alice")
    assert [s.name for s in snaps.list_for(ws)] == ["two", "three"]  # the oldest went
    assert first.engine["volume"] not in fake_runtime.volumes
    assert first.image not in fake_runtime.images

    fork = await snaps.fork(alice, second, name="fork")
    fork = await settle(svc, fork.id)
    assert fork.state == "running" and fork.image == second.image
    assert fake_runtime.files[volume_of(svc.spec_for(fork))] == {"notes": b"v2"}

    # Reconcile keeps the snapshots' volumes, and the cleanup at startup their saved memory;
    # both remove those whose row is gone (Den stopped while taking a snapshot).
    fake_runtime.volumes["den-orphan-snap"] = {"den.instance": INSTANCE,
                                               "den.snapshot": "sngone"}
    for sid in (second.id, "sngone"):
        svc.restores.memory_dir(sid).mkdir(parents=True)
        (svc.restores.memory_dir(sid) / "pages.img").write_bytes(b"memory")
    svc.remove_leftovers()
    await svc.reconcile()
    assert second.engine["volume"] in fake_runtime.volumes
    assert third.engine["volume"] in fake_runtime.volumes
    assert "den-orphan-snap" not in fake_runtime.volumes
    assert svc.restores.memory_dir(second.id).is_dir()
    assert not svc.restores.memory_dir("sngone").exists()


async def test_a_fork_is_held_to_the_runtime_policy_of_now(
        make_service: Callable[..., WorkspaceService], make_repo: Callable[..., Path]) -> None:
    """Issue 11, finding 8: a fork of a runc snapshot ran unsandboxed after runc was off."""
    from server.snapshots.service import SnapshotService

    svc = make_service(allow_insecure_runc=True)
    snaps = SnapshotService(svc)
    alice = user(svc)
    ws = await create(svc, alice, make_repo(), runtime="runc")
    snap = await snaps.create(ws.id, name="one", memory=False, actor="alice")
    svc.settings.allow_insecure_runc = False  # the operator turns runc off
    with pytest.raises(ValidationFailed, match="runc"):
        await snaps.fork(alice, snap, name="fork")
    assert [w.name for w in svc.list_for(alice)] == ["api"]


async def test_a_fork_gets_its_origins_disk_and_room_for_the_snapshot(
        make_service: Callable[..., WorkspaceService], make_repo: Callable[..., Path]) -> None:
    """disk_gb is enforced (server/runtime/disk_quota.py): a fork with the default disk
    could not hold a bigger origin's files, nor keep a smaller origin's limit."""
    from sqlalchemy import update

    from server.db.models import Snapshot
    from server.snapshots.service import SnapshotService

    svc = make_service(default_disk_gb=10, max_disk_gb=50)
    snaps = SnapshotService(svc)
    alice = user(svc)
    ws = await create(svc, alice, make_repo(), disk_gb=3)
    snap = await snaps.create(ws.id, name="one", memory=False, actor="alice")
    fork = await settle(svc, (await snaps.fork(alice, snap, name="f1")).id)
    assert (fork.disk_gb, svc.spec_for(fork).disk_gb) == (3, 3)

    await svc.delete(ws.id, actor="alice")  # origin gone: the default, or what it needs
    assert (await snaps.fork(alice, snaps.get(snap.id), name="f2")).disk_gb == 10
    with svc.sessions.begin() as s:
        s.execute(update(Snapshot).where(Snapshot.id == snap.id)
                  .values(size_bytes=20 * 1024**3 + 1))
    assert (await snaps.fork(alice, snaps.get(snap.id), name="f3")).disk_gb == 21


async def test_snapshot_of_a_workspace_in_transition_is_409(
        svc: WorkspaceService, make_repo: Callable[..., Path]) -> None:
    from server.snapshots.service import SnapshotService

    ws = await create(svc, user(svc), make_repo())
    set_state(svc, ws.id, State.STOPPING)
    with pytest.raises(Conflict):
        await SnapshotService(svc).create(ws.id, name="x", memory=False, actor="alice")


async def test_restore_brings_back_the_snapshots_files(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    from server.snapshots.service import SnapshotService

    snaps = SnapshotService(svc)
    ws = await create(svc, user(svc), make_repo())
    volume = volume_of(svc.spec_for(ws))
    fake_runtime.files[volume] = {"notes": b"v1"}
    snap = await snaps.create(ws.id, name="one", memory=False, actor="alice")
    fake_runtime.files[volume] = {"notes": b"v2"}
    restored = await snaps.restore(snap, actor="alice")
    copy = volume_of(svc.spec_for(restored))
    assert copy != volume and volume not in fake_runtime.volumes  # switched, old one gone
    assert restored.state == "running" and fake_runtime.files[copy] == {"notes": b"v1"}
    assert restored.engine.get("restoring") is None
    assert transitions(svc, ws.id)[-4:] == [("running", "stopping"), ("stopping", "stopped"),
                                            ("stopped", "starting"), ("starting", "running")]


async def test_exec_restarts_a_sandbox_that_died_and_retries_once(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo())
    fake_runtime.containers[container_of(svc.spec_for(ws))].running = False  # it died
    result = await svc.exec(ws.id, svc.exec_request(ws, ["echo", "back"]), actor="alice")
    assert result.stdout == b"back\n"
    assert svc.get(ws.id).state == "running"
    messages = [e.message for e in svc.events(ws.id)]
    assert any("exited unexpectedly" in m for m in messages)


async def test_a_shell_request_is_a_login_shell_as_dev_in_the_repo_without_deadline(
        svc: WorkspaceService, make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo())
    shell = svc.shell_request(ws, tty=True, size=(100, 30), env={"LANG": "C.UTF-8"})
    assert (shell.argv, shell.user, shell.cwd) == (
        login_shell_argv(None), "dev", svc.repo_path(ws))
    assert shell.argv[:2] == ["/bin/sh", "-c"] and "bash -l" in shell.argv[2]
    assert (shell.tty, shell.size, shell.timeout_s, shell.env) == (
        True, (100, 30), None, {"LANG": "C.UTF-8"})
    command = svc.shell_request(ws, "make test", tty=False)
    assert (command.argv, command.tty) == (login_shell_argv("make test"), False)
    assert command.argv[-2:] == ["-c", "make test"]
    with pytest.raises(ValidationFailed):
        svc.shell_request(ws, "echo \x00", tty=False)


# --- crash consistency: what reconcile makes of an operation a crash cut short ------------


async def _restore_setup(svc: WorkspaceService, fake_runtime: FakeRuntime,
                         make_repo: Callable[..., Path]) -> tuple[Workspace, Any]:
    from server.snapshots.service import SnapshotService

    ws = await create(svc, user(svc), make_repo())
    volume = volume_of(svc.spec_for(ws))
    fake_runtime.files[volume] = {"notes": b"v1"}
    snap = await SnapshotService(svc).create(ws.id, name="one", memory=False, actor="alice")
    fake_runtime.files[volume] = {"notes": b"v2"}
    await svc.stop(ws.id, actor="alice")
    return svc.get(ws.id), snap


async def test_a_failed_restore_copy_leaves_the_workspace_as_it_was(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    ws, snap = await _restore_setup(svc, fake_runtime, make_repo)
    volume = volume_of(svc.spec_for(ws))
    fake_runtime.fail_next["copy_snapshot"] = EngineError("disk full")
    with pytest.raises(EngineError):
        await svc.restores.restore(ws.id, snap, actor="alice")
    after = svc.get(ws.id)
    assert after.state == "stopped" and volume_of(svc.spec_for(after)) == volume
    assert fake_runtime.files[volume] == {"notes": b"v2"} and "restoring" not in after.engine
    assert [v for v in fake_runtime.volumes if v.startswith(volume)] == [volume]
    assert "the workspace is as it was" in svc.events(ws.id)[-1].message


def _restoring(snap_id: str, handle: dict[str, Any], new: str, old: str, *, legacy: bool
               ) -> dict[str, Any]:
    """The record of a restore in progress: as Den writes it, or as it wrote it before the
    backends named their own objects (two volume names)."""
    if legacy:
        return {"snapshot": snap_id, "volume": new, "old_volume": old, "from": "stopped",
                "reason": ""}
    return {"snapshot": snap_id, "handle": {**handle, "volume": new},
            "old": {**handle, "volume": old}, "from": "stopped", "reason": ""}


@pytest.mark.parametrize("legacy", [False, True])
async def test_reconcile_of_a_restore_cut_before_its_copy_completed_keeps_the_old_data(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path],
        legacy: bool) -> None:
    ws, snap = await _restore_setup(svc, fake_runtime, make_repo)
    volume = volume_of(svc.spec_for(ws))
    partial = volume + "-abc123"  # what the crash left: a partial copy, and the marker
    fake_runtime.volumes[partial] = dict(svc.spec_for(ws).labels)
    with svc.sessions.begin() as s:
        s.execute(update(Workspace).where(Workspace.id == ws.id).values(
            state="starting", engine={**ws.engine, "restoring": _restoring(
                snap.id, dict(svc.spec_for(ws).handle), partial, volume, legacy=legacy)}))
    await svc.reconcile()
    after = svc.get(ws.id)
    assert after.state == "stopped" and "restoring" not in after.engine
    assert partial not in fake_runtime.volumes and fake_runtime.files[volume] == {"notes": b"v2"}
    assert "exactly as it was" in svc.events(ws.id)[-1].message


@pytest.mark.parametrize("legacy", [False, True])
async def test_reconcile_of_a_restore_cut_after_its_copy_completed_finishes_it(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path],
        legacy: bool) -> None:
    ws, snap = await _restore_setup(svc, fake_runtime, make_repo)
    volume = volume_of(svc.spec_for(ws))
    copy = volume + "-abc123"
    fake_runtime.volumes[copy] = dict(svc.spec_for(ws).labels)
    fake_runtime.files[copy] = {"notes": b"v1"}
    with svc.sessions.begin() as s:  # the commit point passed: the row names the copy
        s.execute(update(Workspace).where(Workspace.id == ws.id).values(
            state="starting", engine={**ws.engine, "volume": copy, "restoring": _restoring(
                snap.id, dict(svc.spec_for(ws).handle), copy, volume, legacy=legacy)}))
    await svc.reconcile()
    after = svc.get(ws.id)
    assert after.state == "stopped" and "restoring" not in after.engine
    spec = svc.spec_for(after)
    assert volume_of(spec) == copy and volume not in fake_runtime.volumes
    assert volume_of(fake_runtime.containers[container_of(spec)].spec) == copy
    assert "it is finished now" in svc.events(ws.id)[-1].message
    result = await svc.exec(ws.id, svc.exec_request(after, ["true"]), actor="alice")
    assert result.exit_code == 0 and svc.get(ws.id).state == "running"


async def test_reconcile_of_a_fork_cut_mid_copy_removes_the_helper_first_and_ends_in_error(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    """The copy helper holds the fork's volume: it goes before the fork's objects, and the
    row never stays ``creating`` (issue 16: a second restart was needed)."""
    import dataclasses

    ws = await create(svc, user(svc), make_repo())
    spec = svc.spec_for(ws)
    helper = dataclasses.replace(spec, handle={**spec.handle, "container": "helper-1"}, labels={
        **spec.labels, "den.role": "copy"})
    fake_runtime.containers["helper-1"] = type(fake_runtime.containers[container_of(spec)])(
        helper, running=True)
    set_state(svc, ws.id, State.CREATING)
    await svc.reconcile()
    assert "helper-1" not in fake_runtime.containers
    assert fake_runtime.calls.index("remove_object") < fake_runtime.calls.index("destroy")
    after = svc.get(ws.id)
    assert after.state == "error" and "restarted while" in after.state_reason
    assert volume_of(spec) not in fake_runtime.volumes


async def test_a_creating_row_ends_in_error_even_when_its_objects_cannot_be_removed(
        svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo())
    set_state(svc, ws.id, State.CREATING)
    fake_runtime.fail_next["destroy"] = EngineConflict("volume is in use")
    await svc.reconcile()
    after = svc.get(ws.id)
    assert after.state == "error" and "could not all be removed" in after.state_reason
    await svc.delete(ws.id, actor="alice")  # a delete retries the removal
    assert volume_of(svc.spec_for(ws)) not in fake_runtime.volumes
