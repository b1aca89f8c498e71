"""Disk snapshots of microVMs: a snapshot is a directory beside the VMs' (``<prefix>-snap-<id>``)
holding copies of a VM's two disks and a record of its labels. Blocking.

A copy, not a qcow2 chain onto the workspace's disks: a snapshot stays valid when its
workspace is deleted or restored, and a fork's disks stay valid when its snapshot is deleted.
``root.qcow2`` is the VM's overlay, copied as it is (it keeps naming the shared root
filesystem build it was made on, which is never written); ``workspace.img`` is raw and
sparse, copied sparse. ``cp --reflink=auto`` shares the blocks (copy-on-write) where the
filesystem can (btrfs, XFS); on ext4 it is a sparse copy of what the guest wrote.

Each copy is made under a temporary name and renamed into place: a directory that exists
is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server import faults
from server.runtime import inflight
from server.runtime.errors import EngineError, ObjectMissing
from server.runtime.microvm import disks
from server.runtime.microvm.argv import VmFiles

COPY_TIMEOUT_S = 3600.0


def copy_argv(src: Path, dst: Path) -> list[str]:
    """The copy of one disk: blocks shared where the filesystem can, holes kept."""
    return ["cp", "--reflink=auto", "--sparse=always", "--", str(src), str(dst)]


def copy_disks(src: VmFiles, dst: VmFiles, *, record: Mapping[str, Any],
               fault: str = "") -> int:
    """Make ``dst`` (a VM or a snapshot directory) a copy of ``src``'s disks, with
    ``record`` as its labels; what ``dst`` held is replaced. Returns the bytes the copies
    take on disk. ``src``'s disks must not change meanwhile (its QEMU is stopped or gone).
    ``fault`` names the fault point (server/faults.py) between the two disks' copies."""
    for disk in (src.root, src.workspace):
        if not disk.is_file():
            raise ObjectMissing(f"{disk} is missing")
    tmp = VmFiles(dst.dir.with_name(f".{dst.dir.name}.tmp"))
    shutil.rmtree(tmp.dir, ignore_errors=True)
    tmp.dir.mkdir(parents=True, mode=0o700)
    try:
        for a, b in ((src.root, tmp.root), (src.workspace, tmp.workspace)):
            if inflight.abandoned():  # a delete of the fork waits for this thread
                raise EngineError("the copy was stopped: its operation was cancelled")
            disks.run_tool(copy_argv(a, b), timeout_s=COPY_TIMEOUT_S, what="copying a disk")
            if fault:
                faults.point(fault)  # Den dies with a half-made copy: reconcile removes it
        tmp.record.write_text(json.dumps(dict(record), sort_keys=True))
        size = sum(f.stat().st_blocks * 512 for f in (tmp.root, tmp.workspace))
        shutil.rmtree(dst.dir, ignore_errors=True)
        os.replace(tmp.dir, dst.dir)
    except BaseException:
        shutil.rmtree(tmp.dir, ignore_errors=True)
        raise
    return size


def remove(files: VmFiles) -> None:
    shutil.rmtree(files.dir.with_name(f".{files.dir.name}.tmp"), ignore_errors=True)
    shutil.rmtree(files.dir, ignore_errors=True)


def unfinished(name: str, prefix: str) -> tuple[str, str] | None:
    """(kind, id) of a copy left half-made under ``name`` (``.<prefix>-vm-<id>[-<hex>].tmp``
    or ``.<prefix>-snap-<id>.tmp``): ``("vm", workspace id)`` or ``("snap", snapshot id)``;
    None for any other name. Such a directory has no record yet: its name is all there is."""
    if not (name.startswith(f".{prefix}-") and name.endswith(".tmp")):
        return None
    kind, _, rest = name[len(prefix) + 2:-len(".tmp")].partition("-")
    ident = rest.split("-")[0]
    return (kind, ident) if kind in ("vm", "snap") and ident else None


