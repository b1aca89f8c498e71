"""server/workspaces/builds.py on the fake runtime: a delete that comes while a fork's copy
runs in a thread waits for the copy, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from server.auth.tokens import ensure_user
from server.errors import Conflict, NotFound
from server.runtime import inflight
from server.runtime.base import SnapshotSpec, WorkspaceSpec
from server.runtime.docker_specs import volume_of
from server.runtime.fake import FakeRuntime
from server.snapshots.service import SnapshotService
from server.workspaces import builds
from server.workspaces.service import WorkspaceService
from tests.conftest import running_workspace

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class SlowCopy(FakeRuntime):
    """A fork's copy that runs in a thread, as a backend's does, until ``gate`` opens; the
    thread makes the fork's volume when it ends (the Docker backend makes the volume and the
    container, then copies, all in one thread)."""

    slow: bool = False
    entered: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event = field(default_factory=threading.Event)
    copying: bool = False
    destroyed_mid_copy: bool = False

    async def load_snapshot(self, spec: WorkspaceSpec, snap: SnapshotSpec) -> None:
        if not self.slow:
            return await super().load_snapshot(spec, snap)

        def copy() -> None:
            self.copying = True
            self.entered.set()
            try:
                self.gate.wait(60)
                self.volumes[volume_of(spec)] = dict(spec.labels)
            finally:
                self.copying = False

        await inflight.run(None, copy)
        await super().load_snapshot(spec, snap)

    async def destroy(self, spec: WorkspaceSpec) -> None:
        if self.copying:
            self.destroyed_mid_copy = True
            self.gate.set()  # without the fix: let the copy end, to see what it leaves
        await super().destroy(spec)


async def forking(make_service: Callable[..., WorkspaceService], repo: Path
                  ) -> tuple[WorkspaceService, SlowCopy, str, str]:
    """A service, its runtime, a running origin and a fork of it whose copy is under way."""
    rt = SlowCopy()
    svc = make_service(service_kw={"runtime": rt})
    origin = await running_workspace(svc, repo)
    snaps = SnapshotService(svc)
    snap = await snaps.create(origin, name="s", memory=False, actor="alice")
    rt.slow = True
    with svc.sessions.begin() as s:
        alice = ensure_user(s, "alice")
    fork = await snaps.fork(alice, snap, name="fork")
    assert await asyncio.to_thread(rt.entered.wait, 30)
    return svc, rt, origin, fork.id


async def test_a_delete_during_a_forks_copy_waits_for_it_and_leaves_nothing(
        make_service: Callable[..., WorkspaceService], make_repo: Callable[..., Path]) -> None:
    svc, rt, origin, fork = await forking(make_service, make_repo())
    build = svc._tasks[fork]
    fork_volume = volume_of(svc.spec_for(svc.get(fork)))
    deleting = asyncio.create_task(svc.delete(fork, actor="alice"))
    await asyncio.wait({build}, timeout=30)  # cancelled at once; its copy runs on
    for _ in range(100):  # let the delete go as far as it goes while the copy runs
        await asyncio.sleep(0)
    assert not deleting.done() and svc.busy(fork)
    rt.gate.set()
    assert await asyncio.wait_for(deleting, 30) is True
    assert not rt.destroyed_mid_copy
    assert fork_volume not in rt.volumes  # made by the copy after the delete began: removed
    with pytest.raises(NotFound):
        svc.get(fork)
    assert svc.get(origin).state == "running"
    assert volume_of(svc.spec_for(svc.get(origin))) in rt.volumes


async def test_a_copy_that_outlasts_the_deadline_is_a_clear_409_and_a_later_delete_works(
        make_service: Callable[..., WorkspaceService], make_repo: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builds, "SETTLE_S", 0.2)
    svc, rt, _origin, fork = await forking(make_service, make_repo())
    with pytest.raises(Conflict) as refused:
        await svc.delete(fork, actor="alice")
    assert refused.value.code == "delete_pending" and "delete it again" in refused.value.message
    ws = svc.get(fork)
    assert ws.state == "error" and "delete it again" in (ws.state_reason or "")
    assert not rt.destroyed_mid_copy
    rt.gate.set()
    assert await svc.delete(fork, actor="alice") is True
    assert volume_of(svc.spec_for(ws)) not in rt.volumes
    with pytest.raises(NotFound):
        svc.get(fork)
