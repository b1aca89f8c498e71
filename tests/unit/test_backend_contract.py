"""The runtime contract: the service asks what a backend can do. A backend with only what
every backend must have (Lifecycle, Execs, Inventory) runs workspaces; pause, snapshots and
forks are refused with a clear 409 before anything changes, and idling stops a workspace."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from server.db.models import Workspace
from server.errors import Conflict
from server.runtime.base import (
    Checkpoints,
    ContainerStatus,
    DiskSnapshots,
    EngineObject,
    ExecRequest,
    ExecResult,
    ExecStream,
    Handle,
    ResourceUsage,
    Runtime,
    WorkspaceSpec,
    features,
)
from server.runtime.fake import FakeRuntime
from server.snapshots.service import SnapshotService
from server.workspaces.reaper import Action, Reaper
from server.workspaces.service import WorkspaceService
from server.workspaces.states import State
from tests.unit.test_service_fake import create, user

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Minimal:
    """The smallest backend: lifecycle, exec and inventory, delegated to the fake runtime."""

    name = "minimal"

    def __init__(self, inner: FakeRuntime) -> None:
        self.inner = inner

    def new_handle(self, workspace_id: str) -> dict[str, Any]:
        return self.inner.new_handle(workspace_id)

    def stale(self, obj: EngineObject, handle: Handle) -> bool:
        return self.inner.stale(obj, handle)

    async def check(self) -> None:
        await self.inner.check()

    async def image_exists(self, image: str) -> bool:
        return await self.inner.image_exists(image)

    async def create(self, spec: WorkspaceSpec) -> None:
        await self.inner.create(spec)

    async def seed(self, spec: WorkspaceSpec, tar: Path) -> None:
        await self.inner.seed(spec, tar)

    async def start(self, spec: WorkspaceSpec) -> None:
        await self.inner.start(spec)

    async def stop(self, spec: WorkspaceSpec, *, timeout_s: int) -> None:
        await self.inner.stop(spec, timeout_s=timeout_s)

    async def destroy(self, spec: WorkspaceSpec) -> None:
        await self.inner.destroy(spec)

    async def status(self, spec: WorkspaceSpec) -> ContainerStatus:
        return await self.inner.status(spec)

    async def usage(self, spec: WorkspaceSpec) -> ResourceUsage | None:
        return await self.inner.usage(spec)

    async def exec(self, spec: WorkspaceSpec, req: ExecRequest) -> ExecResult:
        return await self.inner.exec(spec, req)

    async def exec_stream(self, spec: WorkspaceSpec, req: ExecRequest) -> ExecStream:
        return await self.inner.exec_stream(spec, req)

    async def list_objects(self, instance: str) -> list[EngineObject]:
        return await self.inner.list_objects(instance)

    async def remove_object(self, obj: EngineObject) -> None:
        await self.inner.remove_object(obj)


def test_the_contract_is_what_the_backends_implement(fake_runtime: FakeRuntime) -> None:
    minimal: Runtime = Minimal(fake_runtime)
    assert features(minimal) == []
    assert not isinstance(minimal, Checkpoints) and not isinstance(minimal, DiskSnapshots)
    assert {"checkpoints", "disk_snapshots", "freezer"} <= set(features(fake_runtime))


@pytest.fixture
def svc(make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime
        ) -> WorkspaceService:
    return make_service(service_kw={"runtime": Minimal(fake_runtime)})


async def test_a_backend_without_checkpoints_or_snapshots_refuses_them_clearly(
        svc: WorkspaceService, make_repo: Callable[..., Path]) -> None:
    alice = user(svc)
    ws = await create(svc, alice, make_repo())
    assert ws.state == State.RUNNING
    assert (await svc.exec(ws.id, svc.exec_request(ws, ["true"]), actor="alice")).exit_code == 0
    before = len(svc.events(ws.id))
    with pytest.raises(Conflict) as paused:
        await svc.pause(ws.id, actor="alice")
    assert paused.value.code == "pause_unsupported"
    assert "stop it instead" in paused.value.message
    snaps = SnapshotService(svc)
    for memory in (False, True):
        with pytest.raises(Conflict) as snapped:
            await snaps.create(ws.id, name="s", memory=memory, actor="alice")
        assert snapped.value.code == "snapshots_unsupported"
    assert svc.get(ws.id).state == State.RUNNING.value  # nothing changed, nothing recorded
    assert len(svc.events(ws.id)) == before
    stopped = await svc.stop(ws.id, actor="alice")  # no checkpoint to drop: still fine
    assert stopped.state == State.STOPPED.value
    assert (await svc.start(ws.id, actor="alice")).state == State.RUNNING.value


async def test_idling_stops_a_workspace_when_the_backend_cannot_pause(
        svc: WorkspaceService, make_repo: Callable[..., Path]) -> None:
    ws = await create(svc, user(svc), make_repo(), idle_timeout_s=60)
    then = datetime.now(UTC) - timedelta(hours=1)
    with svc.sessions.begin() as s:
        s.execute(update(Workspace).where(Workspace.id == ws.id)
                  .values(last_activity_at=then, updated_at=then))
    reaper = Reaper(svc, svc.settings)
    assert await reaper.run_once() == [(ws.id, Action.STOP)]
    assert svc.get(ws.id).state == State.STOPPED.value


