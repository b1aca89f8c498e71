"""Where a process's cgroups are: ``/proc/PID/cgroup``, read once for the freezer
(cgroup_freezer.py), the memory alarms (cgroup_memory.py) and the CPU accounting
(cgroup_cpu.py)."""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def memberships(pid: int, *, proc: Path = Path("/proc")) -> list[tuple[list[str], str]]:
    """(controllers, path) of each hierarchy process ``pid`` is in (cgroup v2's unified one
    has no controllers: ``[]``); empty when the process is gone."""
    if pid <= 0:
        return []
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return []
    out: list[tuple[list[str], str]] = []
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        out.append(([c for c in controllers.split(",") if c], path))
    return out


def v1_dir(pid: int, controller: str, *, proc: Path = Path("/proc"),
           root: Path = CGROUP_ROOT) -> Path | None:
    """The directory of ``pid``'s cgroup v1 ``controller`` hierarchy; None when it has none."""
    for controllers, path in memberships(pid, proc=proc):
        if controller in controllers:
            return root / controller / path.lstrip("/")
    return None


def v2_dir(pid: int, *, proc: Path = Path("/proc"), root: Path = CGROUP_ROOT) -> Path | None:
    """The directory of ``pid``'s cgroup in the unified (v2) hierarchy (``0::/path``); None
    when it is in none."""
    for controllers, path in memberships(pid, proc=proc):
        if not controllers and path:
            return root / path.lstrip("/")
    return None
