"""How much CPU a sandbox's cgroup is using: the warm pool freezes a sandbox only once the tail
of its boot is over.

A sandbox answers its agent long before its init is done: the default image's den-init then
starts the sudo broker (a Python process) and dev's tmux server with a login shell. A pooled
sandbox frozen right after the agent answered carried that work into the claim: measured
here, the claimed sandbox used 1.2-1.5 CPUs for the first ~0.7 s after the thaw (~0.9 s of
CPU on a 2-core machine), while the create's clone, rename, seed and first exec ran beside
it, and its processes (tmux, its shell) started after the claim. An idle systrap sandbox uses
~5% of one CPU. cgroup v1 (``cpuacct.usage``, nanoseconds) and v2 (``cpu.stat``'s
``usage_usec``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from server.runtime import cgroups
from server.runtime.cgroups import CGROUP_ROOT

WINDOW_S = 0.1  # one measurement
IDLE_SHARE = 0.15  # of one CPU, over a window: idle (an idle systrap sandbox: ~0.05)
QUIET_WINDOWS = 3  # in a row


def usage_file(pid: int, *, proc: Path = Path("/proc"), root: Path = CGROUP_ROOT
               ) -> Path | None:
    """The CPU accounting file of the cgroup process ``pid`` is in; None when there is none."""
    if (v1 := cgroups.v1_dir(pid, "cpuacct", proc=proc, root=root)) is not None:
        return v1 / "cpuacct.usage"
    v2 = cgroups.v2_dir(pid, proc=proc, root=root)
    return v2 / "cpu.stat" if v2 is not None else None


def usage_ns(path: Path) -> int | None:
    """CPU time the cgroup has used, in nanoseconds; None when it cannot be read."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if path.name == "cpuacct.usage":
        return int(text.strip()) if text.strip().isdigit() else None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec" and value.strip().isdigit():
            return int(value) * 1000
    return None


def wait_idle(read: Callable[[], int | None], *, timeout_s: float, window_s: float = WINDOW_S,
              share: float = IDLE_SHARE, quiet: int = QUIET_WINDOWS,
              clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep) -> bool:
    """Wait until ``read()`` (CPU nanoseconds) grew by less than ``share`` of one CPU in each
    of ``quiet`` windows of ``window_s`` in a row; False at ``timeout_s`` (still busy) or
    when the usage cannot be read (gone, another layout). Blocking."""
    deadline = clock() + timeout_s
    before = read()
    calm = 0
    while before is not None and clock() < deadline:
        started = clock()
        sleep(window_s)
        now = read()
        if now is None:
            return False
        calm = calm + 1 if now - before < share * (clock() - started) * 1e9 else 0
        if calm >= quiet:
            return True
        before = now
    return False
