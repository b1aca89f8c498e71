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

CGROUP_ROOT = Path("/sys/fs/cgroup")


def thresholds_available(root: Path = CGROUP_ROOT) -> bool:
    """Whether this host's memory cgroups take usage thresholds (cgroup v1's memory
    controller): where they do not, the workspace's own earlyoom guards it instead
    (docker_specs.container_config, den-init)."""
    return (root / "memory" / "cgroup.event_control").exists()


def memory_dir(pid: int, *, proc: Path = Path("/proc"), root: Path = CGROUP_ROOT
               ) -> Path | None:
    """The v1 memory cgroup directory process ``pid`` is in; None when there is none."""
    if pid <= 0:
        return None
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if "memory" in controllers.split(","):
            found = root / "memory" / path.lstrip("/")
            return found if (found / "cgroup.event_control").exists() else None
    return None


def read_bytes(path: Path) -> int | None:
    """A cgroup file holding one number; None when it is gone or not a number."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class UsageAlarm:
    """An eventfd the kernel signals whenever the memory usage of cgroup ``directory``
    crosses one of ``thresholds`` (bytes), in either direction, or the cgroup goes away.
    Raises OSError when the cgroup cannot be watched (gone, not root, not v1)."""

    def __init__(self, directory: Path, thresholds: Sequence[int]) -> None:
        self.directory = directory
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ufd = -1
        try:
            self._ufd = os.open(directory / "memory.usage_in_bytes", os.O_RDONLY | os.O_CLOEXEC)
            control = os.open(directory / "cgroup.event_control", os.O_WRONLY | os.O_CLOEXEC)
            try:
                for threshold in thresholds:
                    os.write(control, f"{self._efd} {self._ufd} {int(threshold)}".encode())
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
        """The cgroup's memory usage now, in bytes; None once the cgroup is gone."""
        return read_bytes(self.directory / "memory.usage_in_bytes")

    def limit(self) -> int | None:
        """The cgroup's hard limit, in bytes."""
        return read_bytes(self.directory / "memory.limit_in_bytes")

    def close(self) -> None:
        for fd in (self._efd, self._ufd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._efd = self._ufd = -1
