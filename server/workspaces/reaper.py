"""The idle reaper: puts workspaces nobody uses to sleep and stops ones paused for too long.

Sleep has two tiers (server/workspaces/sleep.py): an idle workspace is frozen in place first,
and its memory saved to disk after ``frozen_max_s``, or sooner when the frozen ones hold more
than their budget or the host runs short of memory.

What counts as use (activity): API calls on the workspace (they touch ``last_activity_at``),
exec calls and streams still running (:class:`Activity` holds), a keepalive lease, and CPU
use above ``idle_cpu_percent`` measured by the engine between two passes, and GPU use above
``gpu_idle_percent`` (NVML). A GPU workspace idles into ``stop``, not ``pause``, unless
GPU checkpointing is enabled (docs/gpus.md). The decision is a
pure function (:func:`decide`) over plain views of the rows; the loop around it only reads,
measures and calls the workspace service, which alone changes state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

from sqlalchemy import and_, or_, select

from server.config import Settings
from server.db.models import Workspace
from server.errors import DenError
from server.logs import bind_workspace
from server.runtime.base import Freezer, Housekeeping
from server.workspaces.activity import Activity
from server.workspaces.handles import FROZEN_BYTES
from server.workspaces.service import WorkspaceService
from server.workspaces.sleep import Frozen, SleepPolicy, host_available_bytes, to_save
from server.workspaces.states import Sleep, State

log = logging.getLogger(__name__)


class Action(StrEnum):
    FREEZE = "freeze"  # running -> paused, frozen in place
    PAUSE = "pause"  # running -> paused, saved to disk (no frozen tier)
    SAVE = "save"  # paused frozen -> paused saved
    STOP = "stop"


@dataclass(frozen=True)
class IdleView:
    """What the reaper needs to know of one workspace."""

    id: str
    state: State
    keep_alive: bool
    idle_timeout_s: int
    stop_after_s: int
    last_activity_at: datetime
    state_since: datetime
    keepalive_until: datetime | None
    busy: bool
    idle_stop: bool = False  # idling stops it instead of pausing it (a GPU workspace)
    # A GPU workspace is never frozen: its GPU goes back to the pool while it sleeps, and a
    # frozen process would still hold the device and its memory.
    freezable: bool = True
    sleep: Sleep | None = None  # a paused one's tier
    memory_bytes: int | None = None  # what a frozen one holds, where measured


NO_FROZEN_TIER = SleepPolicy(frozen_max_s=0, budget_bytes=0, host_floor_bytes=0)


def decide(views: list[IdleView], now: datetime, policy: SleepPolicy = NO_FROZEN_TIER, *,
           host_available_bytes: int | None = None) -> list[tuple[str, Action]]:
    """Which workspaces to put to sleep (frozen, or saved at once without a frozen tier),
    which frozen ones to save to disk and which to stop, now. A timeout of 0 means never."""
    actions: list[tuple[str, Action]] = []
    frozen: list[Frozen] = []
    for v in views:
        if v.keep_alive or v.busy:
            continue
        if v.state is State.RUNNING:
            if v.keepalive_until is not None and v.keepalive_until > now:
                continue
            if v.idle_timeout_s > 0 and now - v.last_activity_at >= timedelta(
                seconds=v.idle_timeout_s
            ):
                if v.idle_stop:
                    actions.append((v.id, Action.STOP))
                else:
                    actions.append((v.id, Action.FREEZE if policy.freezes and v.freezable
                                    else Action.PAUSE))
        elif v.state is State.PAUSED and v.stop_after_s > 0 and now - v.state_since >= timedelta(
            seconds=v.stop_after_s
        ):
            actions.append((v.id, Action.STOP))
        elif v.state is State.PAUSED and v.sleep is Sleep.FROZEN:
            frozen.append(Frozen(v.id, v.state_since, v.memory_bytes))
    saves = to_save(frozen, now, policy, host_available_bytes=host_available_bytes)
    return actions + [(ws_id, Action.SAVE) for ws_id in saves]


class Reaper:
    """Runs :func:`decide` every ``reaper_interval_s`` and carries out its actions."""

    def __init__(self, service: WorkspaceService, settings: Settings) -> None:
        self.service = service
        self.activity: Activity = service.activity
        self.settings = settings
        self._cpu: dict[str, tuple[int, float]] = {}  # workspace -> (cpu ns, monotonic time)
        self._task: asyncio.Task[None] | None = None
        self._limit = asyncio.Semaphore(max(1, settings.reaper_concurrency))
        freezes = isinstance(service.runtime, Freezer)
        self.policy = SleepPolicy(
            frozen_max_s=settings.frozen_max_s if freezes else 0,
            budget_bytes=settings.frozen_memory_budget_mb * 2**20,
            host_floor_bytes=settings.host_min_available_mb * 2**20)
        self.meminfo = Path("/proc/meminfo")  # tests point it at a file of their own

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="idle-reaper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reaper_interval_s)
            try:
                await self.run_once()
            except Exception:  # the loop must outlive any one bad pass
                log.exception("idle reaper pass failed")

    async def _cpu_busy(self, ws: Workspace) -> bool:
        """Whether the workspace used more than ``idle_cpu_percent`` since the last pass.
        Raises what the engine raised (the caller skips the workspace this pass)."""
        usage = await self.service.runtime.usage(self.service.spec_for(ws))
        now = time.monotonic()
        before = self._cpu.get(ws.id)
        if usage is None:
            return False
        used_ns = usage.cpu_ns
        self.service.metrics.workspace_usage(ws.id, usage)
        self._cpu[ws.id] = (used_ns, now)
        if before is None or now <= before[1]:
            return False
        percent = (used_ns - before[0]) / ((now - before[1]) * 1e9) * 100
        return percent > self.settings.idle_cpu_percent

    async def _gpu_busy(self, ws: Workspace) -> bool:
        """Whether one of the workspace's GPUs is busier than ``gpu_idle_percent`` (a
        training run with an idle terminal is not idle)."""
        uuids = [g.uuid for g in self.service.gpus.devices_for(ws)]
        used = await asyncio.to_thread(self.service.gpus.utilization, uuids)
        self.service.metrics.gpu_utilization(used)
        return any(p > self.settings.gpu_idle_percent for p in used.values())

    def _saved_views(self) -> list[IdleView]:
        """The paused workspaces whose memory is on disk: all a pass may do with one is stop
        it after ``stop_after_s``, so a few columns each are read, not whole rows (a host
        holds thousands of them: 2,000 whole rows took ~90 ms a pass, bench_paused)."""
        with self.service.sessions() as s:
            saved = list(s.execute(
                select(Workspace.id, Workspace.keep_alive, Workspace.stop_after_s,
                       Workspace.updated_at, Workspace.last_activity_at)
                .where(Workspace.state == State.PAUSED.value,
                       or_(Workspace.sleep.is_(None), Workspace.sleep != Sleep.FROZEN.value))))
        views = []
        for ws_id, keep_alive, stop_after_s, updated_at, last_activity_at in saved:
            busy = self.activity.busy(ws_id)
            if busy:  # as for any row: activity this process holds is written
                self.service.touch(ws_id, force=True)
            views.append(IdleView(
                id=ws_id, state=State.PAUSED, keep_alive=keep_alive,
                idle_timeout_s=self.settings.idle_timeout_s,
                stop_after_s=self.settings.stop_after_s if stop_after_s is None
                else stop_after_s,
                last_activity_at=last_activity_at, state_since=updated_at,
                keepalive_until=None, busy=busy, sleep=Sleep.SAVED))
        return views

    async def views(self) -> list[IdleView]:
        with self.service.sessions() as s:
            rows = list(s.scalars(select(Workspace).where(or_(
                Workspace.state == State.RUNNING.value,
                and_(Workspace.state == State.PAUSED.value,
                     Workspace.sleep == Sleep.FROZEN.value)))))
        views = self._saved_views()
        st = self.settings
        for ws in rows:
            busy = self.activity.busy(ws.id)
            if ws.state == State.RUNNING.value and ws.gpus > 0 and not ws.keep_alive \
                    and not busy:
                busy = await self._gpu_busy(ws)
            if ws.state == State.RUNNING.value and not ws.keep_alive and not busy:
                # One workspace that cannot be measured (deleted under the pass, its
                # container gone, the engine refusing) is left alone this pass; the others
                # are not held back by it.
                try:
                    busy = await self._cpu_busy(ws)
                except DenError as exc:
                    log.info("reaper: workspace %s skipped this pass: %s", ws.id, exc.message)
                    continue
                except Exception:
                    log.exception("reaper: workspace %s skipped this pass", ws.id)
                    continue
            if busy:  # it has just read the row: write, whatever this process touched lately
                self.service.touch(ws.id, force=True)
            views.append(IdleView(
                id=ws.id, state=State(ws.state), keep_alive=ws.keep_alive,
                idle_timeout_s=st.idle_timeout_s if ws.idle_timeout_s is None
                else ws.idle_timeout_s,
                stop_after_s=st.stop_after_s if ws.stop_after_s is None else ws.stop_after_s,
                last_activity_at=ws.last_activity_at, state_since=ws.updated_at,
                keepalive_until=ws.keepalive_until, busy=busy,
                idle_stop=self.service.gpus.idle_action(ws) == "stop"
                or not self.service.can_checkpoint,
                freezable=not ws.gpus,
                sleep=Sleep(ws.sleep) if ws.sleep else None,
                memory_bytes=_int_or_none((ws.engine or {}).get(FROZEN_BYTES)),
            ))
        return views

    async def run_once(self) -> list[tuple[str, Action]]:
        """One pass: measure, decide, act. Returns what it did (for tests and logs)."""
        runtime = self.service.runtime
        if isinstance(runtime, Housekeeping):  # what the engine leaves behind on the host
            swept = await runtime.sweep()
            self.service.metrics.reaper_action("sweep", result="ok", count=swept)
        available = await asyncio.to_thread(host_available_bytes, self.meminfo)
        actions = decide(await self.views(), datetime.now(UTC), self.policy,
                         host_available_bytes=available)
        await asyncio.gather(*(self._act(ws_id, action) for ws_id, action in actions))
        return actions

    async def _act(self, ws_id: str, action: Action) -> None:
        bind_workspace(ws_id)
        metrics = self.service.metrics
        async with self._limit:
            try:
                if action is Action.FREEZE:
                    await self.service.freeze(ws_id, actor="reaper")
                elif action in (Action.PAUSE, Action.SAVE):
                    await self.service.pause(ws_id, actor="reaper")
                else:
                    await self.service.stop(ws_id, actor="reaper")
                self._cpu.pop(ws_id, None)
                metrics.reaper_action(action.value, result="ok")
            except DenError as exc:  # in transition meanwhile, or the engine refused
                log.info("reaper: %s of workspace %s skipped: %s", action, ws_id, exc.message)
                metrics.reaper_action(action.value, result="skipped")


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
