"""Wakes the readers of a workspace's event log when an event is recorded (the events
WebSocket waits on this, not on a timer). Events may be recorded on worker threads (a build's
output): those wake the readers through the loop the readers run on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class EventFeed:
    def __init__(self) -> None:
        self._readers: dict[str, set[asyncio.Event]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def changed(self, workspace_id: str) -> None:
        """An event of ``workspace_id`` was committed (from any thread)."""
        loop = self._loop
        if loop is None or workspace_id not in self._readers:
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            self._wake(workspace_id)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to wake
                loop.call_soon_threadsafe(self._wake, workspace_id)

    def _wake(self, workspace_id: str) -> None:
        for event in self._readers.get(workspace_id, ()):
            event.set()

    @contextlib.contextmanager
    def listen(self, workspace_id: str) -> Iterator[asyncio.Event]:
        """An asyncio.Event set whenever ``workspace_id`` gets an event (clear it, then read)."""
        self._loop = asyncio.get_running_loop()
        event = asyncio.Event()
        self._readers.setdefault(workspace_id, set()).add(event)
        try:
            yield event
        finally:
            readers = self._readers.get(workspace_id, set())
            readers.discard(event)
            if not readers:
                self._readers.pop(workspace_id, None)
