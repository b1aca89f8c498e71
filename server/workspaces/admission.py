"""Admission of long calls: shed instead of queueing forever.

An exec may run for an hour; files calls, state reads and lifecycle calls are short. Long
calls go through one :class:`Gate`: at most ``limit`` run at once, at most ``queue_max`` wait
(first come, first served), and one more is refused at once with 503 ``overloaded`` and a
Retry-After header. Short calls never pass the gate, so they never wait behind long ones
(and in the Docker backend they have a thread pool of their own).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from server.errors import Overloaded

RETRY_AFTER_S = 2


class Gate:
    """A semaphore with a bounded queue."""

    def __init__(self, *, limit: int, queue_max: int, what: str = "commands") -> None:
        if limit < 1 or queue_max < 0:
            raise ValueError("limit must be at least 1 and queue_max at least 0")
        self.limit = limit
        self.queue_max = queue_max
        self._what = what
        self._sem = asyncio.Semaphore(limit)
        self.running = 0
        self.waiting = 0
        self.shed = 0  # calls refused since start

    @contextlib.asynccontextmanager
    async def enter(self) -> AsyncIterator[None]:
        """Hold a slot while the block runs; wait for one when all are taken; Overloaded when
        ``queue_max`` calls are already waiting."""
        if self._sem.locked() and self.waiting >= self.queue_max:
            self.shed += 1
            raise Overloaded(
                f"the server is running {self.running} {self._what} and {self.waiting} more "
                "are waiting; try again shortly", retry_after_s=RETRY_AFTER_S)
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._sem.release()

    @property
    def full(self) -> bool:
        """Whether a call entering now has to wait for a slot."""
        return self._sem.locked()

    def counts(self) -> tuple[int, int, int]:
        """(running, waiting, shed so far)."""
        return self.running, self.waiting, self.shed
