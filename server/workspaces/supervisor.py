"""Whether the engine works, and reconcile whenever it comes (back).

Den used to check the engine once at startup: started while dockerd was unreachable, it logged
the failure and answered ``/healthz`` with ``ok`` for good, never reconciling; when dockerd went
away while Den ran, nothing noticed until a call failed. The supervisor owns that fact instead:

* at startup it checks the engine and reconciles (awaited, as before: the server answers
  once the database and the engine agree);
* then a background task checks the engine every ``engine_check_interval_s`` while it works,
  and retries with exponential backoff (1 s doubling up to ``engine_retry_max_s``) while it
  does not; each time the engine answers again after failing, reconcile runs again;
* a call that found the engine unreachable reports it (:meth:`report_unavailable`): the
  health turns at once, and the retries start.

* where the backend has an event stream (:class:`~server.runtime.base.EngineEvents`), it
  follows it and hands each event to the workspace service
  (:meth:`~server.workspaces.service.WorkspaceService.apply_engine_event`), so that a
  container that dies (killed, out of memory, dockerd restarted) is known within seconds, not
  at the next failing exec; when the stream says events were missed (``RESYNC``: it broke and
  reconnected), reconcile runs again.

``/healthz`` reads :meth:`health`. The supervisor changes no workspace state itself; the
workspace service (reconcile, and its handling of the engine's events) does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.errors import DenError
from server.runtime.base import EngineEvent, EngineEventKind, EngineEvents, Runtime

log = logging.getLogger(__name__)

FIRST_RETRY_S = 1.0


@dataclass(frozen=True)
class EngineHealth:
    """What the supervisor knows of the engine. ``ok`` only when the last check passed and
    reconcile has run since the engine (re)appeared."""

    ok: bool
    reconciled: bool
    error: str  # why not ok; "" when ok
    checked_at: float | None  # wall-clock seconds of the last check, None before one


class EngineSupervisor:
    """Checks the engine, backs off while it is down, reconciles when it is back."""

    def __init__(self, *, runtime: Runtime, reconcile: Callable[[], Awaitable[None]],
                 interval_s: float, retry_max_s: float, check_timeout_s: float = 30.0,
                 on_event: Callable[[EngineEvent], Awaitable[None]] | None = None,
                 instance: str = "") -> None:
        self._runtime = runtime
        self._reconcile = reconcile
        self._on_event = on_event
        self._instance = instance
        self._follower: asyncio.Task[None] | None = None
        self._interval_s = interval_s
        self._first_retry_s = min(FIRST_RETRY_S, retry_max_s)
        self._retry_max_s = retry_max_s
        self._check_timeout_s = check_timeout_s
        self._ok = False
        self._reconciled = False
        self._error = "not checked yet"
        self._checked_at: float | None = None
        self._retry_s = self._first_retry_s  # the wait after the next failure (doubles)
        self._delay_s = self._first_retry_s  # the wait before the next check while not ok
        self._check: asyncio.Task[None] | None = None  # one engine check at a time
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reconciles = 0  # how many reconcile passes completed (tests, logs)

    def health(self) -> EngineHealth:
        return EngineHealth(ok=self._ok and self._reconciled, reconciled=self._reconciled,
                            error="" if self._ok and self._reconciled else self._error,
                            checked_at=self._checked_at)

    async def start(self) -> None:
        """Check and reconcile once (awaited), then keep watching in the background."""
        if self._on_event is not None and isinstance(self._runtime, EngineEvents):
            # Before the first reconcile: what happens during it is not missed.
            self._follower = asyncio.create_task(self._follow(self._runtime, self._on_event),
                                                 name="engine-events")
        await self.check_once()
        self._task = asyncio.create_task(self._loop(), name="engine-supervisor")

    def request_reconcile(self) -> None:
        """Run reconcile again soon (events were missed)."""
        if self._reconciled:
            log.info("engine: events may have been missed; reconciling again")
        self._reconciled = False
        self._wake.set()

    async def _follow(self, source: EngineEvents,
                      on_event: Callable[[EngineEvent], Awaitable[None]]) -> None:
        while True:
            try:
                async with contextlib.aclosing(source.watch(self._instance)) as events:
                    async for event in events:
                        if event.kind is EngineEventKind.RESYNC:
                            self.request_reconcile()
                            continue
                        try:
                            await on_event(event)
                        except DenError as exc:
                            log.info("engine event %s of workspace %s not applied: %s",
                                     event.kind, event.workspace_id, exc.message)
            except asyncio.CancelledError:
                raise
            except Exception:  # following must outlive any one bad event
                log.exception("engine events: following failed; starting again")
            await asyncio.sleep(self._first_retry_s)

    async def stop(self) -> None:
        for task in (self._follower, self._task, self._check):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def report_unavailable(self, message: str) -> None:
        """A call found the engine unreachable: not ok until a check passes and reconcile has
        run again."""
        if self._ok:  # while it is down the retries' backoff holds
            log.error("engine: unavailable (%s); retrying, and reconciling once it is back",
                      message)
            self._wake.set()
        self._ok = False
        self._reconciled = False
        self._error = message

    async def _loop(self) -> None:
        while True:
            healthy = self._ok and self._reconciled
            delay = (self._interval_s or None) if healthy else self._delay_s  # None: no checks
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._wake.clear()
            try:
                await self.check_once()
            except Exception:  # the loop must outlive any one bad pass
                log.exception("engine: check failed")

    async def check_once(self) -> bool:
        """Check the engine (and reconcile when it is needed); True when all is well."""
        if self._check is None or self._check.done():
            self._check = asyncio.create_task(self._runtime.check(), name="engine-check")
        try:
            await asyncio.wait_for(asyncio.shield(self._check), timeout=self._check_timeout_s)
        except (DenError, TimeoutError) as exc:
            message = exc.message if isinstance(exc, DenError) else (
                f"the engine did not answer within {self._check_timeout_s:g} s")
            self._failed(message, answering=False)
            return False
        finally:
            self._checked_at = time.time()
        if not self._ok:
            log.info("engine: available")
        self._ok = True
        if not self._reconciled:
            try:
                await self._reconcile()
            except DenError as exc:
                self._failed(f"reconcile failed: {exc.message}", answering=True)
                log.error("engine: reconcile failed: %s (%s)", exc.message, exc.detail)
                return False
            self._reconciled = True
            self.reconciles += 1
            log.info("engine: reconciled with the database")
        self._retry_s = self._first_retry_s
        return True

    def _failed(self, message: str, *, answering: bool) -> None:
        self._delay_s = self._retry_s
        self._retry_s = min(self._retry_s * 2, self._retry_max_s)
        if message != self._error or (self._ok and self._reconciled):
            log.error("engine: %s; retrying in %g s", message, self._delay_s)
        self._ok = answering  # a failed reconcile leaves the engine answering
        self._reconciled = False
        self._error = message
