"""Memory alarms on a sandbox's cgroup, without polling: what Den's memory guard waits on.

cgroup v1 tells a listener when a cgroup's memory usage crosses a threshold: an eventfd
registered through ``cgroup.event_control`` against ``memory.usage_in_bytes`` is signalled at
each crossing, up or down, and when the cgroup is removed. The kernel checks the thresholds
as it charges pages; nothing ticks while the sandbox is idle.

Under gVisor the host cgroup sees the sandbox's memory file (shmem) as it is touched, and
sees it shrink as soon as a process inside frees it (measured with runsc-ptrace: a 300 MiB
``bytearray`` took the cgroup from 13 to 320 MiB, crossing a 256 MiB threshold 0.38 s after
the exec started, and back to 19 MiB within a second of ``del``). So the cgroup's usage is a
fair measure of what the workspace uses.

cgroup v2 has no usage thresholds (only ``memory.high`` and ``memory.events``); on a v2 host
:func:`memory_dir` answers None and the guard says so once (this machine runs v1), and Den
does not tell the workspace that the host guards it: den-init then starts earlyoom inside
it, as before the guard (:func:`thresholds_available`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from server.runtime import cgroups
from server.runtime.cgroups import CGROUP_ROOT


def thresholds_available(root: Path = CGROUP_ROOT) -> bool:
    """Whether this host's memory cgroups take usage thresholds (cgroup v1's memory
    controller): where they do not, the workspace's own earlyoom guards it instead
    (docker_specs.container_config, den-init)."""
    return (root / "memory" / "cgroup.event_control").exists()


def memory_dir(pid: int, *, proc: Path = Path("/proc"), root: Path = CGROUP_ROOT
               ) -> Path | None:
    """The v1 memory cgroup directory process ``pid`` is in; None when there is none."""
    found = cgroups.v1_dir(pid, "memory", proc=proc, root=root)
    return found if found is not None and (found / "cgroup.event_control").exists() else None


def working_set(directory: Path) -> int | None:
    """What the sandbox holds in the cgroup ``directory``: its usage less the page cache of
    files (``total_active_file`` and ``total_inactive_file`` of ``memory.stat``), which the
    kernel takes back before it would kill anything. Writing a big file fills the cache
    (the gofer writes it on the host, charged to the sandbox's cgroup: a 1.3 GB ``dd`` into
    ``/workspace`` passed a 512 MiB ``memory_mb`` with no process holding it); gVisor's own
    memory is shared memory, on the anonymous lists, and counts. None once it is gone."""
    usage = read_bytes(directory / "memory.usage_in_bytes")
    if usage is None:
        return None
    cache = 0
    with contextlib.suppress(OSError, ValueError):
        for line in (directory / "memory.stat").read_text().splitlines()[:200]:
            key, _, value = line.partition(" ")
            if key in ("total_active_file", "total_inactive_file") and value.isdigit():
                cache += int(value)
    return max(0, usage - cache)


def read_bytes(path: Path) -> int | None:
    """A cgroup file holding one number; None when it is gone or not a number."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class UsageAlarm:
    """An eventfd the kernel signals whenever the memory usage of cgroup ``directory``
    crosses one of ``thresholds`` (bytes), in either direction, when the cgroup reclaims
    memory (``memory.pressure_level`` at ``low``: it is at its limit), or when it goes away.
    Raises OSError when the cgroup cannot be watched (gone, not root, not v1).

    The reclaim events matter when page cache holds the usage past the thresholds (a big
    file written): a process that then grows crosses nothing, but makes the cgroup reclaim,
    and the guard looks again (:func:`working_set`). An idle cgroup reclaims nothing."""

    def __init__(self, directory: Path, thresholds: Sequence[int]) -> None:
        self.directory = directory
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ufd = self._pfd = -1
        try:
            self._ufd = os.open(directory / "memory.usage_in_bytes", os.O_RDONLY | os.O_CLOEXEC)
            self._pfd = os.open(directory / "memory.pressure_level", os.O_RDONLY | os.O_CLOEXEC)
            control = os.open(directory / "cgroup.event_control", os.O_WRONLY | os.O_CLOEXEC)
            try:
                for threshold in thresholds:
                    os.write(control, f"{self._efd} {self._ufd} {int(threshold)}".encode())
                os.write(control, f"{self._efd} {self._pfd} low".encode())
            finally:
                os.close(control)
        except OSError:
            self.close()
            raise

    def fileno(self) -> int:
        return self._efd

    def drain(self) -> int:
        """Take the pending signals (their count; 0 when none)."""
        try:
            return os.eventfd_read(self._efd)
        except (BlockingIOError, OSError):
            return 0

    def usage(self) -> int | None:
        """The cgroup's working set now, in bytes (:func:`working_set`); None once the
        cgroup is gone."""
        return working_set(self.directory)

    def limit(self) -> int | None:
        """The cgroup's hard limit, in bytes."""
        return read_bytes(self.directory / "memory.limit_in_bytes")

    def close(self) -> None:
        for fd in (self._efd, self._ufd, self._pfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._efd = self._ufd = self._pfd = -1
