"""Engine events of the microVM backend: a QEMU process that ends is a ``die`` at once.

QEMU runs daemonized (it is not Den's child, and outlives a restart of Den), so its end is
learnt from a pidfd (``pidfd_open``; readable once the process has exited) that the event
loop watches, not from the next failing call. The exit status of a process that is not
one's child cannot be read: the event says what is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Callable

from server.runtime.base import EngineEvent, EngineEventKind, EngineObject

WATCH_QUEUE = 1024  # events a slow follower may fall behind by (then: resync)
DIED = ("the VM's QEMU process ended without Den stopping it (it crashed or was killed, "
        "or the guest powered off)")
RESCAN = object()


class QemuExits:
    """Watches the QEMU processes of one Den instance; the backend says when it launched
    one (:meth:`launched`) so that it is watched too."""

    def __init__(self, list_running: Callable[[str], list[tuple[EngineObject, int]]],
                 serves: Callable[[EngineObject, int], bool]) -> None:
        self._list_running = list_running  # blocking: (VM, QEMU pid) of the instance
        self._serves = serves  # blocking: that pid is still the VM's QEMU
        self._queues: set[asyncio.Queue[object]] = set()

    def launched(self, note: EngineEvent | None = None) -> None:
        """A QEMU was started: watch it too, and pass ``note`` on (the accelerator it runs
        with, for the workspace's event log)."""
        for queue in self._queues:
            for item in (RESCAN, note) if note is not None else (RESCAN,):
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(item)

    async def watch(self, instance: str) -> AsyncGenerator[EngineEvent, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=WATCH_QUEUE)
        watched: dict[int, tuple[int, EngineObject]] = {}  # pid -> (pidfd, VM)
        overflow = False

        def exited(pid: int) -> None:
            fd, obj = watched.pop(pid)
            loop.remove_reader(fd)
            os.close(fd)
            died(obj)

        def died(obj: EngineObject) -> None:
            nonlocal overflow
            try:
                queue.put_nowait(EngineEvent(EngineEventKind.DIE, workspace_id=obj.workspace_id,
                                             container=obj.name, detail=DIED))
            except asyncio.QueueFull:
                overflow = True

        async def scan() -> None:
            for obj, pid in await asyncio.to_thread(self._list_running, instance):
                if pid in watched:
                    continue
                try:
                    fd = os.pidfd_open(pid)
                except OSError:  # gone already: the next scan does not list it
                    continue
                if not await asyncio.to_thread(self._serves, obj, pid):
                    os.close(fd)  # it ended (and the pid was reused) before the pidfd opened
                    died(obj)
                    continue
                watched[pid] = (fd, obj)
                loop.add_reader(fd, exited, pid)

        self._queues.add(queue)
        try:
            await scan()
            while True:
                item = await queue.get()
                if overflow:
                    overflow = False
                    yield EngineEvent(EngineEventKind.RESYNC)
                if item is RESCAN:
                    await scan()
                elif isinstance(item, EngineEvent):
                    yield item
        finally:
            self._queues.discard(queue)
            for fd, _ in watched.values():
                loop.remove_reader(fd)
                os.close(fd)
