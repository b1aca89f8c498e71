"""The exec route hands exec the workspace row it has just read (one read, not two)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from server.auth.tokens import ensure_user
from server.runtime.base import ExecRequest
from server.workspaces.service import CreateRequest, WorkspaceService


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_an_exec_that_waited_for_a_slot_reads_the_workspace_again(
        make_service: Callable[..., WorkspaceService], make_repo: Callable[..., Path]) -> None:
    """The exec route hands the row it has just read to exec (one read, not two); a row read
    before a wait in the gate is stale: the workspace paused meanwhile is resumed, not
    refused."""
    svc = make_service(exec_concurrency=1)
    with svc.sessions.begin() as s:
        owner = ensure_user(s, "alice")
    ws = await svc.create(owner, CreateRequest(name="api", repo_url=str(make_repo())))
    await asyncio.wait({svc._tasks[ws.id]}, timeout=60)
    running = svc.get(ws.id)
    assert running.state == "running"
    slot_taken, release = asyncio.Event(), asyncio.Event()

    async def hold_the_slot() -> None:
        async with svc.long_calls.enter():
            slot_taken.set()
            await release.wait()

    holder = asyncio.create_task(hold_the_slot())
    await slot_taken.wait()
    waiting = asyncio.create_task(
        svc.exec(ws.id, ExecRequest(argv=["true"]), actor="alice", current=running))
    while svc.long_calls.waiting == 0:
        await asyncio.sleep(0)
    await svc.pause(ws.id, actor="alice")
    release.set()
    await holder
    result = await asyncio.wait_for(waiting, 30)
    assert result.exit_code == 0
    assert svc.get(ws.id).state == "running"
