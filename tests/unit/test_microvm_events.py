"""The microVM backend's engine events: a watched process that ends is a ``die`` at once,
with the backend's words for why; one that ended before its pidfd opened is one too."""

from __future__ import annotations

import asyncio
import subprocess

from server.runtime.base import EngineEvent, EngineEventKind, EngineObject
from server.runtime.microvm.events import DIED, QemuExits


def test_a_watched_process_that_ends_is_a_die_event() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    obj = EngineObject(kind="vm", name="den-vm-w1", workspace_id="w1", running=True)
    exits = QemuExits(lambda instance: [(obj, proc.pid)] if instance == "den" else [],
                      lambda o, pid: proc.poll() is None)

    async def scenario() -> EngineEvent:
        events = exits.watch("den")
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)  # the watch lists what runs before anything happens
        exits.launched()  # a rescan finds the same pid: watched once
        await asyncio.sleep(0.1)
        assert not first.done()
        proc.kill()
        proc.wait()
        event = await asyncio.wait_for(first, 10)
        await events.aclose()
        return event

    event = asyncio.run(scenario())
    assert event == EngineEvent(EngineEventKind.DIE, workspace_id="w1", container="den-vm-w1",
                                detail=DIED)


def test_a_pid_that_no_longer_serves_the_vm_is_a_die_event() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    obj = EngineObject(kind="vm", name="den-vm-w2", workspace_id="w2", running=True)
    exits = QemuExits(lambda instance: [(obj, proc.pid)], lambda o, pid: False)

    async def scenario() -> EngineEvent:
        events = exits.watch("den")
        try:
            return await asyncio.wait_for(anext(events), 10)
        finally:
            await events.aclose()

    try:
        assert asyncio.run(scenario()).workspace_id == "w2"
    finally:
        proc.kill()
        proc.wait()
