"""A cgroup per VM: the host's bound on what one QEMU process (the whole guest) may take.

``-smp`` and ``-m`` bound what the guest sees, not what QEMU uses: its emulation threads,
its own memory (device state, TCG's translated code, I/O buffers) and the threads of its I/O
pool. The cgroup caps the lot: CPU time to the workspace's ``cpus`` (``cpu.max``), memory to
the guest's plus QEMU's overhead (``memory.max``) and threads (``pids.max``). cgroup v2 where
the host's unified hierarchy has the controllers, else v1 (this development machine: Docker
20.10 keeps the controllers on v1). QEMU is placed in it before it runs (the launching
shell joins, then execs QEMU), so nothing is charged elsewhere first.

Pure builders (:func:`limits`, :func:`files_v1`, :func:`files_v2`, :func:`wrap`) and a thin
I/O shell (:class:`Cgroups`), blocking: the backend calls it off the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from server.runtime.cgroups import CGROUP_ROOT
from server.runtime.errors import EngineUnavailable

log = logging.getLogger(__name__)

REMOVE_TIMEOUT_S = 10.0
PARENT = "den-microvm"  # every VM's group is a child of this one, per controller
CPU_PERIOD_US = 100_000
# QEMU's own memory next to the guest's: measured RSS of an idle 512 MB TCG guest minus its
# touched guest memory was 60-90 MB; TCG's translation cache grows with the code the guest
# runs (capped by -accel tcg,tb-size in argv.py).
QEMU_OVERHEAD_MB = 256
QEMU_PIDS = 256  # QEMU's threads: one per vCPU, its I/O pool (64 at most), a few of its own
V1_CONTROLLERS = ("cpu", "memory", "pids")


@dataclass(frozen=True)
class Limits:
    cpu_quota_us: int
    cpu_period_us: int
    memory_bytes: int
    pids: int


def limits(*, cpus: float, memory_mb: int) -> Limits:
    """The cgroup limits of a VM of ``cpus`` (fractional: a share of the host's CPU time) and
    ``memory_mb`` of guest memory."""
    return Limits(cpu_quota_us=max(1000, math.ceil(cpus * CPU_PERIOD_US)),
                  cpu_period_us=CPU_PERIOD_US,
                  memory_bytes=(memory_mb + QEMU_OVERHEAD_MB) * 1024 * 1024, pids=QEMU_PIDS)


def files_v2(lim: Limits) -> dict[str, str]:
    return {"cpu.max": f"{lim.cpu_quota_us} {lim.cpu_period_us}",
            "memory.max": str(lim.memory_bytes), "memory.swap.max": "0",
            "pids.max": str(lim.pids)}


def files_v1(lim: Limits) -> dict[str, dict[str, str]]:
    """Per controller: its files. The period before the quota (the kernel checks the quota
    against the period in force)."""
    return {"cpu": {"cpu.cfs_period_us": str(lim.cpu_period_us),
                    "cpu.cfs_quota_us": str(lim.cpu_quota_us)},
            "memory": {"memory.limit_in_bytes": str(lim.memory_bytes)},
            "pids": {"pids.max": str(lim.pids)}}


# The launching shell writes its own pid ("0": the writer) into each group, then becomes
# QEMU: the daemonized QEMU and all its threads are born inside.
JOIN = 'for f; do [ "$f" = -- ] && break; echo 0 > "$f" || exit 125; shift; done; shift; ' \
       'exec "$@"'


def wrap(argv: list[str], procs: list[Path]) -> list[str]:
    """``argv`` started inside the groups whose ``cgroup.procs`` files are ``procs``."""
    return ["/bin/sh", "-c", JOIN, "den-cgroup", *map(str, procs), "--", *argv]


class Cgroups:
    """The host's cgroup hierarchy, as far as VMs need it."""

    def __init__(self, root: Path = CGROUP_ROOT) -> None:
        self.root = root

    def version(self) -> int:
        """2 when the unified hierarchy at ``root`` has cpu, memory and pids; 1 when each
        has a v1 hierarchy under ``root``; else EngineUnavailable."""
        with contextlib.suppress(OSError):
            if {"cpu", "memory", "pids"} <= set(
                    (self.root / "cgroup.controllers").read_text().split()):
                return 2
        if all((self.root / c / "cgroup.procs").is_file() for c in V1_CONTROLLERS):
            return 1
        raise EngineUnavailable(f"no cgroup hierarchy with the cpu, memory and pids "
                                f"controllers under {self.root}: a microVM needs one")

    def groups(self, name: str) -> list[Path]:
        if self.version() == 2:
            return [self.root / PARENT / name]
        return [self.root / c / PARENT / name for c in V1_CONTROLLERS]

    def make(self, name: str, lim: Limits) -> list[Path]:
        """The VM's groups made (again) with ``lim``; their ``cgroup.procs`` files."""
        try:
            if self.version() == 2:
                parent = self.root / PARENT
                parent.mkdir(exist_ok=True)
                (self.root / "cgroup.subtree_control").write_text("+cpu +memory +pids")
                (parent / "cgroup.subtree_control").write_text("+cpu +memory +pids")
                group = parent / name
                group.mkdir(exist_ok=True)
                for f, value in files_v2(lim).items():
                    with contextlib.suppress(FileNotFoundError):  # no swap accounting
                        (group / f).write_text(value)
                return [group / "cgroup.procs"]
            procs = []
            for controller, values in files_v1(lim).items():
                group = self.root / controller / PARENT / name
                group.mkdir(parents=True, exist_ok=True)
                for f, value in values.items():
                    (group / f).write_text(value)
                procs.append(group / "cgroup.procs")
            return procs
        except OSError as exc:
            raise EngineUnavailable(f"cannot make the cgroup of VM {name}: {exc}") from exc

    def remove(self, name: str, *, timeout_s: float = REMOVE_TIMEOUT_S) -> None:
        """The VM's groups removed (idempotent). QEMU's pid file goes before its last thread
        does (freeing the guest's memory takes a moment): a group still busy is retried
        until ``timeout_s``, then left (logged; the next start reuses it)."""
        with contextlib.suppress(EngineUnavailable):
            deadline = time.monotonic() + timeout_s
            for group in self.groups(name):
                while True:
                    try:
                        group.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError as exc:
                        if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                            log.warning("cgroup %s not removed: %s", group, exc)
                            break
                        time.sleep(0.02)
