"""QEMU processes: started daemonized (they outlive a restart of Den, which finds them again
by their pid file), found, and ended. Blocking; the backend calls these off the event loop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from server.runtime.errors import EngineError
from server.runtime.microvm.argv import VmFiles

LAUNCH_TIMEOUT_S = 60.0
ERROR_BYTES = 2000  # of QEMU's stderr, in an error message


def launch(argv: list[str], *, pass_fds: tuple[int, ...] = ()) -> int:
    """Run QEMU with ``-daemonize``: it returns once the VM is set up and its sockets listen.
    ``pass_fds``: descriptors QEMU inherits (its disks and TAP). Returns the VM's pid (from its pid
    file)."""
    try:
        out = subprocess.run(argv, capture_output=True, timeout=LAUNCH_TIMEOUT_S, check=False,
                             pass_fds=pass_fds)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"QEMU did not start: {exc}") from exc
    if out.returncode != 0:
        msg = out.stderr[-ERROR_BYTES:].decode(errors="replace").strip()
        raise EngineError(f"QEMU failed to start the VM (exit {out.returncode}): {msg}")
    pidfile = Path(argv[argv.index("-pidfile") + 1])
    pid = read_pid(pidfile)
    if pid is None:
        raise EngineError("QEMU started but wrote no pid file")
    return pid


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text()[:32].strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def running(files: VmFiles) -> int | None:
    """The pid of the QEMU serving this VM directory, or None. A pid file alone is not
    trusted (the pid may have been reused): the process's command line must name the
    directory's pid file."""
    pid = read_pid(files.pidfile)
    if pid is None:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    if state == "Z" or str(files.pidfile).encode() not in cmdline.split(b"\0"):
        return None
    return pid


def cmdline(pid: int) -> list[str]:
    """The process's command line (empty when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def signal_vm(files: VmFiles, sig: signal.Signals) -> None:
    pid = running(files)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_gone(files: VmFiles, timeout_s: float) -> bool:
    """Wait (at most ``timeout_s``) until no QEMU serves the directory; True when none does."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while running(files) is not None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    return True


def end(files: VmFiles, *, timeout_s: float) -> None:
    """SIGTERM (QEMU flushes its disks and exits), SIGKILL after ``timeout_s``."""
    signal_vm(files, signal.SIGTERM)
    if not wait_gone(files, timeout_s):
        signal_vm(files, signal.SIGKILL)
        if not wait_gone(files, 10.0):
            raise EngineError(f"the QEMU process of {files.dir.name} does not exit")


def cpu_ns(pid: int) -> int | None:
    """CPU time (user and system) the QEMU process has used: all of the guest's work."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = int(fields[11]) + int(fields[12])
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
