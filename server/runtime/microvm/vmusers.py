"""One unprivileged uid per VM: QEMU drops root to a uid (and a group of the same number) of
its own, so a guest that escapes into its QEMU holds no other VM's files or processes.

Uids come from a range of the operator's (``DEN_MICROVM_UID_BASE``, ``_COUNT``) that no
system user is in; QEMU 7.2's ``-runas`` takes ``uid:gid`` as numbers, so no user is created
for them. A VM's uid is recorded in its directory's ``vm.json`` the first time the VM is
launched (a new VM, a fork, a restore's new directory, or a VM made before this existed) and
kept for the directory's life. Uids are handed out in turn from a counter kept in the VMs'
directory and are not used again until the whole range has gone round; even then, a uid that
a VM directory still records or that a process still runs as is skipped. Blocking (files).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from server.runtime.errors import EngineError
from server.runtime.microvm import disks
from server.runtime.microvm.argv import VmFiles

COUNTER = ".next-uid"  # in the VMs' directory: how many uids were handed out so far
_lock = threading.Lock()  # one allocation at a time (launches run on worker threads)


@dataclass(frozen=True)
class UidRange:
    """``count`` uids from ``base``."""

    base: int
    count: int

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.base <= uid < self.base + self.count


def runas(uid: int) -> list[str]:
    """QEMU's options to drop to ``uid`` and the group of the same number."""
    return ["-runas", f"{uid}:{uid}"]


def uid_of(files: VmFiles, uids: UidRange) -> int:
    """The VM's uid: the one its record names, else a fresh one, recorded."""
    with _lock:
        record = disks.read_record(files)
        if record is None:
            raise EngineError(f"the VM directory {files.dir.name} has no record")
        recorded = record.get("uid")
        if isinstance(recorded, int) and recorded in uids:
            uid = recorded
        else:
            uid = _fresh(files.dir.parent, uids)
            disks.write_record(files, {**record, "uid": uid})
    return uid


def _fresh(vms_dir: Path, uids: UidRange) -> int:
    """The next uid of the range that no VM directory records and (once the range has gone
    round, or the counter was lost) no process runs as. The counter counts every uid handed
    out, so the scan of the host's processes stays off a new VM's path until then."""
    counter = vms_dir / COUNTER
    try:
        handed = int(counter.read_text().strip())
    except (OSError, ValueError):
        handed = -1  # lost or never kept: any uid of the range may be in use
    start = max(handed, 0)
    taken = _recorded(vms_dir)
    if handed < 0 or handed >= uids.count:
        taken |= _running_uids()
    for step in range(uids.count):
        uid = uids.base + (start + step) % uids.count
        if uid not in taken:
            tmp = counter.with_name(f"{COUNTER}.tmp")
            tmp.write_text(str(start + step + 1))
            os.replace(tmp, counter)
            return uid
    raise EngineError(f"every uid of the microVM range ({uids.base} to "
                      f"{uids.base + uids.count - 1}, DEN_MICROVM_UID_BASE and "
                      "DEN_MICROVM_UID_COUNT) is in use: widen the range")


def _recorded(vms_dir: Path) -> set[int]:
    found = set()
    for d in vms_dir.iterdir() if vms_dir.is_dir() else ():
        record = disks.read_record(VmFiles(d))
        uid = record.get("uid") if record else None
        if isinstance(uid, int):
            found.add(uid)
    return found


def _running_uids() -> set[int]:
    """The real uids of the host's processes (a QEMU whose directory is gone included)."""
    found = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                found.add(d.stat().st_uid)
            except OSError:
                continue
    return found
