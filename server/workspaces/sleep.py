"""The two sleep tiers of an idle workspace, as policy: which frozen workspaces go to disk.

An idle workspace is first **frozen** in place (the engine's freezer: its processes stop, its
CPU is free at once, its memory stays, a wake takes milliseconds) and only later **saved**
(its memory checkpointed to disk, as a ``pause`` always did: no memory held, a wake is a
restore of about half a second). Both are the state ``paused``; the row's ``sleep`` says
which. A frozen workspace is saved when it has been frozen ``frozen_max_s``, when the frozen
ones together hold more than the budget, or when the host runs short of memory: longest
frozen first. Pure functions here; the reaper measures and acts, the service changes state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class SleepPolicy:
    """The operator's settings for the frozen tier (docs/configuration.md)."""

    frozen_max_s: int  # 0: no frozen tier (idle workspaces are saved at once)
    budget_bytes: int  # 0: no budget
    host_floor_bytes: int  # 0: host memory not watched

    @property
    def freezes(self) -> bool:
        return self.frozen_max_s > 0


@dataclass(frozen=True)
class Frozen:
    """A frozen workspace: since when, and the memory it holds (None: not measured)."""

    id: str
    since: datetime
    memory_bytes: int | None


def to_save(frozen: list[Frozen], now: datetime, policy: SleepPolicy, *,
            host_available_bytes: int | None) -> list[str]:
    """The frozen workspaces to save to disk now, longest frozen first."""
    ordered = sorted(frozen, key=lambda f: f.since)
    chosen: list[str] = []
    held = sum(f.memory_bytes or 0 for f in ordered)
    short = 0
    if policy.host_floor_bytes > 0 and host_available_bytes is not None:
        short = max(0, policy.host_floor_bytes - host_available_bytes)
    for f in ordered:
        expired = now - f.since >= timedelta(seconds=policy.frozen_max_s)
        over_budget = policy.budget_bytes > 0 and held > policy.budget_bytes
        if not (expired or over_budget or short > 0):
            continue
        chosen.append(f.id)
        held -= f.memory_bytes or 0
        short -= f.memory_bytes or 0
    return chosen


def host_available_bytes(meminfo: Path = MEMINFO) -> int | None:
    """The host's available memory (``MemAvailable``), None where it cannot be read."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
