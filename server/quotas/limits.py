"""The per-user limits as plain data: their names, the server's defaults, an admin's
overrides. Pure: no I/O.

Two kinds. *Stock* limits bound what a user holds (a workspace counts in any state, a
snapshot whether its workspace still exists or not); passing one is a 409. *Concurrency*
limits bound what runs at once; passing one is a 429, and the call can be tried again when
one of the user's own calls ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.config import Settings
from server.errors import ValidationFailed


@dataclass(frozen=True)
class Limit:
    name: str
    setting: str  # the Settings field holding the server's default
    what: str  # for messages: "you have 3 <what>"
    stock: bool  # True: a 409 beyond it; False: a concurrency limit, 429
    integral: bool = True


LIMITS: dict[str, Limit] = {lim.name: lim for lim in (
    Limit("workspaces", "max_workspaces_per_user", "workspaces", stock=True),
    Limit("cpus", "max_cpus_per_user", "CPUs in your workspaces", stock=True, integral=False),
    Limit("memory_mb", "max_memory_mb_per_user", "MiB of memory in your workspaces",
          stock=True),
    Limit("disk_gb", "max_disk_gb_per_user", "GB of disk in your workspaces", stock=True),
    Limit("snapshots", "max_snapshots_per_user", "snapshots", stock=True),
    Limit("execs", "max_execs_per_user", "exec calls running or waiting", stock=False),
    Limit("streams", "max_streams_per_user", "streaming execs open", stock=False),
    Limit("terminals", "max_terminals_per_user", "web terminals open", stock=False),
    Limit("ssh_channels", "max_ssh_channels_per_user", "SSH channels open", stock=False),
)}
CONCURRENT = tuple(name for name, lim in LIMITS.items() if not lim.stock)
MAX_VALUE = 1_000_000


def defaults(settings: Settings) -> dict[str, float]:
    """The server's limits, from settings."""
    return {name: getattr(settings, lim.setting) for name, lim in LIMITS.items()}


def effective(settings: Settings, overrides: dict[str, Any] | None) -> dict[str, float]:
    """A user's limits: the server's, with the admin's overrides for that user on top
    (a malformed stored entry is ignored, never trusted)."""
    out = defaults(settings)
    for name, value in (overrides or {}).items():
        if name in LIMITS and _valid(LIMITS[name], value):
            out[name] = value
    return out


def validate_overrides(body: dict[str, Any]) -> dict[str, float]:
    """An admin's overrides as stored: known names, non-negative numbers (whole ones but for
    ``cpus``); ``null`` drops an override (the server's default applies again)."""
    out: dict[str, float] = {}
    for name, value in body.items():
        lim = LIMITS.get(name)
        if lim is None:
            raise ValidationFailed(
                f"unknown limit {name!r}; the limits are {', '.join(LIMITS)}")
        if value is None:
            continue
        if not _valid(lim, value):
            kind = "a whole number" if lim.integral else "a number"
            raise ValidationFailed(f"limit {name!r} must be {kind} from 0 to {MAX_VALUE}")
        out[name] = value
    return out


def _valid(lim: Limit, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if lim.integral and not isinstance(value, int):
        return False
    return bool(0 <= value <= MAX_VALUE)


def fmt(value: float) -> str:
    return f"{value:g}"
