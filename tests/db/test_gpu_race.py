"""No GPU is ever held twice: many workspaces start at once, each in its own thread and
database connection, on SQLite and on a real PostgreSQL, with fewer GPUs than starts."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from server.auth.tokens import ensure_user
from server.config import Settings
from server.db.migrate import ensure_schema
from server.db.models import Event, GpuAllocation, Workspace
from server.db.session import make_engine, make_session_factory
from server.errors import Conflict
from server.gpus.allocation import GpuPool
from server.gpus.inventory import Gpu
from server.runtime.fake import FakeRuntime
from server.workspaces.service import WorkspaceService
from server.workspaces.states import State

pytestmark = pytest.mark.postgres

GPUS = [Gpu(index=i, uuid=f"GPU-{i}", model="NVIDIA A100", memory_mb=40960, minor=i)
        for i in range(3)]
STARTS = 12


@pytest.mark.parametrize("gpus_each", [1, 2])
def test_concurrent_starts_never_share_a_gpu(db_url: str, tmp_path: Path,
                                             gpus_each: int) -> None:
    engine = make_engine(db_url)
    ensure_schema(engine, db_url, auto_migrate=True)
    sessions = make_session_factory(engine)
    svc = WorkspaceService(settings=Settings(data_dir=tmp_path / "data"), sessions=sessions,
                           runtime=FakeRuntime(), instance_id="race", gpus=GpuPool(GPUS))
    with sessions.begin() as s:
        owner = ensure_user(s, "alice")
        for i in range(STARTS):  # stopped, never started: no GPU pinned yet
            s.add(Workspace(id=f"ws{i:02d}", owner_id=owner.id, name=f"w{i}", repo_url="x",
                            repo_dir="x", image="i", runtime="gvisor", cpus=1, memory_mb=512,
                            disk_gb=1, gpus=gpus_each, pids_limit=64,
                            state=State.STOPPED.value, engine={}))
    barrier = threading.Barrier(STARTS)
    results: dict[str, str] = {}

    def start(ws_id: str) -> None:
        barrier.wait()
        try:
            svc.ledger.transition(ws_id, State.STOPPED, State.STARTING, actor="race")
            results[ws_id] = "took"
        except Conflict as exc:
            results[ws_id] = exc.code

    threads = [threading.Thread(target=start, args=(f"ws{i:02d}",)) for i in range(STARTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    winners = len(GPUS) // gpus_each
    assert sorted(results.values()) == (["gpus_unavailable"] * (STARTS - winners)
                                        + ["took"] * winners), results
    with sessions() as s:
        rows = list(s.scalars(select(GpuAllocation)))
        states = {w.id: w.state for w in s.scalars(select(Workspace))}
        moved = set(s.scalars(select(Event.workspace_id).where(Event.to_state == "starting")))
    took = {w for w, r in results.items() if r == "took"}
    # Every GPU held once, by a workspace that did move, with all its GPUs; the losers kept
    # their state and wrote no event (the allocation and the state change are one write).
    assert len(rows) == winners * gpus_each == len({r.gpu_uuid for r in rows})
    assert {r.workspace_id for r in rows} == took == moved
    assert {w for w, st in states.items() if st == "starting"} == took
    for w in took:
        pinned = svc.get(w).engine["gpus"]
        assert sorted(pinned) == sorted(r.gpu_uuid for r in rows if r.workspace_id == w)
    engine.dispose()
